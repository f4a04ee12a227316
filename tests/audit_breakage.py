"""Deliberately broken release paths for the privacy audits (test and bench harness only).

Each context manager breaks one shipped mechanism behind the accountant's back, by
monkeypatching, and restores it on exit; no filter or trainer setting can reach them. An
audit that does not report a lower bound above the claimed epsilon under them is broken.

* ``update_noise_scaled(f)``: the update-level filter's Gaussian draws use ``std * f``
  (``adpfl.privacy.pipeline.add_gaussian_noise``) while the ledger accounts the stated z.
* ``update_clip_skipped()``: the filter's L2 clip returns the update unchanged.
* ``dpsgd_noise_scaled(f)``: DP-SGD's float64 step noise uses ``std * f``
  (``adpfl.training.dp_noise.gaussian_noised``) while the RDP accountant counts z.
* ``dpsgd_clip_skipped()``: Opacus' per-sample clipping is skipped (gradients summed as they are).
"""

from __future__ import annotations

import contextlib

import adpfl.privacy.pipeline as pipeline
import adpfl.training.dp_noise as dp_noise


@contextlib.contextmanager
def _patched(owner, name, replacement):
    saved = getattr(owner, name)
    setattr(owner, name, replacement(saved))
    try:
        yield
    finally:
        setattr(owner, name, saved)


def update_noise_scaled(factor: float = 0.25):
    return _patched(pipeline, "add_gaussian_noise",
                    lambda orig: lambda flat, std, gen: orig(flat, std * factor, gen))


def update_clip_skipped():
    return _patched(pipeline, "clip_l2", lambda orig: lambda flat, clip_norm: (flat, flat.norm()))


def dpsgd_noise_scaled(factor: float = 0.25):
    return _patched(dp_noise, "gaussian_noised",
                    lambda orig: lambda values, std, gen, dtype: orig(values, std * factor, gen, dtype))


def dpsgd_clip_skipped():
    from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

    def unclipped(orig):
        def clip_and_accumulate(self):
            for p in self.params:
                _check_processed_flag(p.grad_sample)
                grad = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)
        return clip_and_accumulate

    return _patched(DPOptimizer, "clip_and_accumulate", unclipped)


BREAKAGES = {
    "update": {"noise / 4": lambda: update_noise_scaled(0.25), "clipping skipped": update_clip_skipped},
    "dpsgd": {"noise / 4": lambda: dpsgd_noise_scaled(0.25), "clipping skipped": dpsgd_clip_skipped},
}
