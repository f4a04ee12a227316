"""Concurrent jobs on one site share its ledgers: real OS processes (spawn), one file each.

The union of what every job released must stay within the budget (epsilon recomputed from
the file with the accountant), and no entry may be lost (entries == successful releases)."""

import multiprocessing as mp
import os
import threading

import pytest

import ledger_workers
from adpfl._io import file_lock, json_transaction
from adpfl.privacy import BudgetExhausted, PrivacyConfig, PrivacyError, PrivacyLedger, PrivacyPipeline, epsilon_rdp
from adpfl.privacy.record import RecordLedger, calibrate_with_prior, opacus_rdp_epsilon
from adpfl.privacy.reservation import RESERVATION_KEY, reserve_record_round, settle_record_round

TARGET, DELTA = 8.0, 1e-5


def _run(target, arg_lists):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(arg_lists))
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(a[0], barrier, *a[1:], out)) for a in arg_lists]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_concurrent_update_level_jobs_never_overspend_nor_lose_entries(tmp_path):
    """The issue's scenario (two DP-FL jobs over one ledger, epsilon 8 at delta 1e-5, 20
    planned rounds each, both loaded before either releases: before the fix both released
    all 20 rounds, true epsilon 12.17, and the file kept one job's entries) plus a third,
    ADP-FL job (its schedule plans with the re-read spend). Every job's first release fails
    after its spend was reserved (NaN in the update): rolled back."""
    jobs = [("a", "dpfl", 20, True), ("b", "dpfl", 20, True), ("c", "adpfl", 20, True)]
    path = str(tmp_path / "privacy_ledger.json")
    results = _run(ledger_workers.update_level_job, [(path, *j) for j in jobs])
    ledger = PrivacyLedger.load(path)
    released = sorted((r["job"], rnd, z) for r in results for rnd, z in r["released"])
    on_file = sorted((e["job_id"], e["round"], e["noise_multiplier"]) for e in ledger.entries)
    assert on_file == released  # no entry lost, no rolled-back reservation left
    eps = epsilon_rdp([z for _, _, z in released], DELTA)
    assert eps <= TARGET
    assert sum(r["refused"] for r in results) > 0  # the budget did bind: later rounds refused
    assert eps > 0.9 * TARGET
    assert sum(r["failed"] for r in results) > 0


def test_concurrent_record_level_jobs_never_overspend_nor_lose_entries(tmp_path):
    path = str(tmp_path / "dpsgd_skin2d.json")
    q, steps = 1.0, 4  # full-batch steps: Opacus' RDP is closed-form there (fast); the locking is the same
    z = calibrate_with_prior([], TARGET, DELTA, q, 6 * steps)  # each job alone plans 6 rounds
    jobs = [(j, z, q, steps, 8) for j in "abc"]
    results = _run(ledger_workers.record_level_job, [(path, *j) for j in jobs])
    ledger = RecordLedger.load_or_create(path, DELTA)
    trained = sorted((r["job"], rnd, n) for r in results for rnd, n in r["trained"])
    on_file = sorted((e["job_id"], e["round"], e["steps"]) for e in ledger.entries)
    assert on_file == trained
    assert opacus_rdp_epsilon(ledger.history(), DELTA) <= TARGET
    assert sum(r["refused"] for r in results) > 0
    assert any(n == steps // 2 for _, _, n in trained)  # an aborted round keeps the steps it took


def test_reservation_is_on_disk_before_the_release_is_computed(tmp_path, monkeypatch):
    """The spend is saved before the update is touched; a failed computation rolls back
    exactly its own entry."""
    import torch

    import adpfl.privacy.pipeline as pipeline_mod

    path = str(tmp_path / "ledger.json")
    pipe = PrivacyPipeline(PrivacyConfig(mode="dpfl", clip_norm=1.0, noise_multiplier=2.0, delta=DELTA,
                                         track_prv=False), PrivacyLedger(delta=DELTA), ledger_path=path)
    pipe.release({"w": torch.ones(10)}, 0, job_id="j")
    seen = {}
    real = pipeline_mod.add_gaussian_noise

    def spy(values, std, gen):
        seen["entries"] = [(e["job_id"], e["round"]) for e in PrivacyLedger.load(path).entries]
        return real(values, std, gen)

    monkeypatch.setattr(pipeline_mod, "add_gaussian_noise", spy)
    pipe.release({"w": torch.ones(10)}, 1, job_id="j")
    assert seen["entries"] == [("j", 0), ("j", 1)]

    def boom(values, std, gen):
        raise RuntimeError("device error")

    monkeypatch.setattr(pipeline_mod, "add_gaussian_noise", boom)
    with pytest.raises(RuntimeError, match="device error"):
        pipe.release({"w": torch.ones(10)}, 2, job_id="j")
    assert [(e["job_id"], e["round"]) for e in PrivacyLedger.load(path).entries] == [("j", 0), ("j", 1)]
    assert all(RESERVATION_KEY in e for e in PrivacyLedger.load(path).entries)


def test_ledger_lock_timeout_fails_closed_and_names_the_file(tmp_path, monkeypatch):
    import torch

    import adpfl._io as io_mod

    path = str(tmp_path / "ledger.json")
    pipe = PrivacyPipeline(PrivacyConfig(mode="dpfl", clip_norm=1.0, noise_multiplier=2.0, delta=DELTA,
                                         track_prv=False), PrivacyLedger(delta=DELTA), ledger_path=path)
    monkeypatch.setattr(io_mod, "LOCK_TIMEOUT_S", 0.2)
    held, release = threading.Event(), threading.Event()

    def holder():
        with file_lock(path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(PrivacyError, match="ledger.json"):
            pipe.release({"w": torch.ones(10)}, 0, job_id="j")
    finally:
        release.set()
        t.join()
    assert not os.path.exists(path) and pipe.ledger.entries == []  # nothing spent, nothing released
    pipe.release({"w": torch.ones(10)}, 0, job_id="j")  # lock free again: works
    assert len(PrivacyLedger.load(path).entries) == 1


def test_unwritable_or_corrupt_ledger_refuses_before_computing(tmp_path):
    import torch

    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    pipe = PrivacyPipeline(PrivacyConfig(mode="dpfl", clip_norm=1.0, noise_multiplier=2.0, delta=DELTA,
                                         track_prv=False), PrivacyLedger(delta=DELTA), ledger_path=str(path))
    with pytest.raises(PrivacyError, match="ledger.json"):
        pipe.release({"w": torch.ones(10)}, 0, job_id="j")
    assert pipe.ledger.entries == []


def test_json_transaction_writes_only_on_success(tmp_path):
    path = tmp_path / "x.json"
    with json_transaction(path) as tx:
        assert tx.data is None
        tx.write({"n": 1})
    with pytest.raises(RuntimeError):
        with json_transaction(path) as tx:
            tx.write({"n": tx.data["n"] + 1})
            raise RuntimeError("abort")
    with json_transaction(path) as tx:
        assert tx.data == {"n": 1}


def test_record_reservation_refuses_any_excess_and_settles(tmp_path):
    path = str(tmp_path / "rec.json")
    ledger = RecordLedger(DELTA, path=path)
    q, steps = 1.0, 4
    z = calibrate_with_prior([], TARGET, DELTA, q, 2 * steps)
    rid = reserve_record_round(ledger, target_epsilon=TARGET, job_id="a", round=0, noise_multiplier=z,
                               sample_rate=q, steps=steps)
    other = RecordLedger.load_or_create(path, DELTA)  # a second job, loaded now
    settle_record_round(ledger, rid, 0)  # round failed before its first step: rolled back
    assert RecordLedger.load_or_create(path, DELTA).entries == []
    for r in range(2):
        rid = reserve_record_round(other, target_epsilon=TARGET, job_id="b", round=r, noise_multiplier=z,
                                   sample_rate=q, steps=steps)
        settle_record_round(other, rid, steps)
    with pytest.raises(BudgetExhausted, match="record-level epsilon"):  # ledger re-read: b's spend counts
        reserve_record_round(ledger, target_epsilon=TARGET, job_id="a", round=1, noise_multiplier=z,
                             sample_rate=q, steps=1)
    assert len(RecordLedger.load_or_create(path, DELTA).entries) == 2


def test_a_round_settled_with_fewer_steps_restates_the_cumulative_epsilon(tmp_path):
    """An aborted round keeps the steps it computed; each entry's stated cumulative epsilon
    (and every later entry's) is then the one of the steps taken, not the reserved ones."""
    path = str(tmp_path / "rec.json")
    ledger = RecordLedger(DELTA, path=path)
    rid0 = reserve_record_round(ledger, target_epsilon=None, job_id="a", round=0, noise_multiplier=1.0,
                                sample_rate=0.5, steps=10)
    rid1 = reserve_record_round(ledger, target_epsilon=None, job_id="b", round=0, noise_multiplier=1.0,
                                sample_rate=0.5, steps=10)  # another job, concurrent
    reserved = [e["epsilon_rdp"] for e in RecordLedger.load_or_create(path, DELTA).entries]
    settle_record_round(ledger, rid0, 3)
    settle_record_round(ledger, rid1, 10)
    entries = RecordLedger.load_or_create(path, DELTA).entries
    assert [e["steps"] for e in entries] == [3, 10]
    hist = [(1.0, 0.5, 3), (1.0, 0.5, 10)]
    for i, e in enumerate(entries):
        assert e["epsilon_rdp"] == pytest.approx(opacus_rdp_epsilon(hist[: i + 1], DELTA), rel=1e-12)
        assert e["epsilon_rdp"] < reserved[i]
    assert entries[-1]["epsilon_rdp"] == pytest.approx(RecordLedger.load_or_create(path, DELTA).epsilon())
