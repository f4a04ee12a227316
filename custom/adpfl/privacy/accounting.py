"""Privacy accounting with Opacus accountants, and the site's persistent ledger.

Conventions (see shared/design/privacy-model.md):

* Gaussian releases: one accountant step per round, sample rate 1.0, noise multiplier
  ``z = sigma / sensitivity`` with replace-one sensitivity ``2 * C``. The multiplier
  recorded and accounted is the *effective* one (the update's noise composed with the
  adaptive clipper's noisy indicator, see :mod:`adpfl.privacy.adaptive`).
* Laplace releases are pure epsilon-DP: a round at ``z = b / (2 * C_1)`` costs
  ``epsilon_round = 1 / z``. Mixed ledgers compose by basic composition:
  ``epsilon = sum(laplace epsilon_round) + epsilon_gaussian(delta)`` at the ledger's
  delta (the Laplace part adds no delta). In practice a ledger holds one mechanism.
* The budget is enforced with the ledger's ``accountant`` ("rdp" by default, the
  conservative figure). PRV is recorded alongside as the tighter figure; it is slower
  (about 0.1 s per distinct multiplier), so it can be turned off with
  ``track_prv=False`` (the entries then carry ``epsilon_prv=None``).
* Re-recording the same ``(job_id, round)`` is REFUSED (:class:`PrivacyError`): a second
  noisy release of the same round costs privacy again and is not idempotent. To resend
  a round, resend the cached released update (post-processing, free).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from adpfl._io import write_json_atomic

from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError

ACCOUNTANTS = ("rdp", "prv")
MECHANISMS = ("gaussian", "laplace")
MAX_NOISE_MULTIPLIER = 1e3
#: below this noise multiplier Opacus's PRV accountant returns inf or needs gigabytes of
#: memory (measured: z=0.05 -> inf after 1.5 s, z=1e-3 -> >14 GB); the ledger then
#: records no PRV figure and RDP (always computed) is the stated one.
PRV_MIN_NOISE_MULTIPLIER = 0.1
LEDGER_FORMAT = "adpfl-privacy-ledger"
LEDGER_VERSION = 1


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


def group_history(noise_multipliers: Iterable[float]) -> list[tuple[float, float, int]]:
    """Opacus history ``[(z, sample_rate=1.0, steps)]``, consecutive equal z grouped."""
    history: list[tuple[float, float, int]] = []
    for z in noise_multipliers:
        z = _check_z(z)
        if history and history[-1][0] == z:
            history[-1] = (z, 1.0, history[-1][2] + 1)
        else:
            history.append((z, 1.0, 1))
    return history


def epsilon_rdp(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon of Gaussian releases at ``noise_multipliers`` (one per round), RDP accountant."""
    delta = _check_delta(delta)
    history = group_history(noise_multipliers)
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = history
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


def epsilon_prv(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon of Gaussian releases at ``noise_multipliers``, PRV accountant (upper
    estimate, ``eps_error=0.01``). Raises ValueError below PRV_MIN_NOISE_MULTIPLIER
    or when the PRV numerics give a non-finite value."""
    delta = _check_delta(delta)
    small = [z for z in noise_multipliers if float(z) < PRV_MIN_NOISE_MULTIPLIER]
    if small:
        raise ValueError(
            f"PRV accountant not used below noise multiplier {PRV_MIN_NOISE_MULTIPLIER} (got {min(small):.3g}); "
            "use the RDP figure"
        )
    history = group_history(noise_multipliers)
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
    lo, hi = 0.0, max(1.0, mu * mu)
    while log_delta_of(hi) > log_delta:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if log_delta_of(mid) > log_delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
    return hi


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


# ------------------------------------------------------------------------ ledger
@dataclass
class PrivacyLedger:
    """Per-site record of every update release (persisted in the site's workspace).

    Entry fields: ``job_id, round, mechanism, noise_multiplier`` (effective z accounted),
    ``update_noise_multiplier, clip_norm, keep_fraction, mask_policy, mask_covered,
    epsilon_rdp, epsilon_prv`` (cumulative over the whole ledger), and ``epsilon_round``
    for Laplace entries.
    """

    delta: float
    target_epsilon: float | None = None
    accountant: str = "rdp"
    track_prv: bool = True
    entries: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.delta = _check_delta(self.delta)
        if self.target_epsilon is not None and not (self.target_epsilon > 0):
            raise PrivacyConfigError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    # -- queries
    def gaussian_multipliers(self) -> list[float]:
        return [float(e["noise_multiplier"]) for e in self.entries if e["mechanism"] == "gaussian"]

    def laplace_epsilon(self) -> float:
        return float(sum(float(e["epsilon_round"]) for e in self.entries if e["mechanism"] == "laplace"))

    def _epsilon_of(self, gaussian_zs: list[float], laplace_eps: float, accountant: str) -> float:
        return epsilon_gaussian(gaussian_zs, self.delta, accountant) + laplace_eps

    def epsilon(self, accountant: str | None = None) -> float:
        """Cumulative epsilon at the ledger's delta."""
        return self._epsilon_of(self.gaussian_multipliers(), self.laplace_epsilon(), accountant or self.accountant)

    def projected_epsilon(
        self, next_noise_multiplier: float, accountant: str | None = None, mechanism: str = "gaussian"
    ) -> float:
        """Cumulative epsilon if one more release at ``next_noise_multiplier`` happened."""
        z = _check_z(next_noise_multiplier)
        zs, lap = self.gaussian_multipliers(), self.laplace_epsilon()
        if mechanism == "gaussian":
            zs = zs + [z]
        elif mechanism == "laplace":
            lap += 1.0 / z
        else:
            raise PrivacyConfigError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        return self._epsilon_of(zs, lap, accountant or self.accountant)

    def has_round(self, round_index: int, job_id: str | None = None) -> bool:
        return any(e["round"] == int(round_index) and e.get("job_id") == job_id for e in self.entries)

    def rounds(self, job_id: str | None = None) -> list[int]:
        return [e["round"] for e in self.entries if e.get("job_id") == job_id]

    def remaining_epsilon(self) -> float | None:
        return None if self.target_epsilon is None else self.target_epsilon - self.epsilon()

    # -- recording
    def record(
        self,
        *,
        round: int,
        noise_multiplier: float,
        clip_norm: float,
        keep_fraction: float = 1.0,
        mask_policy: str = "none",
        mask_covered: bool = True,
        mechanism: str = "gaussian",
        update_noise_multiplier: float | None = None,
        job_id: str | None = None,
    ) -> dict[str, Any]:
        """Append one release and return the entry (with cumulative epsilons).

        Refuses (ledger unchanged) a repeated ``(job_id, round)`` with PrivacyError and a
        release beyond ``target_epsilon`` (by the ledger's accountant) with
        BudgetExhausted.
        """
        if mechanism not in MECHANISMS:
            raise PrivacyConfigError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        z = _check_z(noise_multiplier)
        if self.has_round(round, job_id):
            raise PrivacyError(
                f"round {round} of job {job_id!r} is already in the privacy ledger; a second noisy "
                "release of the same round would cost privacy again (resend the cached release instead)"
            )
        zs, lap = self.gaussian_multipliers(), self.laplace_epsilon()
        entry: dict[str, Any] = {
            "job_id": job_id,
            "round": int(round),
            "mechanism": mechanism,
            "noise_multiplier": z,
            "update_noise_multiplier": float(z if update_noise_multiplier is None else update_noise_multiplier),
            "clip_norm": float(clip_norm),
            "keep_fraction": float(keep_fraction),
            "mask_policy": str(mask_policy),
            "mask_covered": bool(mask_covered),
        }
        if mechanism == "gaussian":
            zs = zs + [z]
        else:
            entry["epsilon_round"] = 1.0 / z
            lap += 1.0 / z
        entry["epsilon_rdp"] = self._epsilon_of(zs, lap, "rdp")
        # exact conversion of the composed Gaussian (sample rate 1); Gaussian-only ledgers
        entry["epsilon_exact"] = epsilon_exact(zs, self.delta) if lap == 0 else None
        entry["epsilon_prv"] = None
        if self.track_prv:
            try:
                entry["epsilon_prv"] = self._epsilon_of(zs, lap, "prv")
            except Exception:  # PRV numerics can fail at extreme z; RDP stays authoritative
                entry["epsilon_prv"] = None
        spent = entry["epsilon_rdp"] if self.accountant == "rdp" else entry["epsilon_prv"]
        if spent is None:
            spent = entry["epsilon_rdp"]
        if self.target_epsilon is not None and spent > self.target_epsilon:
            raise BudgetExhausted(
                f"recording round {round} would bring epsilon to {spent:.4f} > target_epsilon="
                f"{self.target_epsilon} (delta={self.delta}, {self.accountant})"
            )
        self.entries.append(entry)
        return dict(entry)

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "track_prv": self.track_prv,
            "sensitivity_convention": "replace-one, sensitivity = 2 * clip_norm; sample rate 1, one step per round",
            "entries": [dict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrivacyLedger":
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise PrivacyError(f"not a privacy ledger (format field is not {LEDGER_FORMAT!r})")
        if data.get("version") != LEDGER_VERSION:
            raise PrivacyError(f"unsupported privacy ledger version {data.get('version')!r}")
        ledger = cls(
            delta=data["delta"],
            target_epsilon=data.get("target_epsilon"),
            accountant=data.get("accountant", "rdp"),
            track_prv=bool(data.get("track_prv", True)),
        )
        required = ("round", "mechanism", "noise_multiplier", "clip_norm")
        for i, e in enumerate(data.get("entries", [])):
            if not isinstance(e, dict) or any(k not in e for k in required):
                raise PrivacyError(f"privacy ledger entry {i} lacks one of {required}")
            if e["mechanism"] not in MECHANISMS:
                raise PrivacyError(f"privacy ledger entry {i} has unknown mechanism {e['mechanism']!r}")
            _check_z(e["noise_multiplier"])
            if e["mechanism"] == "laplace" and "epsilon_round" not in e:
                raise PrivacyError(f"privacy ledger entry {i} (laplace) lacks epsilon_round")
            ledger.entries.append(dict(e))
        return ledger

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write (see :func:`write_json_atomic`)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrivacyLedger":
        """Load a saved ledger; PrivacyError naming the file if it is corrupt
        (FileNotFoundError if absent; see :meth:`load_or_create`)."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, PrivacyError, KeyError, TypeError, ValueError) as exc:
            raise PrivacyError(f"privacy ledger file {path} is corrupt or invalid: {exc}") from exc

    @classmethod
    def load_or_create(
        cls, path: str | os.PathLike, delta: float, target_epsilon: float | None = None, **kwargs: Any
    ) -> "PrivacyLedger":
        """Load ``path`` if it exists (its delta must match), else a new empty ledger."""
        if os.path.exists(path):
            ledger = cls.load(path)
            if abs(ledger.delta - float(delta)) > 0:
                raise PrivacyConfigError(
                    f"privacy ledger {os.fspath(path)} uses delta={ledger.delta}, the job asks delta={delta}"
                )
            if target_epsilon is not None:
                ledger.target_epsilon = float(target_epsilon)
            return ledger
        return cls(delta=delta, target_epsilon=target_epsilon, **kwargs)


__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "PrivacyLedger",
    "RdpSearch",
    "calibrate_noise_multiplier",
    "epsilon_gaussian",
    "epsilon_exact",
    "epsilon_prv",
    "epsilon_rdp",
    "group_history",
]
