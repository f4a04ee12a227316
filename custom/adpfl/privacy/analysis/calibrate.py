"""Calibration of the noise multiplier to a target epsilon (moved from privacy/accounting.py)."""

from __future__ import annotations

import math

from opacus.accountants.utils import get_noise_multiplier

from ..errors import PrivacyConfigError
from .epsilon import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, _check_delta, _quiet, epsilon_gaussian


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    accountant: str = "rdp",
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Constant multiplier reaching ``target_epsilon`` after ``rounds`` releases
    (Opacus ``get_noise_multiplier``, sample rate 1, within 0.01 below the target).

    Raises :class:`PrivacyConfigError` (a ``ValueError``) if the target is unreachable
    with ``z <= max_noise_multiplier``.
    """
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    delta = _check_delta(delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    if int(rounds) != rounds or rounds < 1:
        raise PrivacyConfigError(f"rounds must be a positive integer, got {rounds}")
    rounds = int(rounds)
    floor = epsilon_gaussian([max_noise_multiplier] * rounds, delta, accountant)
    if floor >= target_epsilon:
        raise PrivacyConfigError(
            f"target_epsilon={target_epsilon} is unreachable in rounds={rounds} at delta={delta}: "
            f"even noise multiplier {max_noise_multiplier:g} gives epsilon {floor:.4g} ({accountant})"
        )
    with _quiet():
        z = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=1.0,
            steps=rounds,
            epochs=None,
            accountant=accountant,
        )
    if z > max_noise_multiplier:
        raise PrivacyConfigError(
            f"target_epsilon={target_epsilon} is unreachable in rounds={rounds} at delta={delta}: "
            f"it needs noise multiplier {z:g} > {max_noise_multiplier:g}"
        )
    return float(z)


__all__ = ["calibrate_noise_multiplier"]
