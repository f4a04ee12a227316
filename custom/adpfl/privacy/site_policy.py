"""The site's own release policy: what may leave a site whose privacy officer enforces it.

FLARE-free decision logic behind :class:`adpfl.flare.site_policy.SitePolicyFilter`, the
task-result filter a site attaches to every job through FLARE's privacy scopes
(``<site>/local/privacy.json``). Written by hand: neither FLARE nor Opacus decides which
results a site may release or recognises a release a filter already made.

Rules, for every task result of every job in the site's private scope:

* an error reply leaves as an error code only (no content the job may have attached);
* a ``WEIGHT_DIFF`` update leaves only through the site's own privacy pipeline (its
  settings, its budget, its ledger), whatever the job configured; this includes DP-SGD
  results: their record-level guarantee rests on the job's trainer, its settings and its
  ledger name, all chosen by the job, so the site adds its own update-level noise on top
  (two guarantees in two units, neither added to the other) instead of trusting a
  job-written claim;
* scalar metrics (the ``validate`` task's Dice/HD95) leave as plain numbers without any
  metadata: they are an un-noised output already listed as not covered;
* anything else (full ``WEIGHTS``, collections, non-scalar metrics, unknown kinds) is
  refused: it would leave a site unprotected.

A job that lists its own ``ADPFilter`` runs it after the site's filter (FLARE applies a
scope's filters before the job's). That filter then must not noise and spend a second
time: it passes the site's release on unchanged only when the release is verified by
:func:`check_site_release` (the digest the site's filter computed of what it released,
and the site's ledger file on disk holding the release), and refuses otherwise.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import PrivacyError
from .ledger import PrivacyLedger

PROTECT = "protect"
FORWARD_ERROR = "forward_error"
PASS_METRICS = "pass_metrics"
REFUSE = "refuse"

#: the name of the scope ``adpfl poc prepare`` writes and the README shows
PRIVATE_SCOPE = "private"


def _is_scalar(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, numbers.Real):
        return True
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        return True
    return value is None


def classify_result(return_ok: bool, data_kind: str | None, data: Any) -> tuple[str, str]:
    """Which of the module's rules applies to a task result; returns ``(action, reason)``.

    Args:
        return_ok: whether the result's return code is OK.
        data_kind: the DXO's data kind (FLARE's ``DataKind`` values are plain strings),
            None when the result holds no DXO.
        data: the DXO's data.
    """
    if not return_ok:
        return FORWARD_ERROR, "the job's result is an error; only its return code leaves"
    if data_kind == "WEIGHT_DIFF":
        return PROTECT, "a model update leaves only through the site's privacy pipeline"
    if data_kind == "METRICS":
        if isinstance(data, Mapping) and data and all(isinstance(k, str) and _is_scalar(v) for k, v in data.items()):
            return PASS_METRICS, "scalar metrics (an output not covered by the guarantee)"
        return REFUSE, "a METRICS result holding anything but named scalars would leave unprotected"
    return REFUSE, (
        f"a {data_kind or 'non-DXO'} result would leave the site unprotected; the site's policy releases "
        "only noised WEIGHT_DIFF updates and scalar metrics"
    )


def plain_metrics(data: Mapping[str, Any]) -> dict:
    """The metrics of a PASS_METRICS result as plain Python numbers (nothing else travels)."""
    out = {}
    for k, v in data.items():
        if v is None or isinstance(v, bool):
            out[k] = v
        else:
            out[k] = float(np.asarray(v).item())
    return out


def _feed(h, value: Any) -> None:
    """Canonical, type-tagged serialisation of DXO content into the hash ``h``."""
    if isinstance(value, Mapping):
        h.update(b"{%d" % len(value))
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[%d" % len(value))
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif isinstance(value, np.ndarray) or type(value).__module__ == "torch":
        arr = np.ascontiguousarray(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value))
        h.update(f"a{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif isinstance(value, (np.generic,)):
        _feed(h, np.asarray(value))
    else:
        h.update(f"s{type(value).__name__}:{json.dumps(value, sort_keys=True, default=repr)}".encode())


def release_digest(data: Any, meta: Any = None) -> str:
    """SHA-256 of a release's data and metadata (arrays by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, data)
    _feed(h, meta)
    return h.hexdigest()


def ledger_holds_release(ledger_path: str, job_key: str, round_index: int) -> bool:
    """Whether the ledger file on disk (not a copy in memory) records ``job_key``'s release of ``round_index``."""
    if not os.path.isfile(ledger_path):
        return False
    return PrivacyLedger.load(ledger_path).has_round(int(round_index), job_key)


def check_site_release(
    recorded: tuple | None, digest: str, round_index: int | None, ledger_path: str | None
) -> None:
    """Raise :class:`PrivacyError` unless a result is the site filter's own recorded release.

    Args:
        recorded: ``(job_key, round, digest)`` of the release the site's filter made last
            in this job process (None if it made none).
        digest: :func:`release_digest` of the result as it arrives.
        round_index: the round the result claims (its header).
        ledger_path: the site filter's ledger file.
    """
    if recorded is None:
        raise PrivacyError("the site's privacy filter released nothing in this job yet; the result did not pass it")
    job_key, rec_round, rec_digest = recorded
    if round_index is None or int(round_index) != int(rec_round):
        raise PrivacyError(f"the result claims round {round_index}; the site's last release was round {rec_round}")
    if digest != rec_digest:
        raise PrivacyError("the result differs from what the site's privacy filter released (changed after it)")
    if not ledger_path or not ledger_holds_release(ledger_path, job_key, rec_round):
        raise PrivacyError(
            f"the site's ledger {ledger_path} holds no release of round {rec_round} for job {job_key!r}"
        )


__all__ = [
    "FORWARD_ERROR",
    "PASS_METRICS",
    "PRIVATE_SCOPE",
    "PROTECT",
    "REFUSE",
    "check_site_release",
    "classify_result",
    "ledger_holds_release",
    "plain_metrics",
    "release_digest",
]
