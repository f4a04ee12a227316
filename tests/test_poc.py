"""A real FLARE POC system (server + 2 site processes) running tiny skin2d ADP-FL jobs.

One POC system serves the whole module: started once, stopped (and every process it
left behind killed, by PID) by a finalizer registered before anything is started.
HOME and NVFLARE_POC_WORKSPACE point into a temporary folder, the server port is a free one.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import poc_helpers
from adpfl import poc
from adpfl.flare.jobs import export_job
from flare_helpers import TINY_EXECUTOR

pytestmark = pytest.mark.integration

TASK = "skin2d"
JOB_TIMEOUT = 240
# one or two rounds per job, the site's budget planned over 4 rounds: later jobs have budget left
JOB_SETTINGS = {"num_rounds": 1, "min_clients": 2, "executor": TINY_EXECUTOR, "privacy": {"planned_rounds": 4}}


@pytest.fixture(scope="module")
def poc_system(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("poc")
    ws, home = root / "ws", root / "home"
    # registered first: runs even if prepare/start fail half-way
    request.addfinalizer(lambda: _stop_and_check(ws, home))
    # the jobs' own filters are under test here: no site policy (tests/test_kits.py has it)
    state = poc.prepare(str(ws), sites=2, home=str(home), data_root=str(root / "data"), site_epsilon=None)
    poc.start(str(ws), home=str(home), timeout=180)
    return {"root": root, "ws": ws, "home": home, "state": state}


def _stop_and_check(ws: Path, home: Path):
    poc.stop(str(ws), home=str(home))
    assert not poc.live_pids(str(ws)), "POC processes survived stop"


def _job(root: Path, name: str, custom: bool = True, num_rounds: int = 1) -> Path:
    path = Path(export_job(TASK, "adpfl", str(root / name), **dict(JOB_SETTINGS, num_rounds=num_rounds)))
    if not custom:
        shutil.rmtree(path / "app" / "custom")
    return path


def _run_job(system, job_dir: Path) -> tuple:
    job_id = poc.submit(str(system["ws"]), str(job_dir))
    assert not list(job_dir.rglob(".__nvfl_*")), "submitting signed the job folder in place"
    meta = poc.wait(str(system["ws"]), job_id, timeout=JOB_TIMEOUT)
    return job_id, meta["status"]


def _site_ledger(system, site: str) -> list:
    path = poc_helpers.site_ledger(str(system["ws"]), site, TASK)
    # the ledger lives in the site's own workspace (its startup-kit folder)
    assert Path(system["state"]["prod_dir"]) / site in path.parents
    return json.loads(path.read_text())["entries"]


@pytest.fixture(scope="module")
def first_job(poc_system):
    """A 2-round job aborted after round 0, then resumed (a new job) from its last model."""
    import time

    ws = str(poc_system["ws"])
    job = _job(poc_system["root"], "jobs_a", num_rounds=2)
    stopped = poc.submit(ws, str(job))
    progress = Path(poc_system["state"]["prod_dir"]) / "server" / stopped / "run_progress.json"
    deadline = time.time() + JOB_TIMEOUT
    while not progress.is_file():
        assert time.time() < deadline, "round 0 of the job to stop never completed"
        time.sleep(0.5)
    poc.abort(ws, stopped)
    assert poc.wait(ws, stopped, timeout=JOB_TIMEOUT)["status"].startswith("FINISHED:ABORTED")
    resumed = poc.resume(ws, stopped, str(job))
    assert poc.wait(ws, resumed, timeout=JOB_TIMEOUT)["status"] == "FINISHED:COMPLETED"
    return {"stopped": stopped, "resumed": resumed}


def test_stopped_job_resumed_from_its_last_round_continues_the_ledgers(poc_system, first_job):
    stopped, resumed = first_job["stopped"], first_job["resumed"]
    for site in ("site-1", "site-2"):
        entries = _site_ledger(poc_system, site)
        old = [e["round"] for e in entries if e["job_id"] == stopped]
        new = [e["round"] for e in entries if e["job_id"] == resumed]
        # round 0 (and round 1 if the site released it before the abort reached it) under the
        # stopped job; the resumed job started at round 1
        assert old[0] == 0 and new == [1], (old, new)
        ids = [e["job_id"] for e in entries]
        assert ids[: len(old)] == [stopped] * len(old)
        # the ledger continued from the stopped job's spend (cumulative, nothing reset)
        assert entries[len(old)]["epsilon_rdp"] > entries[len(old) - 1]["epsilon_rdp"] > 0


def test_poc_job_result_holds_model_and_privacy_report(poc_system, first_job):
    resumed = first_job["resumed"]
    found = poc.download(str(poc_system["ws"]), resumed, str(poc_system["root"] / "results"))
    model = torch.load(found["global_model"], weights_only=False)
    assert "model" in model and len(model["model"]) > 0
    report = json.loads(Path(found["privacy_report"]).read_text())
    assert set(report["sites"]) == {"site-1", "site-2"}
    for info in report["sites"].values():
        assert info["releases"] == 1  # the resumed job ran round 1 only
        assert [(e["job_id"], e["round"]) for e in info["ledger"]] == [(resumed, 1)]
        assert info["ledger"][0]["epsilon_rdp"] > 0
        # the site's own total, which the server saw, includes the stopped job's spend
        assert info["site_reported_total_epsilon_rdp"] > info["ledger"][0]["epsilon_rdp"]
    assert found["tensorboard"] and any(Path(found["tensorboard"]).rglob("events.out.tfevents.*"))
    cv = json.loads(Path(found["cross_site_val"]).read_text())
    assert set(cv) == {"site-1", "site-2"}


@pytest.fixture(scope="module")
def locked_down_jobs(poc_system, first_job):
    """The second job comes without app/custom/ (no custom code): refused by default,
    then run after the server and the sites allow-list adpfl.* in local/resources.json."""
    prod = Path(poc_system["state"]["prod_dir"])
    job = _job(poc_system["root"], "jobs_locked", custom=False)
    assert not (job / "app" / "custom").exists()
    refused, refused_status = _run_job(poc_system, job)
    kits = [prod / "server", prod / "site-1", prod / "site-2"]
    try:
        for kit in kits:
            poc.write_allow_list(str(kit))
        allowed, allowed_status = _run_job(poc_system, job)
    finally:
        for kit in kits:
            poc_helpers.remove_allow_list(str(kit))
    return {"refused": (refused, refused_status), "allowed": (allowed, allowed_status)}


def test_job_without_custom_code_needs_the_site_allow_list(poc_system, locked_down_jobs):
    prod = Path(poc_system["state"]["prod_dir"])
    refused, status = locked_down_jobs["refused"]
    assert status != "FINISHED:COMPLETED"
    site_log = (prod / "site-1" / refused / "log.txt").read_text(errors="replace")
    assert "ComponentNotAuthorized" in site_log and "is not in allow_list" in site_log
    allowed, status = locked_down_jobs["allowed"]
    assert status == "FINISHED:COMPLETED"
    resources = json.loads((prod / "site-1" / "local" / "resources.json").read_text())
    assert "adpfl." not in resources["class_allow_list"]  # restored after the test


def test_second_job_continues_the_site_ledger(poc_system, first_job, locked_down_jobs):
    refused, _ = locked_down_jobs["refused"]
    second, _ = locked_down_jobs["allowed"]
    first_job = first_job["resumed"]
    for site in ("site-1", "site-2"):
        entries = _site_ledger(poc_system, site)
        ids = [e["job_id"] for e in entries]
        assert refused not in ids  # a refused job released (and spent) nothing
        assert first_job in ids and second in ids
        assert ids.index(second) > ids.index(first_job)
        first_last = [e for e in entries if e["job_id"] == first_job][-1]
        second_first = [e for e in entries if e["job_id"] == second][0]
        # epsilon in the ledger is cumulative: the second job starts from the first's spend
        assert second_first["epsilon_rdp"] > first_last["epsilon_rdp"] > 0


def test_busy_port_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(poc.PocError, match=f"port {port} is already in use"):
            poc.prepare(str(tmp_path / "ws"), sites=2, home=str(tmp_path / "home"), port=port)
        # a prepared system whose port was taken since: start refuses before launching anything
        poc.prepare(str(tmp_path / "ws"), sites=1, home=str(tmp_path / "home"))
        state = poc.load_state(str(tmp_path / "ws"))
        state["port"] = port
        (tmp_path / "ws" / poc.STATE_FILE).write_text(json.dumps(state))
        with pytest.raises(poc.PocError, match=f"port {port} .* already in use"):
            poc.start(str(tmp_path / "ws"), home=str(tmp_path / "home"))
    assert not poc.live_pids(str(tmp_path / "ws"))
