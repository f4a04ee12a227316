"""ADP-SGD: the ADP-FL paper's adaptivity inside record-level DP-SGD (pure math, no FLARE).

Unit of privacy: **one training record** (one image; one patient in 3D), add/remove-one,
Poisson sampling at rate ``q``. Three adaptive parts, each accounted:

1. **Adaptive per-sample clip** (Andrew et al. 2021, "Differentially Private Learning with
   Adaptive Clipping"), per optimizer step: besides the clipped gradient sum each step
   releases the noisy *centred* count of records whose gradient was not clipped,
   ``sum_{i in B} (1[||g_i|| <= C] - 1/2) + N(0, sigma_b^2)``. Adding or removing one record
   moves it by 1/2 (sensitivity 1/2), the gradient sum by at most ``C``; both use the same
   Poisson batch, so the pair is one subsampled Gaussian mechanism with the effective
   multiplier ``z = (z_g^-2 + (2 sigma_b)^-2)^-1/2`` (their Theorem 1). The ledger accounts
   ``z``; the gradient noise uses ``z_g`` derived from it (:func:`gradient_noise_multiplier`).
   The unclipped fraction is estimated as ``noisy_centred_count / E[B] + 1/2`` with the
   PUBLIC expected batch size ``E[B]`` -- never the realised (private) batch size -- and the
   clip follows ``C <- C * exp(-eta (fraction - gamma))`` (:class:`QuantileClip`), which is
   post-processing of released values, so ``C_t`` is public.

   Why not Opacus' ``AdaClipDPOptimizer`` (1.6): it divides the noisy count by the realised
   batch size (a private value that is not noised) and counts uncentred indicators
   (sensitivity 1) while its noise adjustment uses the ``2 sigma_b`` of the centred count
   (sensitivity 1/2): its stated multiplier under-counts the spend. Hence this module.
2. **Progress-driven noise schedule** under the fixed record-level budget
   (:class:`RecordNoiseSchedule`): before each round the effective ``z_t`` is re-planned
   from the site's record ledger (every job's spend on these records) and a public signal
   (the relative change of the global model, :mod:`adpfl.privacy.public_signals`, or the
   round index) with the rule of :class:`adpfl.privacy.schedule.AdaptiveNoiseSchedule` --
   here over rounds of ``steps_per_round`` Poisson steps at rate ``q`` instead of one
   release at rate 1. The plan is computed with Opacus' RDP analysis on the integer orders
   of Opacus' default grid (about 30x faster than the fractional ones; a subset of the
   orders can only give a larger epsilon, so the plan errs on the safe side), and the last
   planned round is calibrated on the full grid so the planned total meets the target. The
   budget check of the reservation
   (:mod:`adpfl.privacy.reservation`, full Opacus RDP) enforces it.
3. **Data-independent sparsification** (optional ``keep_fraction``): a random coordinate
   mask drawn from fresh OS randomness once per round; per-sample gradients are masked
   *before* clipping and the noise is added on the kept coordinates only, so the
   sensitivity stays ``C`` and nothing about the mask depends on the data.

Every step's ``(z, q)`` goes into the record ledger as a heterogeneous history; epsilon
is enforced with Opacus RDP and reported with Opacus PRV as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from opacus.accountants import RDPAccountant

from .analysis import calibrate, history_rdp, rdp_to_epsilon
from .errors import PrivacyConfigError
from .ledger import PrivacyLedger
from .record import CALIBRATION_MARGIN
from .schedule import AdaptiveNoiseSchedule

#: the integer orders of Opacus' default RDP grid (the plan's; see the module docstring)
_PLAN_ORDERS = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer())

__all__ = [
    "QuantileClip",
    "RecordNoiseSchedule",
    "effective_noise_multiplier",
    "gradient_noise_multiplier",
]


def effective_noise_multiplier(gradient_z: float, count_noise: float) -> float:
    """The one Gaussian mechanism equivalent to gradient noise ``z_g`` plus a centred count
    with noise std ``sigma_b`` (Andrew et al. 2021, Theorem 1): ``(z_g^-2 + (2 sigma_b)^-2)^-1/2``."""
    if not (gradient_z > 0 and count_noise > 0):
        raise PrivacyConfigError(f"noise multipliers must be positive, got z_g={gradient_z}, sigma_b={count_noise}")
    return (gradient_z ** -2 + (2.0 * count_noise) ** -2) ** -0.5


def gradient_noise_multiplier(effective_z: float, count_noise: float) -> float:
    """The gradient's multiplier ``z_g`` that, with the count's noise ``sigma_b``, spends
    exactly the effective ``z``: ``(z^-2 - (2 sigma_b)^-2)^-1/2``. Needs ``2 sigma_b > z``
    (PrivacyConfigError naming the setting otherwise)."""
    if not 2.0 * count_noise > effective_z:
        raise PrivacyConfigError(
            f"adaptive clipping needs 2 * dpsgd_clip_count_noise > the effective noise multiplier: "
            f"2 * {count_noise:g} <= z={effective_z:.4g}; raise dpsgd_clip_count_noise"
        )
    return (effective_z ** -2 - (2.0 * count_noise) ** -2) ** -0.5


class QuantileClip:
    """Geometric clip update towards the ``target_quantile`` of per-sample gradient norms
    from released noisy centred counts (see the module docstring; hand-written because
    Opacus' AdaClipDPOptimizer normalises by the private realised batch size)."""

    def __init__(self, clip: float, target_quantile: float, learning_rate: float, expected_batch_size: float,
                 clip_min: float = 1e-3, clip_max: float = 1e3):
        if not (0 < target_quantile < 1):
            raise PrivacyConfigError(f"dpsgd_clip_quantile must be in (0, 1), got {target_quantile}")
        if not (learning_rate >= 0 and math.isfinite(learning_rate)):
            raise PrivacyConfigError(f"dpsgd_clip_learning_rate must be finite and >= 0, got {learning_rate}")
        if not (0 < clip_min <= clip <= clip_max):
            raise PrivacyConfigError(f"clip {clip} must lie in [{clip_min}, {clip_max}]")
        if not expected_batch_size > 0:
            raise PrivacyConfigError(f"expected batch size must be positive, got {expected_batch_size}")
        self.clip = float(clip)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.expected_batch_size = float(expected_batch_size)
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)

    def fraction(self, noisy_centred_count: float) -> float:
        """Estimated unclipped fraction from a released count (public normaliser E[B])."""
        return float(noisy_centred_count) / self.expected_batch_size + 0.5

    def update(self, noisy_centred_count: float) -> float:
        """The next clip from one step's released noisy centred count; returns it."""
        frac = self.fraction(noisy_centred_count)
        self.clip = min(self.clip_max, max(self.clip_min,
                                           self.clip * math.exp(-self.learning_rate * (frac - self.target_quantile))))
        return self.clip

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state.get("clip", self.clip))


class RecordNoiseSchedule(AdaptiveNoiseSchedule):
    """The adaptive noise schedule of the update-level filter, re-used at record level: one
    "release" here is a round of ``steps_per_round`` DP-SGD steps at sample rate ``q``, and
    the ledger is the site's record ledger (duck-typed: ``history()`` -> ``[(z, q, steps)]``
    and ``delta``). Multipliers are effective ones (what the ledger accounts)."""

    def __init__(self, target_epsilon: float, delta: float, planned_rounds: int, sample_rate: float,
                 steps_per_round: int, min_factor: float = 0.5, max_factor: float = 1.5, rtol: float = 1e-3):
        if not (0 < sample_rate <= 1):
            raise PrivacyConfigError(f"sample rate must be in (0, 1], got {sample_rate}")
        if int(steps_per_round) < 1:
            raise PrivacyConfigError(f"steps_per_round must be >= 1, got {steps_per_round}")
        self.sample_rate = float(sample_rate)
        self.steps_per_round = int(steps_per_round)
        super().__init__(target_epsilon, delta, planned_rounds, accountant="rdp", min_factor=min_factor,
                         max_factor=max_factor, rtol=rtol)

    def _eps_function(self, ledger: Any) -> Callable[[list[tuple[float, int]]], float]:
        """``extra = [(z, rounds), ...]`` -> Opacus RDP epsilon of the ledger's history plus
        those rounds (what ``RDPAccountant.get_epsilon`` computes, with the prior's RDP
        computed once per plan)."""
        history = [] if isinstance(ledger, PrivacyLedger) else list(ledger.history())
        if isinstance(ledger, PrivacyLedger) and ledger.entries:
            raise PrivacyConfigError("the record-level schedule needs a record ledger, not an update-level one")
        orders = _PLAN_ORDERS
        prior = history_rdp(history, orders)
        q, steps, delta = self.sample_rate, self.steps_per_round, self.delta

        def eps(extra: list[tuple[float, int]]) -> float:
            rdp = history_rdp([(z, q, int(rounds) * steps) for z, rounds in extra], orders)
            if prior is not None:
                rdp = prior if rdp is None else prior + rdp
            return rdp_to_epsilon(rdp, delta, orders)

        return eps

    def next_noise_multiplier(self, ledger: Any, round_index: int, global_change: float | None = None) -> float:
        """Effective multiplier of round ``round_index`` (0-based) from the ledger's spend and
        the public progress signal; the last planned round spends exactly what is left."""
        z = super().next_noise_multiplier(ledger, round_index, global_change)
        if self.planned_rounds - int(round_index) <= 1:
            # the plan's integer orders overstate epsilon: on the full grid the last round may
            # use less noise, down to what spends exactly the rest (and never below the floor)
            prior = history_rdp(ledger.history())
            q, steps = self.sample_rate, self.steps_per_round

            def full(zz: float) -> float:
                new = history_rdp([(zz, q, steps)])
                return rdp_to_epsilon(new if prior is None else prior + new, self.delta)

            budget = self.target_epsilon * (1 - CALIBRATION_MARGIN)
            floor = max(0.8 * z, self.min_factor * self.z_plan)
            if floor < z and full(z) <= budget:
                z = calibrate(full, budget, upper=z, lower=floor, start=z, rtol=self.rtol,
                              stop_within=1e-3 * self.target_epsilon)
            self._last["z"] = z
        return float(z)
