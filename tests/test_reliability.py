"""Faults cost a round, never privacy or the run (issue: reliability). Each test injects one."""

import numpy as np
import pytest

from adpfl.flare.contribution_checks import check_update
from adpfl.flare.jobs import export_job
from flare_helpers import TINY_EXECUTOR, load_json, logs, run_dir, run_simulator, tiny_job


# ---------------------------------------------------------------- pure checks
def test_check_update_accepts_matching_update():
    check_update({"w": np.zeros((2, 3), np.float32)}, {"w": (2, 3)})


@pytest.mark.parametrize(
    "update,match",
    [
        ({"w": np.full((2, 3), np.nan, np.float32)}, "NaN or Inf"),
        ({"w": np.zeros((3, 2), np.float32)}, "shape"),
        ({"v": np.zeros((2, 3), np.float32)}, "keys do not match"),
        ({"w": np.zeros((2, 3), np.int64)}, "non-float"),
        ({}, "no update"),
    ],
)
def test_check_update_rejects(update, match):
    with pytest.raises(ValueError, match=match):
        check_update(update, {"w": (2, 3)})


# ---------------------------------------------------------------- simulator fault injection

@pytest.mark.integration
def test_server_rejects_malformed_contributions_and_round_completes(tmp_path):
    # site-1 sends NaN, site-2 full weights instead of a difference, site-3 a valid update
    # (wrong keys/shapes are covered by check_update above, through the same widget path)
    job = tiny_job(tmp_path, "skin2d", "npfl", num_rounds=1)
    ws = tmp_path / "ws"
    faults = "site-1:nan_update,site-2:weights_kind"
    proc = run_simulator(job, ws, tmp_path / "data", extra_env={"ADPFL_TEST_FAULT": faults})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = logs(ws)
    assert "rejected the contribution of site-1 in round 0: entry" in text and "NaN or Inf" in text
    assert "rejected the contribution of site-2 in round 0: data kind WEIGHTS" in text
    assert "rejected the contribution of site-3" not in text
    assert "Contribution from site-3 ACCEPTED" in text
    # the round completed with the valid site and the final model was evaluated at every site
    final = load_json(run_dir(ws) / "cross_site_val" / "cross_val_results.json")
    assert set(final) == {"site-1", "site-2", "site-3"}


@pytest.mark.integration
def test_private_job_site_fault_sends_nothing_unprotected(tmp_path):
    # a NaN in the update makes the site's privacy pipeline raise: the server gets only an error
    job = tiny_job(tmp_path, "skin2d", "dpfl", num_rounds=1)
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, tmp_path / "data", extra_env={"ADPFL_TEST_FAULT": "site-1:nan_update"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = logs(ws)
    assert "privacy pipeline failed; nothing is released this round" in text
    assert "Ignore the result from site-1 at round 0" in text
    report = load_json(run_dir(ws) / "privacy_report.json")
    assert set(report["sites"]) == {"site-2", "site-3"}  # site-1 released nothing
    assert not (ws / "site-1" / "adpfl_privacy" / "site-1" / "skin2d.json").exists() or not load_json(
        ws / "site-1" / "adpfl_privacy" / "site-1" / "skin2d.json"
    )["entries"]


@pytest.mark.integration
def test_site_dropout_does_not_stop_training(tmp_path):
    # min_clients 2 of 3: site-3's process dies in round 1
    job = export_job("skin2d", "dpfl", str(tmp_path / "jobs2"), num_rounds=3, min_clients=2, validation_timeout=20,
                     executor=dict(TINY_EXECUTOR))
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, tmp_path / "data", extra_env={"ADPFL_TEST_FAULT": "site-3:crash:1"}, timeout=900)
    report = load_json(run_dir(ws) / "privacy_report.json")
    rounds = {s: sorted(e["round"] for e in info["ledger"]) for s, info in report["sites"].items()}
    # the two live sites trained every round; the run did not stop with site-3
    assert rounds["site-1"] == [0, 1, 2] and rounds["site-2"] == [0, 1, 2]
    # site-3's own ledger holds exactly what it released before dying, and the server's
    # mirror agrees
    site3 = load_json(ws / "site-3" / "adpfl_privacy" / "site-3" / "skin2d.json")
    assert [e["round"] for e in site3["entries"]] == [0]
    assert rounds["site-3"] == [0]
    assert "crashing this site process in round 1" in logs(ws)
