"""Per-sample random augmentation of a collated training batch (flips, quarter turns,
intensity scale and shift), drawn from one seeded ``torch.Generator``.

MONAI's random transforms act on one item at a time: run per item, each flip or jitter costs
about half a millisecond of Python bookkeeping (randomisation, type conversion, metadata or
the global switch that turns metadata off) against microseconds of tensor work, which on a
2-core CPU was the last ~10 % between the site trainer and bare compute. MONAI has no
batch-wise random transform with independent per-sample draws, so this module is the small
hand-written part: every sample of a batch gets its own draws (one row of uniforms per
sample), applied with ``torch.where`` on the whole batch, on whatever device the batch is
(the GPU when training there). The distribution per sample is that of the MONAI transforms
:meth:`BatchAugment.monai_transforms` returns (``RandFlipd``, ``RandRotate90d``,
``RandScaleIntensityd``, ``RandShiftIntensityd``, in that order), which the plain MONAI
reference loop of ``bench/bench_training.py`` runs per item instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchAugment"]


@dataclass(frozen=True)
class BatchAugment:
    """Random augmentation of a batch ``(image, label)``, ``(B, C, *spatial)`` each.

    Per sample, in this order: each spatial axis in ``flip_axes`` mirrored with probability
    ``flip_prob`` (image and label alike); with probability ``rot90_prob`` a rotation by 1, 2
    or 3 quarter turns (equally likely) in the plane of the first two spatial axes (they must
    have equal size); with probability ``scale_prob`` the image times ``1 + f``, ``f``
    uniform in ``[-scale_factor, scale_factor]``; with probability ``shift_prob`` the image
    plus ``o``, ``o`` uniform in ``[-shift_offset, shift_offset]``. Labels are only moved.
    """

    spatial_dims: int
    flip_axes: tuple[int, ...] = ()
    flip_prob: float = 0.5
    rot90_prob: float = 0.0
    scale_factor: float = 0.0
    scale_prob: float = 0.0
    shift_offset: float = 0.0
    shift_prob: float = 0.0

    def __post_init__(self) -> None:
        bad = [a for a in self.flip_axes if not 0 <= int(a) < self.spatial_dims]
        if bad:
            raise ValueError(f"flip_axes {self.flip_axes}: spatial axes of a {self.spatial_dims}D image are "
                             f"0..{self.spatial_dims - 1}")
        for name in ("flip_prob", "rot90_prob", "scale_prob", "shift_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a probability in [0, 1]")
        if self.scale_factor < 0 or self.shift_offset < 0:
            raise ValueError("scale_factor and shift_offset are half-widths: must be >= 0")

    def check_size(self, size) -> None:
        """Raises ValueError when a quarter turn would change the shape of ``size``."""
        if self.rot90_prob > 0 and int(size[0]) != int(size[1]):
            raise ValueError("random quarter turns need equal sizes on the first two axes, "
                             f"got image size {tuple(size)}")

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The ``(batch, 5 + len(flip_axes))`` uniforms of one batch (CPU), one row per sample."""
        return torch.rand((batch, len(self.flip_axes) + 5), generator=generator, dtype=torch.float64)

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} do not pair up")
        b = image.shape[0]
        if b == 0:
            return image, label
        u = self.draw(b, generator).to(image.device)
        shape = (b,) + (1,) * (image.dim() - 1)

        def where(cond, a, c):
            return torch.where(cond.view(shape), a, c)

        for i, axis in enumerate(self.flip_axes):
            flip = u[:, i] < self.flip_prob
            if flip.any():
                image = where(flip, image.flip(2 + axis), image)
                label = where(flip, label.flip(2 + axis), label)
        j = len(self.flip_axes)
        if self.rot90_prob > 0:
            turn = u[:, j] < self.rot90_prob
            k = 1 + torch.clamp((u[:, j + 1] * 3).long(), max=2)  # 1, 2 or 3 quarter turns
            for kk in (1, 2, 3):
                sel = turn & (k == kk)
                if sel.any():
                    image = where(sel, torch.rot90(image, kk, dims=(2, 3)), image)
                    label = where(sel, torch.rot90(label, kk, dims=(2, 3)), label)
        if self.scale_prob > 0 and self.scale_factor > 0:
            f = (u[:, j + 2] * 2 - 1) * self.scale_factor
            f = torch.where(u[:, j + 3] < self.scale_prob, f, torch.zeros_like(f))
            image = image * (1 + f).to(image.dtype).view(shape)
        if self.shift_prob > 0 and self.shift_offset > 0:
            # the uniform decides both whether (below shift_prob) and how much (rescaled)
            p = self.shift_prob
            hit = u[:, j + 4] < p
            o = (u[:, j + 4] / p * 2 - 1) * self.shift_offset
            o = torch.where(hit, o, torch.zeros_like(o))
            image = image + o.to(image.dtype).view(shape)
        return image, label

    def monai_transforms(self, keys=("image", "label")) -> list:
        """The same augmentation as MONAI's per-item dictionary transforms (what a plain MONAI
        loop would run on each item instead)."""
        from monai import transforms as mt

        keys = list(keys)
        out = [mt.RandFlipd(keys=keys, prob=self.flip_prob, spatial_axis=a) for a in self.flip_axes]
        if self.rot90_prob > 0:
            out.append(mt.RandRotate90d(keys=keys, prob=self.rot90_prob, max_k=3))
        if self.scale_prob > 0 and self.scale_factor > 0:
            out.append(mt.RandScaleIntensityd(keys=keys[0], factors=self.scale_factor, prob=self.scale_prob))
        if self.shift_prob > 0 and self.shift_offset > 0:
            out.append(mt.RandShiftIntensityd(keys=keys[0], offsets=self.shift_offset, prob=self.shift_prob))
        return out
