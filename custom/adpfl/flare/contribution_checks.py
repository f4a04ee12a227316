"""Checks on a site's contribution before the server aggregates it (no FLARE import).

Used by :class:`adpfl.flare.validation_widget.ContributionValidator`; kept FLARE-free so it
is tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def check_update(update: Mapping, reference_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError (naming the entry) unless ``update`` has exactly the model's keys,
    each with the model's shape, a float dtype and only finite values."""
    if not isinstance(update, Mapping) or not update:
        raise ValueError("the contribution holds no update")
    missing = sorted(set(reference_shapes) - set(update))
    extra = sorted(set(update) - set(reference_shapes))
    if missing or extra:
        raise ValueError(f"keys do not match the global model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in update.items():
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(reference_shapes[key]):
            raise ValueError(
                f"entry {key!r} has shape {tuple(arr.shape)}, the global model's is {tuple(reference_shapes[key])}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"entry {key!r} has non-float dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"entry {key!r} contains NaN or Inf")
