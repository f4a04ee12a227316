"""Opacus' DP-SGD optimizer with float-safe noise (issue 12).

Opacus 1.6's ``DPOptimizer.add_noise`` draws the Gaussian noise of every step with
``torch.normal(..., dtype=p.summed_grad.dtype)`` -- float32 for float32 models -- and
PyTorch's float32 Gaussian (Box-Muller on 24-bit uniforms, CPU and CUDA alike) never
exceeds about 5.77 standard deviations. The stated (epsilon, delta) assume a true Gaussian,
so every step's noise here is instead drawn in float64 on the gradient's device, added to
the clipped, summed gradient in float64, and the sum rounded once to the gradient's dtype
(:func:`adpfl.privacy.mechanisms.gaussian_noised`, the same function as the update-level
release). Per-sample clipping, the step hook (accounting), the expected-batch-size scaling
and the ``_processed`` bookkeeping are Opacus' own and unchanged: only ``add_noise`` is
overridden, with the same standard deviation ``noise_multiplier * max_grad_norm``.

What floating-point exposure remains is described in :mod:`adpfl.privacy.mechanisms`
(float64 support ends near 8.5 sigma; float64 grid attacks are not excluded in principle).
Opacus' ``secure_mode`` is not supported by this subclass (it is refused).
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from adpfl.privacy.mechanisms import gaussian_noised

__all__ = ["Float64NoiseDPOptimizer", "RecordDPOptimizer"]


class Float64NoiseDPOptimizer(DPOptimizer):
    """:class:`opacus.optimizers.DPOptimizer` whose step noise is drawn and added in float64."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("secure_mode"):
            raise ValueError("Float64NoiseDPOptimizer does not implement Opacus' secure_mode")
        super().__init__(*args, **kwargs)

    def add_noise(self) -> None:
        """Like ``DPOptimizer.add_noise``: ``p.grad = summed_grad + N(0, (z * C)^2)``, drawn
        and summed in float64, rounded to the gradient's dtype."""
        std = float(self.noise_multiplier) * float(self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = gaussian_noised(p.summed_grad, std, self.generator, p.summed_grad.dtype).view_as(p)
            _mark_as_processed(p.summed_grad)


class RecordDPOptimizer(Float64NoiseDPOptimizer):
    """The float64-noise DP optimizer plus what ADP-SGD and the best DP training add, each
    keeping one record's contribution to a step's clipped sum at L2 norm <= ``max_grad_norm``:

    * ``augmult = K``: the batch holds K augmented copies of each sampled record, contiguous
      (record i's copies at rows ``i*K .. i*K+K-1``); the K per-sample gradients are averaged
      into ONE row per record before clipping (De et al. 2022), so a record still adds one
      clipped vector;
    * ``mask`` (``{param: 0/1 tensor}``, drawn without looking at data): per-sample gradients
      are masked before clipping and the noise is added on kept coordinates only;
    * ``quantile_clip`` (:class:`adpfl.privacy.record_adaptive.QuantileClip`) with
      ``count_noise`` ``sigma_b``: each step also releases the noisy centred count of unclipped
      records (float64 Gaussian, std ``sigma_b``) and the clip follows it after the step. The
      accountant's hook reads ``noise_multiplier`` = the *effective* z; the gradient noise
      uses ``gradient_noise_multiplier`` (:func:`~adpfl.privacy.record_adaptive.gradient_noise_multiplier`).

    Works with Opacus' ``BatchMemoryManager`` (virtual steps): the count accumulates over
    the physical batches of one logical batch and is released once, with the step.
    """

    def __init__(self, *args, augmult: int = 1, mask: dict | None = None, quantile_clip=None,
                 count_noise: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        from adpfl.privacy.record_adaptive import gradient_noise_multiplier

        self.augmult = int(augmult)
        if self.augmult < 1:
            raise ValueError(f"augmult must be >= 1, got {augmult}")
        self.mask = mask
        self.quantile_clip = quantile_clip
        self.count_noise = None if quantile_clip is None else float(count_noise)
        z = float(self.noise_multiplier)
        self.gradient_noise_multiplier = z if quantile_clip is None else gradient_noise_multiplier(z, self.count_noise)
        self._centred_count = 0.0
        self.released_counts: list[float] = []

    def _reduce_grad_samples(self) -> None:
        for p in self.params:
            gs = self._get_flat_grad_sample(p)
            if self.augmult > 1 and len(gs) > 0:
                if len(gs) % self.augmult:
                    raise ValueError(f"{len(gs)} per-sample gradients are not K={self.augmult} copies per record")
                gs = gs.reshape(len(gs) // self.augmult, self.augmult, *gs.shape[1:]).mean(dim=1)
            if self.mask is not None:
                gs = gs * self.mask[p].to(gs.dtype)
            p.grad_sample = gs

    def clip_and_accumulate(self) -> None:
        self._reduce_grad_samples()
        if self.quantile_clip is not None and len(self.grad_samples[0]) > 0:
            rows = [g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples]
            norms = torch.stack(rows, dim=1).norm(2, dim=1)
            self._centred_count += float((norms <= self.max_grad_norm).sum()) - 0.5 * len(norms)
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        std = float(self.gradient_noise_multiplier) * float(self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noisy = gaussian_noised(p.summed_grad, std, self.generator, p.summed_grad.dtype)
            if self.mask is not None:
                noisy = noisy * self.mask[p].to(noisy.dtype)
            p.grad = noisy.view_as(p)
            _mark_as_processed(p.summed_grad)
        if self.quantile_clip is not None:
            ref = self.params[0].summed_grad
            count = torch.tensor([self._centred_count], dtype=torch.float64, device=ref.device)
            self._released = float(gaussian_noised(count, self.count_noise, self.generator, torch.float64)[0])

    def pre_step(self, closure=None):
        done = super().pre_step(closure)
        if done and self.quantile_clip is not None:
            # post-processing of the released noisy count: the next step's clip is public
            self.released_counts.append(self._released)
            self.max_grad_norm = self.quantile_clip.update(self._released)
            self._centred_count = 0.0
        return done
