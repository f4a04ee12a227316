"""Random training transforms without MONAI's metadata tracking.

The deterministic start of a training chain (loading, orientation, resampling, intensity
normalisation) needs MONAI's metadata and is cached once by ``CacheDataset``; the random
augmentations after it run every epoch, and with tracking on each of them wraps its output
in a ``MetaTensor`` and records itself in the case's transform history (which training never
inverts): on a 2-core CPU that bookkeeping cost more than the flips themselves (about 30 ms
per 64^2 image). :class:`MetaFree` is a MONAI ``Compose`` that runs its transforms with
``monai.data.set_track_meta(False)`` and restores the previous setting after, so the same
MONAI transforms, with the same random draws, return plain tensors. Being a ``Compose`` it
is randomizable, so ``CacheDataset`` stops caching where it starts. MONAI has the switch
(a process-wide flag) but no transform that scopes it; that scoping is all this module adds.
"""

from __future__ import annotations

from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose

__all__ = ["MetaFree"]


class MetaFree(Compose):
    """``Compose`` of transforms run with MONAI's metadata tracking off."""

    def __call__(self, input_, *args, **kwargs):
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            set_track_meta(previous)
