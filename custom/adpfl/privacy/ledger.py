"""The site's persistent update-level privacy ledger (moved from privacy/accounting.py).

Conventions (see docs/privacy-model.md):

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
import os
from dataclasses import dataclass, field
from typing import Any

from adpfl._io import write_json_atomic

from .analysis.epsilon import ACCOUNTANTS, MECHANISMS, _check_delta, _check_z, epsilon_exact, epsilon_gaussian
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError

LEDGER_FORMAT = "adpfl-privacy-ledger"
LEDGER_VERSION = 1


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
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
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
    def load(cls, path: str | os.PathLike) -> PrivacyLedger:
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
    ) -> PrivacyLedger:
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


__all__ = ["LEDGER_FORMAT", "LEDGER_VERSION", "PrivacyLedger"]
