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

from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from adpfl.privacy.mechanisms import gaussian_noised

__all__ = ["Float64NoiseDPOptimizer"]


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
