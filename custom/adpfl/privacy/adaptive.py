"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"), for one site.

Each round the site computes the private indicator ``1[norm <= C]`` of its (kept)
update norm, adds Gaussian noise ``N(0, sigma_b^2)`` and moves ``C`` geometrically::

    b_noisy = 1[norm <= C] + N(0, sigma_b^2)
    C <- clamp(C * exp(-eta * (b_noisy - gamma)), min_clip_norm, max_clip_norm)

so that ``C`` tracks the ``gamma`` quantile of the site's update norms. Neither the raw
norm nor the noisy indicator leaves this object; the next ``C`` is public (it is the
next round's sensitivity), which releases the noisy indicator, so its cost is
accounted:

The indicator has sensitivity 1 (replace-one) and noise multiplier ``sigma_b``; the
update has sensitivity ``2C`` and multiplier ``z_u``. Two Gaussian mechanisms on the
same data compose exactly into one Gaussian mechanism with

    1 / z_eff^2 = 1 / z_u^2 + 1 / sigma_b^2

(stack both outputs, each scaled by its own noise std: the joint L2 sensitivity is
``sqrt(1/z_u^2 + 1/sigma_b^2)`` in units of unit-variance noise). The ledger accounts
``z_eff``. With one site the indicator is a single bit per round, so a ``sigma_b`` small
enough for a useful C walk costs noticeable budget; the settings trade that off.

Laplace releases (``noise_type="laplace"``, the ADP-FL paper's noise: Laplace scaled to the
percentile clip threshold) draw the indicator's noise from ``Laplace(0, sigma_b)`` instead:
a pure ``1 / sigma_b``-DP mechanism each round (sensitivity 1), composed with the update's
``1 / z_u`` by basic composition into one effective multiplier

    1 / z_eff = 1 / z_u + 1 / sigma_b

so the ledger's Laplace entry (``epsilon_round = 1 / z_eff``) covers both. Written by hand:
Opacus accounts Gaussian mechanisms only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import PrivacyConfig, default_of
from .errors import PrivacyConfigError


def effective_noise_multiplier(z_update: float, sigma_b: float | None, mechanism: str = "gaussian") -> float:
    """Single multiplier equivalent to the update (``z_update``) plus the noisy indicator
    (``sigma_b``), Gaussian (squares add) or Laplace (epsilons add); ``sigma_b=None`` or
    ``inf`` means no indicator."""
    if not (z_update > 0 and math.isfinite(z_update)):
        raise PrivacyConfigError(f"update noise multiplier must be positive and finite, got {z_update}")
    if sigma_b is None or math.isinf(sigma_b):
        return float(z_update)
    if not sigma_b > 0:
        raise PrivacyConfigError(f"clip_indicator_noise (sigma_b) must be positive, got {sigma_b}")
    if mechanism == "laplace":
        return float(1.0 / (1.0 / z_update + 1.0 / sigma_b))
    return float(1.0 / math.sqrt(1.0 / z_update**2 + 1.0 / sigma_b**2))


def update_noise_multiplier_for(z_eff_target: float, sigma_b: float | None, mechanism: str = "gaussian") -> float:
    """Inverse of :func:`effective_noise_multiplier`: the update's multiplier ``z_u`` such
    that update + indicator together account as ``z_eff_target``. Requires
    ``sigma_b > z_eff_target``."""
    if not (z_eff_target > 0 and math.isfinite(z_eff_target)):
        raise PrivacyConfigError(f"effective noise multiplier must be positive and finite, got {z_eff_target}")
    if sigma_b is None or math.isinf(sigma_b):
        return float(z_eff_target)
    if not sigma_b > z_eff_target:
        raise PrivacyConfigError(
            f"clip_indicator_noise={sigma_b} is too small to afford effective noise multiplier "
            f"{z_eff_target:.4g}: it must exceed it (the indicator alone would cost more); "
            f"use clip_indicator_noise >= {3 * z_eff_target:.3g} or turn adaptive clipping off (clip_learning_rate=0)"
        )
    if mechanism == "laplace":
        return float(1.0 / (1.0 / z_eff_target - 1.0 / sigma_b))
    inv = 1.0 / z_eff_target**2 - 1.0 / sigma_b**2
    return float(1.0 / math.sqrt(inv))


class AdaptiveClipper:
    """Private quantile tracking of one site's update norms (geometric update).

    Args:
        initial_clip_norm: starting ``C``.
        target_quantile: ``gamma`` in (0, 1) (0.5 = median of update norms).
        learning_rate: ``eta`` >= 0 of the geometric update (0 = fixed clip).
        indicator_noise_std: ``sigma_b`` > 0, std of the indicator noise (Gaussian) or its
            scale (Laplace).
        min_clip_norm / max_clip_norm: clamps of ``C``.
        noise: ``"gaussian"`` or ``"laplace"``, the indicator's noise (that of the release).
    Defaults are those of :class:`adpfl.privacy.config.PrivacyConfig` (``clip_*`` settings).
    """

    def __init__(
        self,
        initial_clip_norm: float,
        target_quantile: float = default_of(PrivacyConfig, "clip_percentile"),
        learning_rate: float = default_of(PrivacyConfig, "clip_learning_rate"),
        indicator_noise_std: float = default_of(PrivacyConfig, "clip_indicator_noise"),
        min_clip_norm: float = default_of(PrivacyConfig, "clip_min"),
        max_clip_norm: float = default_of(PrivacyConfig, "clip_max"),
        noise: str = "gaussian",
    ):
        if not (0 < min_clip_norm <= initial_clip_norm <= max_clip_norm):
            raise PrivacyConfigError(
                f"need 0 < clip_min <= clip_norm <= clip_max, got {min_clip_norm}, {initial_clip_norm}, {max_clip_norm}"
            )
        if not (0.0 < target_quantile < 1.0):
            raise PrivacyConfigError(f"clip_percentile (target quantile) must be in (0, 1), got {target_quantile}")
        if not (learning_rate >= 0 and math.isfinite(learning_rate)):
            raise PrivacyConfigError(f"clip_learning_rate must be finite and >= 0, got {learning_rate}")
        if not (indicator_noise_std > 0 and math.isfinite(indicator_noise_std)):
            raise PrivacyConfigError(f"clip_indicator_noise must be positive and finite, got {indicator_noise_std}")
        if noise not in ("gaussian", "laplace"):
            raise PrivacyConfigError(f"indicator noise must be gaussian or laplace, got {noise!r}")
        self.noise = noise
        self.clip_norm = float(initial_clip_norm)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.indicator_noise_std = float(indicator_noise_std)
        self.min_clip_norm = float(min_clip_norm)
        self.max_clip_norm = float(max_clip_norm)
        self.updates = 0

    def update(self, pre_clip_norm: float | torch.Tensor, generator: torch.Generator) -> float:
        """One private step from this round's (kept) pre-clip norm; returns the new C."""
        norm = float(pre_clip_norm)
        if not math.isfinite(norm):
            raise PrivacyConfigError("pre-clip norm is not finite")
        indicator = 1.0 if norm <= self.clip_norm else 0.0
        if self.noise == "laplace":
            e = torch.empty(2, device=generator.device, dtype=torch.float64).exponential_(generator=generator)
            noise = float(e[0] - e[1])
        else:
            noise = float(torch.randn((), generator=generator, device=generator.device, dtype=torch.float64))
        b_noisy = indicator + self.indicator_noise_std * noise
        new_c = self.clip_norm * math.exp(-self.learning_rate * (b_noisy - self.target_quantile))
        self.clip_norm = float(min(self.max_clip_norm, max(self.min_clip_norm, new_c)))
        self.updates += 1
        return self.clip_norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "clip_norm": self.clip_norm,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "indicator_noise_std": self.indicator_noise_std,
            "min_clip_norm": self.min_clip_norm,
            "max_clip_norm": self.max_clip_norm,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the adaptive state (C and step count). The settings of this object
        (quantile, lr, sigma_b, clamps) stay those of the current config; the restored
        C is clamped into them."""
        c = float(state["clip_norm"])
        if not (c > 0 and math.isfinite(c)):
            raise PrivacyConfigError(f"saved clip_norm must be positive and finite, got {c}")
        self.clip_norm = min(self.max_clip_norm, max(self.min_clip_norm, c))
        self.updates = int(state.get("updates", 0))


__all__ = ["AdaptiveClipper", "effective_noise_multiplier", "update_noise_multiplier_for"]
