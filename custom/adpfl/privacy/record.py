"""Record-level (DP-SGD) accounting and the site's record-level ledger (moved from
training/dpsgd.py, so the server's widget computes record-level epsilons without
importing the trainer). Unit of privacy: one training record; see docs/privacy-model.md.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from functools import lru_cache

from opacus.accountants.utils import get_noise_multiplier

from adpfl._io import write_json_atomic

from .analysis import calibrate, history_epsilon_rdp, history_rdp, rdp_to_epsilon
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError

PRIVACY_UNIT = "record-level DP: one training image/patient"

def opacus_rdp_epsilon(history, delta: float) -> float:
    """Record-level epsilon of a DP-SGD history ``[(z, q, steps), ...]`` (Opacus RDP; see
    :func:`adpfl.privacy.analysis.history_epsilon_rdp`)."""
    return history_epsilon_rdp(history, delta)

def record_prv(history, delta: float) -> float | None:
    """Record-level epsilon of a history by Opacus' PRV accountant (the tighter figure reported
    beside RDP); None where PRV's numerics do not apply. Remembered per history."""
    key = tuple((float(z), float(q), int(n)) for z, q, n in history)
    return _record_prv(key, float(delta)) if key else 0.0


@lru_cache(maxsize=512)
def _record_prv(history: tuple, delta: float) -> float | None:
    from .analysis import history_epsilon_prv

    try:
        return history_epsilon_prv(history, delta)
    except ValueError:
        return None


#: calibration aims this far (relative) below the target, so float round-off never makes the
#: strict budget check (any excess refused) refuse a calibrated round
CALIBRATION_MARGIN = 1e-9

def calibrate_with_prior(
    prior_history, target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float = 0.01
) -> float:
    """Smallest noise multiplier ``z`` (within ``tolerance`` of the target) such that the
    prior history plus ``steps`` DP-SGD steps at ``(z, sample_rate)`` stays within
    ``target_epsilon`` at ``delta`` (Opacus RDP). Without prior history this is Opacus'
    ``get_noise_multiplier``; with one, Opacus has no helper (it calibrates from zero spend),
    so this runs :func:`adpfl.privacy.analysis.calibrate` on Opacus' own RDP analysis.
    Raises BudgetExhausted when the prior spend alone already reaches the target. The result
    lands on the safe side: its epsilon is at most ``target_epsilon * (1 - CALIBRATION_MARGIN)``
    (the trainer refuses any excess over the target, so round-off must never cross it)."""
    target_epsilon = float(target_epsilon) * (1.0 - CALIBRATION_MARGIN)
    prior = [tuple(h) for h in prior_history or []]
    if not prior:
        return _opacus_noise_multiplier(float(target_epsilon), float(delta), float(sample_rate), int(steps),
                                        float(tolerance))
    spent = opacus_rdp_epsilon(prior, delta)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"record-level epsilon already spent on this data is {spent:.4f} >= target {target_epsilon} "
            f"(delta={delta}); no DP-SGD training is possible"
        )

    prior_rdp = history_rdp(prior)

    def eps(z: float) -> float:  # what RDPAccountant.get_epsilon computes for prior + new steps
        return rdp_to_epsilon(prior_rdp + history_rdp([(z, float(sample_rate), int(steps))]), delta)

    try:
        return calibrate(eps, float(target_epsilon), upper=1e6, start=10.0, stop_within=float(tolerance))
    except PrivacyConfigError:
        raise PrivacyConfigError(f"no noise multiplier reaches record-level epsilon {target_epsilon}") from None

@lru_cache(maxsize=256)
def _opacus_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                             tolerance: float) -> float:
    """Opacus' ``get_noise_multiplier`` (RDP), remembered: every site of a comparison and
    every seed asks the same question, and one answer costs ~10 s of fractional RDP orders."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant="rdp", epsilon_tolerance=tolerance))


RECORD_LEDGER_FORMAT = "adpfl-record-ledger"

class RecordLedger:
    """A site's persistent record-level (DP-SGD) ledger: one entry per DP-SGD training
    round ``{job_id, round, noise_multiplier, sample_rate, steps, epsilon_rdp}``, kept
    across jobs and restarts (every job that trains on the same records composes).

    Every training counts, also a retried one (its noisy gradients were computed anew);
    nothing computed is ever removed (a round reserved but stopped before its first step is
    rolled back). Atomic writes; a corrupt file is an error naming it. Concurrent jobs
    change the file only under its lock (:mod:`adpfl.privacy.reservation`).
    """

    def __init__(self, delta: float, entries: list[dict] | None = None, path: str | None = None):
        if not (0 < float(delta) < 1):
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
        self.delta = float(delta)
        self.entries: list[dict] = list(entries or [])
        self.path = path

    def history(self) -> list:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries]

    def epsilon(self) -> float:
        return opacus_rdp_epsilon(self.history(), self.delta)

    def record(self, *, job_id: str | None, round: int, noise_multiplier: float, sample_rate: float,
               steps: int) -> dict:
        entry = {"job_id": job_id, "round": int(round), "noise_multiplier": float(noise_multiplier),
                 "sample_rate": float(sample_rate), "steps": int(steps)}
        hist = self.history() + [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
        entry["epsilon_rdp"] = opacus_rdp_epsilon(hist, self.delta)
        self.entries.append(entry)
        return dict(entry)

    def save(self, path: str | None = None) -> None:
        write_json_atomic(path or self.path, {"format": RECORD_LEDGER_FORMAT, "unit": PRIVACY_UNIT,
                                              "delta": self.delta, "accountant": "opacus rdp",
                                              "entries": self.entries})

    @classmethod
    def load_or_create(cls, path: str, delta: float) -> RecordLedger:
        if not os.path.exists(path):
            return cls(delta, path=path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict) or data.get("format") != RECORD_LEDGER_FORMAT:
                raise ValueError(f"format field is not {RECORD_LEDGER_FORMAT!r}")
            ledger = cls(data["delta"], path=path)
            for i, e in enumerate(data.get("entries", [])):
                z, q, n = float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
                if not (z > 0 and math.isfinite(z) and 0 < q <= 1 and n >= 0):
                    raise ValueError(f"entry {i} has invalid (z, q, steps) = ({z}, {q}, {n})")
                ledger.entries.append(dict(e))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrivacyError(f"record-level privacy ledger {path} is corrupt or invalid: {e}") from None
        if abs(ledger.delta - float(delta)) > 0:
            raise PrivacyConfigError(
                f"record-level ledger {path} uses delta={ledger.delta}, the job asks delta={delta}"
            )
        return ledger

__all__ = [
    "PRIVACY_UNIT",
    "RECORD_LEDGER_FORMAT",
    "RecordLedger",
    "calibrate_with_prior",
    "record_prv",

    "opacus_rdp_epsilon",
]
