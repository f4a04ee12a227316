"""Spend reservations on a site's ledger file shared by concurrent jobs.

FLARE runs several jobs at once on a site (4 by default), each in its own process, and all
of them spend the same records' budget. A ledger loaded once per job and rewritten from
memory loses the other jobs' entries and lets every job spend the whole budget. Here every
budget check and every change of a ledger file happens in one transaction under the file's
exclusive OS lock (:func:`adpfl._io.json_transaction` / :func:`adpfl._io.file_lock`):

1. lock ``<ledger>.lock``; re-read the ledger from disk (the other jobs' entries included)
   into the caller's ledger object;
2. plan with that spend (the adaptive noise schedule, or the DP-SGD round's ``(z, q,
   steps)``), check the budget, append the entry -- the spend is **reserved** -- and write
   the file atomically; unlock;
3. compute the release (outside the lock, so other jobs are not held up);
4. if the computation fails before anything it produced could leave the site, the
   reservation is rolled back under the lock (exactly the entry carrying this reservation's
   id, found again in the re-read file); otherwise it stays spent.

Every lock, read or write error raises before the release is computed: nothing is released
without its spend on disk (fail closed). A failed rollback leaves the entry spent (the safe
side) and raises.

Update-level: :func:`reserve_update_release` / :func:`rollback_update_release` on a
:class:`~adpfl.privacy.ledger.PrivacyLedger`. Record-level (DP-SGD):
:func:`reserve_record_round` / :func:`settle_record_round` on a record ledger (duck-typed:
``delta``, ``entries``, ``record(...)``, ``save(path)`` and the class method
``load_or_create(path, delta)``; this module imports nothing from ``training/``).

Without a path (an in-memory ledger, e.g. in tests) the same steps run without a file.
Written by hand: FLARE and Opacus keep no cross-process ledger.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from adpfl._io import file_lock, json_transaction

from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError
from .ledger import PrivacyLedger
from .record import opacus_rdp_epsilon

#: entry field holding the reservation's id (a random hex string, unique per reservation)
RESERVATION_KEY = "reservation"

__all__ = [
    "RESERVATION_KEY",
    "reserve_record_round",
    "reserve_update_release",
    "rollback_update_release",
    "settle_record_round",
    "sync_record_ledger",
]


def _new_id() -> str:
    return uuid.uuid4().hex


def _io_error(path: str, exc: BaseException, what: str) -> PrivacyError:
    return PrivacyError(f"privacy ledger {path}: {what} failed ({exc}); nothing was released")


# ------------------------------------------------------------------ update-level
def _refresh_update_ledger(ledger: PrivacyLedger, data: Any, path: str) -> None:
    """Replace ``ledger.entries`` by the file's (the file is the truth once it exists;
    before the first write the in-memory entries are kept, so no spend is ever dropped)."""
    if data is None:
        return
    try:
        fresh = PrivacyLedger.from_dict(data)
    except (PrivacyError, KeyError, TypeError, ValueError) as exc:
        raise PrivacyError(f"privacy ledger file {path} is corrupt or invalid: {exc}") from exc
    if abs(fresh.delta - ledger.delta) > 0:
        raise PrivacyConfigError(f"privacy ledger {path} uses delta={fresh.delta}, this job uses delta={ledger.delta}")
    ledger.entries = fresh.entries


def reserve_update_release(
    ledger: PrivacyLedger, path: str | os.PathLike | None, plan: Callable[[PrivacyLedger], dict[str, Any]]
) -> dict[str, Any]:
    """Reserve one release's spend: under the lock, re-read ``path`` into ``ledger``, call
    ``plan(ledger)`` (it sees the re-read spend and returns the keyword arguments of
    :meth:`PrivacyLedger.record`; it may raise to refuse), record (the ledger refuses a
    repeated round and any excess over ``target_epsilon``), save. Returns the entry; its
    ``RESERVATION_KEY`` field identifies it for :func:`rollback_update_release`.

    Raises (and the file is unchanged): what ``plan`` or ``record`` raise
    (:class:`BudgetExhausted`, :class:`PrivacyError`), and :class:`PrivacyError` for a
    lock, read or write failure.
    """
    rid = _new_id()
    if path is None:
        entry = ledger.record(**plan(ledger))
        ledger.entries[-1][RESERVATION_KEY] = rid
        return {**entry, RESERVATION_KEY: rid}
    path = os.fspath(path)
    before = list(ledger.entries)
    try:
        with json_transaction(path) as tx:
            _refresh_update_ledger(ledger, tx.data, path)
            before = list(ledger.entries)
            entry = ledger.record(**plan(ledger))
            ledger.entries[-1][RESERVATION_KEY] = rid
            tx.write(ledger.to_dict())
    except PrivacyError:  # refused (budget, repeated round, corrupt file): file unchanged
        ledger.entries = before
        raise
    except (OSError, ValueError) as exc:  # lock, read or write: fail closed
        ledger.entries = before
        raise _io_error(path, exc, "reserving the spend") from exc
    except BaseException:
        ledger.entries = before
        raise
    return {**entry, RESERVATION_KEY: rid}


def rollback_update_release(ledger: PrivacyLedger, path: str | os.PathLike | None, reservation_id: str) -> None:
    """Remove exactly the entry of ``reservation_id`` (its release was never computed or
    never left the site). A failure raises :class:`PrivacyError` and the entry stays spent."""
    if path is None:
        ledger.entries = [e for e in ledger.entries if e.get(RESERVATION_KEY) != reservation_id]
        return
    path = os.fspath(path)
    try:
        with json_transaction(path) as tx:
            _refresh_update_ledger(ledger, tx.data, path)
            ledger.entries = [e for e in ledger.entries if e.get(RESERVATION_KEY) != reservation_id]
            tx.write(ledger.to_dict())
    except (OSError, ValueError) as exc:
        raise PrivacyError(
            f"privacy ledger {path}: rolling back reservation {reservation_id} failed ({exc}); it stays spent"
        ) from exc


# ------------------------------------------------------------------ record-level
def _refresh_record_ledger(ledger: Any, path: str) -> None:
    """Under the lock: the record ledger's entries from disk (kept in memory while the file
    does not exist yet). ``load_or_create`` names the file when it is corrupt."""
    if not os.path.exists(path):
        return
    ledger.entries = type(ledger).load_or_create(path, ledger.delta).entries


def _record_path(ledger: Any, path: str | os.PathLike | None) -> str | None:
    path = path if path is not None else getattr(ledger, "path", None)
    return None if path is None else os.fspath(path)


def sync_record_ledger(ledger: Any, path: str | os.PathLike | None = None) -> None:
    """Under the lock: re-read the file into ``ledger`` and write it back (a job's start-up
    check that the ledger is readable and writable, without overwriting other jobs' entries)."""
    path = _record_path(ledger, path)
    if path is None:
        return
    with file_lock(path):
        _refresh_record_ledger(ledger, path)
        ledger.save(path)


def reserve_record_round(
    ledger: Any,
    *,
    target_epsilon: float | None,
    job_id: str | None,
    round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    path: str | os.PathLike | None = None,
) -> str:
    """Reserve a DP-SGD round of ``steps`` steps at ``(noise_multiplier, sample_rate)``:
    under the lock re-read the record ledger, refuse with :class:`BudgetExhausted` if its
    cumulative epsilon with this round (Opacus RDP, at the ledger's delta, every job's
    entries included) exceeds ``target_epsilon`` -- any excess: the trainer calibrates a
    hair below the target so float round-off never trips this -- else record and save.
    Returns the reservation id for :func:`settle_record_round`. ``path`` defaults to
    ``ledger.path``; without a path the ledger stays in memory."""
    path = _record_path(ledger, path)
    rid = _new_id()

    def _reserve() -> None:
        entry = ledger.record(job_id=job_id, round=round, noise_multiplier=noise_multiplier,
                              sample_rate=sample_rate, steps=steps)
        if target_epsilon is not None and entry["epsilon_rdp"] > float(target_epsilon):
            ledger.entries.pop()
            raise BudgetExhausted(
                f"DP-SGD round {round} would bring the record-level epsilon of this site's data to "
                f"{entry['epsilon_rdp']:.6g} > target {target_epsilon} (delta={ledger.delta}, Opacus RDP, "
                f"{len(ledger.entries)} earlier rounds of all jobs); not training"
            )
        ledger.entries[-1][RESERVATION_KEY] = rid

    if path is None:
        _reserve()
        return rid
    before = list(ledger.entries)
    try:
        with file_lock(path):
            _refresh_record_ledger(ledger, path)
            before = list(ledger.entries)
            _reserve()
            ledger.save(path)
    except PrivacyError:
        ledger.entries = before
        raise
    except (OSError, ValueError) as exc:
        ledger.entries = before
        raise PrivacyError(
            f"record-level privacy ledger {path}: reserving the round failed ({exc}); not training"
        ) from exc
    except BaseException:
        ledger.entries = before
        raise
    return rid


def settle_record_round(
    ledger: Any, reservation_id: str, steps_done: int, path: str | os.PathLike | None = None
) -> None:
    """After the round: ``steps_done == 0`` (no noisy gradient was computed) removes the
    reservation; otherwise the entry keeps ``steps_done`` steps (at most the reserved
    ones), whether or not the round's result left the site -- the computed noisy gradients
    live on in the model and optimizer state that later releases carry, so they count.
    A failure raises :class:`PrivacyError` and the full reservation stays spent."""
    path = _record_path(ledger, path)
    steps_done = int(steps_done)

    def _settle() -> None:
        kept, changed_from = [], None
        for e in ledger.entries:
            if e.get(RESERVATION_KEY) == reservation_id:
                if steps_done <= 0:
                    changed_from = len(kept) if changed_from is None else changed_from
                    continue
                if steps_done < int(e["steps"]):
                    e = dict(e, steps=steps_done)
                    changed_from = len(kept) if changed_from is None else changed_from
            kept.append(e)
        if changed_from is not None:
            # each entry states the cumulative epsilon with it: from the settled entry on,
            # restate it for the steps actually taken (the reserved figure overstated it)
            hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in kept]
            for i in range(changed_from, len(kept)):
                kept[i] = dict(kept[i], epsilon_rdp=opacus_rdp_epsilon(hist[: i + 1], ledger.delta))
        ledger.entries = kept

    if path is None:
        _settle()
        return
    try:
        with file_lock(path):
            _refresh_record_ledger(ledger, path)
            _settle()
            ledger.save(path)
    except (OSError, ValueError) as exc:
        raise PrivacyError(
            f"record-level privacy ledger {path}: settling reservation {reservation_id} failed ({exc}); "
            "the whole reserved round stays spent"
        ) from exc
