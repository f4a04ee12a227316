"""What the best DP training adds to DP-SGD (De et al. 2022), as small helpers of
:class:`adpfl.training.dpsgd.DPSGDTrainer`; none of them changes the privacy unit.

* :class:`AugmentedCopies`: augmentation multiplicity. Item ``i`` is a list of ``K``
  independently augmented views of record ``i`` (the task's per-item random transforms run
  once per view, and its batch augmentation draws each row on its own); MONAI's
  ``list_data_collate`` flattens them, so a Poisson batch of ``B`` records becomes ``B * K``
  rows with each record's views contiguous. A 3D task's random crop returns a one-patch list per
  draw; each view is that one patch (a draw of more than one is refused: it would not be one
  row a view). The optimizer
  (:class:`adpfl.training.dp_noise.RecordDPOptimizer`) averages the ``K`` per-sample
  gradients into one per record *before* clipping: one record, one clipped contribution.
* :func:`ema_tracker`: exponential moving average of the weights over the round's steps
  (``torch.optim.swa_utils``); the EMA of noisy iterates is post-processing, and it is what
  leaves the site.
* :func:`lr_factor`: the learning-rate schedule over the planned steps (cosine decay); a
  function of public step counts only, so the trained weights remain post-processing of the
  noisy gradients.
* :func:`random_mask`: a data-independent coordinate mask (Bernoulli ``keep_fraction`` per
  coordinate from the round's OS-seeded generator) for gradient sparsification.
"""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["AugmentedCopies", "ema_tracker", "lr_factor", "random_mask"]


class AugmentedCopies(torch.utils.data.Dataset):
    """``K`` augmented views per record (see the module docstring)."""

    def __init__(self, dataset, k: int):
        if int(k) < 1:
            raise ValueError(f"augmult must be >= 1, got {k}")
        self.dataset, self.k = dataset, int(k)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list:
        views = []
        for _ in range(self.k):
            item = self.dataset[index]
            if isinstance(item, list):
                # the 3D tasks' random crop returns a list of num_samples patches; each view must be
                # exactly one row, or the optimizer's groups of K rows would not be one record's
                if len(item) != 1:
                    raise ValueError(f"dpsgd_augmult needs one training sample per draw of a record, but the "
                                     f"task's training transforms give {len(item)}")
                item = item[0]
            views.append(item)
        return views


def ema_tracker(model: torch.nn.Module, decay: float, warmup: bool = False) -> AveragedModel | None:
    """An EMA of ``model``'s weights (None when ``decay == 0``). Call ``update_parameters(model)``
    after each optimizer step; the first call copies the weights (``AveragedModel``), the
    ``t``-th later one averages with decay ``decay``, or with ``warmup`` ``min(decay, (1 + t) /
    (10 + t))`` (De et al. 2022; torch's EMA helper has a fixed decay, hence this function)."""
    if decay <= 0:
        return None
    if not warmup:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=False)

    @torch.no_grad()
    def warmup_update(ema_params, params, n_averaged) -> None:
        t = float(n_averaged)
        d = min(float(decay), (1.0 + t) / (10.0 + t))
        for p_ema, p in zip(ema_params, params):
            p_ema.lerp_(p, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=warmup_update, use_buffers=False)


def lr_factor(schedule: str, step: int, total_steps: int, final_factor: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based, counted over the whole planned training of
    ``total_steps`` steps) as a factor of the configured one: 1 for ``constant``; for ``cosine``
    ``final + (1 - final) * (1 + cos(pi * t)) / 2`` with ``t = step / (total_steps - 1)`` clamped
    to [0, 1] (1 at the first step, ``final_factor`` at the last and after it)."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    t = min(1.0, max(0.0, step / max(1, int(total_steps) - 1)))
    return float(final_factor) + (1.0 - float(final_factor)) * 0.5 * (1.0 + math.cos(math.pi * t))


def random_mask(model: torch.nn.Module, keep_fraction: float, generator: torch.Generator) -> dict | None:
    """``{parameter: 0/1 tensor}`` keeping each coordinate with probability ``keep_fraction``,
    drawn from ``generator`` only (never from data); None when everything is kept."""
    if keep_fraction >= 1.0:
        return None
    out = {}
    for p in model.parameters():
        if p.requires_grad:
            u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64)
            out[p] = (u < float(keep_fraction)).to(p.dtype)
    return out
