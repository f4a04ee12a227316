"""Faults cost a round, never privacy or the run (issue: reliability). Each test injects one."""

import os
import sys

import numpy as np
import pytest

from adpfl.flare.contribution_checks import check_update
from adpfl.flare.jobs import export_job
from flare_helpers import TINY_EXECUTOR, inject_faults, load_json, logs, run_dir, run_simulator, tiny_job


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
def test_site_fault_sends_nothing_unprotected_and_dropout_does_not_stop_training(tmp_path):
    # a private job, min_clients 2 of 3. Round 0: a NaN in site-1's update makes its privacy
    # pipeline raise, so the server gets only an error from it. Round 1: site-3's process dies.
    job = export_job("skin2d", "dpfl", str(tmp_path / "jobs2"), num_rounds=2, min_clients=2, validation_timeout=5,
                     executor=dict(TINY_EXECUTOR, hd95=False))
    inject_faults(job, "site-1:nan_update:0,site-3:crash:1")
    ws = tmp_path / "ws"
    run_simulator(job, ws, tmp_path / "data", timeout=900)
    text = logs(ws)
    assert "privacy pipeline failed; nothing is released this round" in text
    assert "Ignore the result from site-1 at round 0" in text
    report = load_json(run_dir(ws) / "privacy_report.json")
    rounds = {s: sorted(e["round"] for e in info["ledger"]) for s, info in report["sites"].items()}
    # site-1 released nothing in round 0 (and spent nothing), then trained on; site-2 trained
    # every round; the run did not stop when site-3 died
    assert rounds["site-1"] == [1] and rounds["site-2"] == [0, 1]
    ledgers = ws / "local" / "adpfl_privacy"
    assert [e["round"] for e in load_json(ledgers / "site-1" / "skin2d.json")["entries"]] == [1]
    # site-3's own ledger holds exactly what it released before dying, and the server's
    # mirror agrees
    site3 = load_json(ledgers / "site-3" / "skin2d.json")
    assert [e["round"] for e in site3["entries"]] == [0]
    assert rounds["site-3"] == [0]
    assert "test fault: crashing this site process in round 1" in text
    assert (run_dir(ws) / "app_server" / "FL_global_model.pt").is_file()


@pytest.mark.integration
def test_stopped_simulator_run_resumes_from_last_round_with_ledgers_continuing(tmp_path):
    import signal
    import subprocess
    import time

    from flare_helpers import nvflare_bin

    job = tiny_job(tmp_path, "skin2d", "adpfl", num_rounds=2, min_clients=2, executor={"hd95": False})
    ws = tmp_path / "ws"
    env = dict(os.environ, ADPFL_DATA_ROOT=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    progress = ws / "server" / "simulate_job" / "run_progress.json"
    proc = subprocess.Popen([nvflare_bin(), "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (progress.is_file() and load_json(progress)["last_completed_round"] >= 0):
            assert proc.poll() is None and time.time() < deadline, "the first run ended before round 0 was saved"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the machine dies: no clean shutdown of anything
        proc.wait()
    stopped = load_json(progress)
    assert stopped["last_completed_round"] == 0, stopped  # killed right after round 0 was persisted
    ledgers = ws / "local" / "adpfl_privacy"
    before = {s: load_json(ledgers / s / "skin2d.json")["entries"] for s in ("site-1", "site-2")}
    assert all(0 in [e["round"] for e in entries] for entries in before.values())

    cli = [os.path.join(os.path.dirname(sys.executable), "adpfl"), "run", "--resume", "-w", str(ws),
           "--jobs-dir", str(tmp_path / "jobs"), "-n", "2", "-t", "2"]
    res = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming job" in res.stdout and "at round 1 of 2" in res.stdout
    text = logs(ws)
    assert "Round 0 started" not in text and "Round 1 started" in text
    assert "round0_FL_global_model.pt" in text  # the persistor loaded the stopped run's model
    # the resumed job released round 1 only
    report = load_json(run_dir(ws) / "privacy_report.json")
    for site in ("site-1", "site-2"):
        assert [e["round"] for e in report["sites"][site]["ledger"]] == [1]
        after = load_json(ledgers / site / "skin2d.json")["entries"]
        # the site's ledger continued: the releases before the stop are kept, nothing reset
        assert after[: len(before[site])] == before[site]
        new = after[len(before[site]):]
        assert [e["round"] for e in new] == [1] and new[0]["job_id"] != before[site][0]["job_id"]
        assert new[0]["epsilon_rdp"] > before[site][-1]["epsilon_rdp"]
        # every release of both jobs is accounted once: the server saw the site's whole total
        assert report["sites"][site]["site_reported_total_epsilon_rdp"] == pytest.approx(after[-1]["epsilon_rdp"])
    assert load_json(run_dir(ws) / "run_progress.json")["last_completed_round"] == 1
    final = load_json(run_dir(ws) / "cross_site_val" / "cross_val_results.json")
    assert "SRV_FL_global_model.pt" in final["site-1"]

    # the run is complete now: resuming again is refused with a clear message (the CLI turns
    # this ResumeError into one line and exit code 2)
    from adpfl.flare.resume import ResumeError, prepare_simulator_resume

    with pytest.raises(ResumeError, match="already completed all its rounds"):
        prepare_simulator_resume(str(ws), str(tmp_path / "jobs"))


def test_resume_without_a_stopped_run_is_a_one_line_error(tmp_path, capsys):
    from adpfl.cli import main

    assert main(["run", "--resume", "-w", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume: no simulator run under" in err and "Traceback" not in err
    assert main(["run", "--resume", "--clean", "-w", str(tmp_path / "ws")]) == 2
    assert "takes no --clean" in capsys.readouterr().err


def test_resume_job_edits_rounds_checkpoint_and_dpsgd_plan(tmp_path):
    import json

    from adpfl.flare.resume import ResumeError, make_resume_job

    job = tiny_job(tmp_path, "skin2d", "dpsgd", num_rounds=4)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    progress = {"last_completed_round": 1, "num_rounds": 4, "model": str(ckpt), "job_id": "j1"}
    info = make_resume_job(str(job), str(tmp_path / "resumed"), progress, str(ckpt))
    assert (info["start_round"], info["rounds_left"]) == (2, 2)
    server = json.loads(next((tmp_path / "resumed").rglob("config_fed_server.json")).read_text())
    client = json.loads(next((tmp_path / "resumed").rglob("config_fed_client.json")).read_text())
    sag = next(w for w in server["workflows"] if w["path"].endswith("ScatterAndGather"))
    assert (sag["args"]["start_round"], sag["args"]["num_rounds"]) == (2, 2)
    persistor = next(c for c in server["components"] if c["path"].endswith("PTFileModelPersistor"))
    assert persistor["args"]["source_ckpt_file_full_name"] == str(ckpt)
    ex = client["executors"][0]["executor"]["args"]
    assert ex["dpsgd_planned_rounds"] == 2  # the site's record ledger already holds rounds 0-1
    with pytest.raises(ResumeError, match="plans 4 rounds, the stopped run planned 6"):
        make_resume_job(str(job), str(tmp_path / "r2"), dict(progress, num_rounds=6), str(ckpt))
    with pytest.raises(ResumeError, match="does not exist"):
        make_resume_job(str(job), str(tmp_path / "r3"), progress, str(tmp_path / "missing.pt"))
