"""Worker functions for the concurrent-ledger tests (run in spawned OS processes, so they
live in an importable module, not in the test file)."""

from __future__ import annotations

import time


def update_level_job(ledger_path, barrier, job_id, mode, rounds, fail_first, out):
    """One job's DP-FL/ADP-FL pipeline over the shared ledger file: created (ledger loaded)
    before the barrier, then releases ``rounds`` rounds; with ``fail_first`` its updates hold
    a NaN until one release has failed that way (after its spend was reserved)."""
    import torch

    from adpfl.privacy import BudgetExhausted, PrivacyConfig, PrivacyError, PrivacyLedger, PrivacyPipeline

    common = dict(target_epsilon=8.0, delta=1e-5, planned_rounds=20, track_prv=False)
    if mode == "dpfl":
        cfg = PrivacyConfig(mode="dpfl", clip_norm=0.5, **common)
    else:
        cfg = PrivacyConfig(mode="adpfl", keep_fraction=0.5, clip_norm=1.0, clip_learning_rate=0.2,
                            clip_indicator_noise=30.0, **common)
    ledger = PrivacyLedger.load_or_create(ledger_path, delta=1e-5, target_epsilon=8.0, track_prv=False)
    pipe = PrivacyPipeline(cfg, ledger, ledger_path=ledger_path)
    barrier.wait()
    released, refused, failed = [], 0, 0
    for r in range(rounds):
        upd = {"w": torch.randn(500)}
        if fail_first and not failed:
            upd["w"][3] = float("nan")
        try:
            _, meta = pipe.release(upd, r, job_id=job_id)
            released.append((r, meta["noise_multiplier"]))
        except BudgetExhausted:
            refused += 1
        except PrivacyError:
            failed += 1
    out.put({"job": job_id, "released": released, "refused": refused, "failed": failed})


def record_level_job(ledger_path, barrier, job_id, z, q, steps, rounds, out):
    """One DP-SGD job's record-level accounting over the shared ledger file, as the executor
    does it: reserve the round, 'train', settle. The job's first reserved round fails before
    its first step (rolled back), its second is aborted half-way (keeps its steps)."""
    from adpfl.privacy.errors import BudgetExhausted
    from adpfl.privacy.record import RecordLedger
    from adpfl.privacy.reservation import reserve_record_round, settle_record_round

    ledger = RecordLedger.load_or_create(ledger_path, delta=1e-5)
    barrier.wait()
    trained, refused, reserved = [], 0, 0
    for r in range(rounds):
        try:
            rid = reserve_record_round(ledger, target_epsilon=8.0, job_id=job_id, round=r, noise_multiplier=z,
                                       sample_rate=q, steps=steps, path=ledger_path)
        except BudgetExhausted:
            refused += 1
            continue
        reserved += 1
        time.sleep(0.002)  # the round's training, outside the lock
        done = {1: 0, 2: steps // 2}.get(reserved, steps)
        settle_record_round(ledger, rid, done, path=ledger_path)
        if done:
            trained.append((r, done))
    out.put({"job": job_id, "trained": trained, "refused": refused})
