"""Calibration: the one search for "the least noise that stays within the budget".

:func:`calibrate` is the single bisection of the privacy layer (it replaces four hand-written
ones: the adaptive schedule's, the record-level calibration with prior spend, the exact
conversion's and the constant-z search). It returns the smallest ``x`` with
``fn(x) <= target`` for a non-increasing ``fn``, and it never lands on the unsafe side: the
value returned always satisfies ``fn(x) <= target`` (it is the upper, feasible end of the
final bracket), whatever the tolerance. Written by hand because Opacus' own
``get_noise_multiplier`` calibrates from zero prior spend only; where that is the case
(:func:`calibrate_noise_multiplier`), Opacus' routine is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from opacus.accountants.utils import get_noise_multiplier

from ..errors import PrivacyConfigError
from .epsilon import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, _check_delta, _quiet, epsilon_gaussian


def calibrate(
    fn: Callable[[float], float],
    target: float,
    *,
    upper: float = MAX_NOISE_MULTIPLIER,
    lower: float = 1e-6,
    start: float | None = None,
    rtol: float = 1e-4,
    stop_within: float = 0.0,
) -> float:
    """Smallest ``x`` in ``[lower, upper]`` (to relative tolerance ``rtol``) with
    ``fn(x) <= target``, for ``fn`` non-increasing in ``x`` (a noise multiplier -> the
    epsilon it costs; an epsilon -> the delta it holds at).

    Args:
        fn: the non-increasing function (each value is computed once).
        target: the bound ``fn`` must stay within.
        upper / lower: the search range; ``x`` below ``lower`` is never returned (the
            update-level filter is used down to z ~ 1e-3, so the default floor is 1e-6).
        start: where the bracket search begins (default ``upper``): halving while
            feasible, doubling (up to ``upper``) while not.
        rtol: stop once the bracket ``[lo, hi]`` has ``hi / lo <= 1 + rtol``.
        stop_within: stop early once ``fn(hi) >= target - stop_within`` (close enough).

    Returns:
        ``hi``: always with ``fn(hi) <= target``.

    Raises:
        PrivacyConfigError: ``fn(upper) > target`` (the target cannot be met in range).
    """
    if not (0 < lower <= upper and math.isfinite(upper)):
        raise PrivacyConfigError(f"calibration range must satisfy 0 < lower <= upper < inf, got [{lower}, {upper}]")
    cache: dict = {}

    def f(x: float) -> float:
        if x not in cache:
            cache[x] = float(fn(x))
        return cache[x]

    def close(x: float) -> bool:
        return stop_within > 0 and f(x) >= target - stop_within

    if f(upper) > target:
        raise PrivacyConfigError(f"target {target:.6g} is unreachable: even {upper:g} gives {f(upper):.6g}")
    hi = upper if start is None else min(max(float(start), lower), upper)
    if f(hi) > target:  # grow until feasible (upper is)
        lo = hi
        while f(hi) > target:
            lo, hi = hi, min(2.0 * hi, upper)
    else:  # shrink while feasible
        while True:
            if close(hi):
                return hi
            lo = hi / 2.0
            if lo < lower:
                if f(lower) <= target:
                    return lower
                lo = lower
                break
            if f(lo) > target:
                break
            hi = lo
    while hi / lo > 1.0 + rtol and not close(hi):
        mid = math.sqrt(lo * hi)
        if f(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


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


__all__ = ["calibrate", "calibrate_noise_multiplier"]
