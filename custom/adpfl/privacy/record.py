"""Record-level (DP-SGD) accounting and the site's record-level ledger (moved from
training/dpsgd.py, so the server's widget computes record-level epsilons without
importing the trainer). Unit of privacy: one training record; see docs/privacy-model.md.
"""

from __future__ import annotations

import json
import math
import os
import warnings

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from adpfl._io import write_json_atomic

from .analysis import calibrate, grouped_history, history_epsilon_rdp
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError

PRIVACY_UNIT = "record-level DP: one training image/patient"

def opacus_rdp_epsilon(history, delta: float) -> float:
    """Record-level epsilon of a DP-SGD history ``[(z, q, steps), ...]`` (Opacus RDP; see
    :func:`adpfl.privacy.analysis.history_epsilon_rdp`)."""
    return history_epsilon_rdp(history, delta)

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                              sample_rate=float(sample_rate), steps=int(steps), accountant="rdp",
                                              epsilon_tolerance=float(tolerance)))
    spent = opacus_rdp_epsilon(prior, delta)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"record-level epsilon already spent on this data is {spent:.4f} >= target {target_epsilon} "
            f"(delta={delta}); no DP-SGD training is possible"
        )

    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    prior_rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders)
                    for z, q, n in grouped_history(prior))

    def eps(z: float) -> float:  # what RDPAccountant.get_epsilon computes for prior + new steps
        new = rdp_analysis.compute_rdp(q=float(sample_rate), noise_multiplier=z, steps=int(steps), orders=orders)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=prior_rdp + new, delta=delta)[0])

    try:
        return calibrate(eps, float(target_epsilon), upper=1e6, start=10.0, stop_within=float(tolerance))
    except PrivacyConfigError:
        raise PrivacyConfigError(f"no noise multiplier reaches record-level epsilon {target_epsilon}") from None

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

    "opacus_rdp_epsilon",
]
