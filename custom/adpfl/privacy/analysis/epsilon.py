"""Epsilon of composed Gaussian releases: thin wrappers over Opacus' RDP and PRV
accountants, and the exact composed-Gaussian conversion (moved from privacy/accounting.py).

Conventions: one accountant step per round, sample rate 1.0, noise multiplier
``z = sigma / sensitivity`` (see docs/privacy-model.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from ..errors import PrivacyConfigError

ACCOUNTANTS = ("rdp", "prv")
MECHANISMS = ("gaussian", "laplace")
MAX_NOISE_MULTIPLIER = 1e3
#: below this noise multiplier Opacus's PRV accountant returns inf or needs gigabytes of
#: memory (measured: z=0.05 -> inf after 1.5 s, z=1e-3 -> >14 GB); the ledger then
#: records no PRV figure and RDP (always computed) is the stated one.
PRV_MIN_NOISE_MULTIPLIER = 0.1


@contextmanager
def _quiet():
    """Silence Opacus' harmless warnings at sample rate 1: PRV's log(0), and RDP's
    "optimal order is the largest alpha" (the bound stays a valid upper bound)."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def _check_z(z: float) -> float:
    z = float(z)
    if not (z > 0 and math.isfinite(z)):
        raise PrivacyConfigError(f"noise multiplier must be positive and finite, got {z}")
    return z


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
    return delta


def grouped_history(history: Iterable[Sequence[float]]) -> list[tuple[float, float, int]]:
    """An Opacus history ``[(z, q, steps)]`` with the steps of equal ``(z, q)`` added up. RDP
    composes by summation and Opacus computes ``steps`` identical steps as ``steps`` times one
    step's RDP, so the grouped history has the same epsilon (PRV too: its composition is by
    counts) -- and costs one evaluation per distinct ``(z, q)`` instead of one per round."""
    steps: dict[tuple[float, float], int] = {}
    for z, q, n in history:
        key = (float(z), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(z, q, n) for (z, q), n in steps.items()]


def group_history(noise_multipliers: Iterable[float]) -> list[tuple[float, float, int]]:
    """The Opacus history of update-level releases: one step per round at sample rate 1."""
    return grouped_history((_check_z(z), 1.0, 1) for z in noise_multipliers)


@lru_cache(maxsize=8192)
def _one_step_rdp(q: float, z: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus' RDP of ONE subsampled-Gaussian step at ``(q, z)`` on ``orders`` (read-only).
    ``compute_rdp`` is linear in the steps (Opacus returns ``steps * one step``), so a
    history's RDP is ``sum(steps * one_step_rdp)``; cached because the fractional orders
    cost ~0.2 s per ``(q, z)`` and a ledger's rounds repeat them."""
    with _quiet():
        out = np.asarray(rdp_analysis.compute_rdp(q=float(q), noise_multiplier=float(z), steps=1, orders=list(orders)),
                         dtype=float)
    out.setflags(write=False)
    return out


def history_rdp(history: Iterable[Sequence[float]], orders: Sequence[float] = tuple(RDPAccountant.DEFAULT_ALPHAS)):
    """Opacus RDP curve (on ``orders``) of a history ``[(z, q, steps), ...]``; None when empty."""
    orders = tuple(float(a) for a in orders)
    total = None
    for z, q, n in grouped_history(history):
        if n > 0:
            term = n * _one_step_rdp(float(q), _check_z(z), orders)
            total = term if total is None else total + term
    return total


def rdp_to_epsilon(rdp, delta: float, orders: Sequence[float] = tuple(RDPAccountant.DEFAULT_ALPHAS)) -> float:
    """Opacus' ``get_privacy_spent`` of an RDP curve (0 for None: nothing spent)."""
    if rdp is None:
        return 0.0
    with _quiet():
        return float(rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=_check_delta(delta))[0])


def history_epsilon_rdp(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon of an Opacus history ``[(z, q, steps), ...]``: what a fresh ``RDPAccountant``
    with that history returns (its ``compute_rdp`` per entry summed, ``get_privacy_spent`` on
    its default orders), with each distinct ``(z, q)`` computed once (:func:`_one_step_rdp`)."""
    delta = _check_delta(delta)
    return rdp_to_epsilon(history_rdp(history), delta)


def epsilon_rdp(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon of Gaussian releases at ``noise_multipliers`` (one per round), RDP accountant."""
    return history_epsilon_rdp(group_history(noise_multipliers), delta)


def epsilon_prv(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon of Gaussian releases at ``noise_multipliers``, PRV accountant (upper
    estimate, ``eps_error=0.01``). Raises ValueError below PRV_MIN_NOISE_MULTIPLIER
    or when the PRV numerics give a non-finite value."""
    return history_epsilon_prv(group_history(noise_multipliers), delta)


def history_epsilon_prv(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon of an Opacus history ``[(z, q, steps), ...]`` with a fresh PRVAccountant (the
    tighter figure reported beside RDP; record-level DP-SGD histories and update-level ones
    alike). Raises ValueError below PRV_MIN_NOISE_MULTIPLIER or for a non-finite result."""
    delta = _check_delta(delta)
    history = grouped_history(history)
    small = [z for z, _, _ in history if float(z) < PRV_MIN_NOISE_MULTIPLIER]
    if small:
        raise ValueError(
            f"PRV accountant not used below noise multiplier {PRV_MIN_NOISE_MULTIPLIER} (got {min(small):.3g}); "
            "use the RDP figure"
        )
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    acc = PRVAccountant()
    acc.history = history
    # Opacus' PRV code takes log(0) harmlessly at sample rate 1.
    with _quiet():
        eps = float(acc.get_epsilon(delta=delta))
    if not math.isfinite(eps):
        raise ValueError(f"PRV accountant gave a non-finite epsilon ({eps}); use the RDP figure")
    return eps


def epsilon_exact(noise_multipliers: Sequence[float], delta: float) -> float:
    """Exact epsilon of composed Gaussian releases at sample rate 1.

    Without subsampling, T Gaussian releases with multipliers z_t compose exactly into one
    Gaussian mechanism with mu = sqrt(sum 1/z_t^2) (Dong, Roth & Su 2019, mu-GDP), whose
    (epsilon, delta) curve is delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    (Balle & Wang 2018). Solved for eps in log space, so it holds at any z, including the
    z ~ 1e-3 of useful update-level noise where Opacus's PRV accountant fails. Not Opacus's
    GDP accountant (a CLT approximation for subsampled steps): no approximation here.
    Written by hand because neither Opacus nor MONAI provides the exact conversion.
    """
    from scipy.special import log_ndtr

    delta = _check_delta(delta)
    zs = [_check_z(z) for z in noise_multipliers]
    if not zs:
        return 0.0
    mu = math.sqrt(sum(1.0 / (z * z) for z in zs))
    log_delta = math.log(delta)

    def log_delta_of(eps: float) -> float:
        log_a = float(log_ndtr(-eps / mu + mu / 2.0))
        log_b = eps + float(log_ndtr(-eps / mu - mu / 2.0))
        if log_b >= log_a:
            return -math.inf
        return log_a + math.log1p(-math.exp(log_b - log_a))

    if log_delta_of(0.0) <= log_delta:
        return 0.0
    from .calibrate import calibrate

    hi = max(1.0, mu * mu)
    while log_delta_of(hi) > log_delta:
        hi *= 2.0
    # smallest eps whose delta(eps) is within delta: the safe (upper) end of the bracket
    return calibrate(log_delta_of, log_delta, upper=hi, lower=hi * 1e-12, rtol=1e-9)


def epsilon_gaussian(noise_multipliers: Sequence[float], delta: float, accountant: str = "rdp") -> float:
    if accountant == "rdp":
        return epsilon_rdp(noise_multipliers, delta)
    if accountant == "prv":
        return epsilon_prv(noise_multipliers, delta)
    raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


@lru_cache(maxsize=4096)
def _rdp_curve_one_step(z: float) -> np.ndarray:
    return np.asarray(
        rdp_analysis.compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS),
        dtype=np.float64,
    )


class RdpSearch:
    """Fast RDP epsilon of ``history + extra`` for repeated queries (bisection).

    Sums Opacus' per-order RDP curves (the same quantities RDPAccountant sums) with the
    history's curve computed once.
    """

    def __init__(self, history: Sequence[float], delta: float):
        self.delta = _check_delta(delta)
        self.base = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
        for z in history:
            self.base = self.base + _rdp_curve_one_step(_check_z(z))

    def epsilon(self, extra: Sequence[tuple[float, int]]) -> float:
        rdp = self.base.copy()
        for z, steps in extra:
            if steps > 0:
                rdp = rdp + steps * _rdp_curve_one_step(float(z))
        if not np.any(rdp):
            return 0.0
        with _quiet():
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)
        return float(eps)



__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "MECHANISMS",
    "PRV_MIN_NOISE_MULTIPLIER",
    "RdpSearch",
    "epsilon_exact",
    "epsilon_gaussian",
    "epsilon_prv",
    "epsilon_rdp",
    "group_history",
    "grouped_history",
    "history_epsilon_rdp",
]
