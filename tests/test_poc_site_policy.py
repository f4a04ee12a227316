"""A real 2-site FLARE POC system whose sites enforce their own privacy policy (local/privacy.json).

NP-FL, ADP-FL and DP-FL jobs (1 round each, tiny data) run on sites whose private scope is
the default: every site's result leaves noised by the site's own filter and is accounted once
in the site's own ledger (site_policy.json), never in a job's ledger and never twice; a job
asking for a scope the sites do not define is refused. (``nvflare simulator`` does not apply
scope filters, so this needs POC.) Stopped and every process killed by PID in a finalizer.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import poc_helpers
from adpfl import poc
from adpfl.flare.jobs import export_job
from adpfl.privacy.analysis import calibrate_noise_multiplier
from flare_helpers import TINY_EXECUTOR

pytestmark = pytest.mark.integration

TASK = "skin2d"
SITES = ("site-1", "site-2")
JOB_TIMEOUT = 240
SITE_EPSILON, SITE_ROUNDS = 8.0, 4  # each site's own budget: epsilon 8 over 4 releases in total


@pytest.fixture(scope="module")
def system(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("poc_policy")
    ws, home = root / "ws", root / "home"
    request.addfinalizer(lambda: _stop_and_check(ws, home))  # first: runs even if start fails
    state = poc.prepare(str(ws), sites=2, home=str(home), data_root=str(root / "data"),
                        site_epsilon=SITE_EPSILON, site_rounds=SITE_ROUNDS)
    poc.start(str(ws), home=str(home), timeout=180)
    return {"root": root, "ws": ws, "home": home, "prod": Path(state["prod_dir"])}


def _stop_and_check(ws: Path, home: Path):
    poc.stop(str(ws), home=str(home))
    assert not poc.live_pids(str(ws)), "POC processes survived stop"


def _run(system, mode: str, scope: str = "") -> dict:
    privacy = {} if mode == "npfl" else {"privacy": {"planned_rounds": 4}}
    job = Path(export_job(TASK, mode, str(system["root"] / f"job_{mode}{scope}"), num_rounds=1, min_clients=2,
                          executor=TINY_EXECUTOR, **privacy))
    if scope:
        meta = json.loads((job / "meta.json").read_text())
        (job / "meta.json").write_text(json.dumps(dict(meta, scope=scope)))
    job_id = poc.submit(str(system["ws"]), str(job))
    status = poc.wait(str(system["ws"]), job_id, timeout=JOB_TIMEOUT)["status"]
    out = {"id": job_id, "status": status}
    if status == "FINISHED:COMPLETED":
        out.update(poc.download(str(system["ws"]), job_id, str(system["root"] / f"result_{mode}")))
    return out


@pytest.fixture(scope="module")
def jobs(system):
    return {m: _run(system, m) for m in ("npfl", "adpfl", "dpfl")} | {"public": _run(system, "npfl", scope="public")}


def _site_entries(system, site: str, name: str = "site_policy") -> list:
    path = poc_helpers.site_ledger(str(system["ws"]), site, name)
    return json.loads(path.read_text())["entries"] if path.is_file() else []


def test_npfl_job_leaves_each_site_noised_and_accounted(system, jobs):
    job = jobs["npfl"]
    assert job["status"] == "FINISHED:COMPLETED"
    z = calibrate_noise_multiplier(SITE_EPSILON, 1e-5, SITE_ROUNDS, "rdp")
    for site in SITES:
        mine = [e for e in _site_entries(system, site) if e["job_id"] == job["id"]]
        assert [e["round"] for e in mine] == [0]
        assert mine[0]["noise_multiplier"] == pytest.approx(z, rel=1e-6)
        log = (system["prod"] / site / job["id"] / "log.txt").read_text(errors="replace")
        assert "released round 0" in log
    # the global model is the initial one plus the mean of two noised updates (std z * 2C / sqrt 2
    # per coordinate, C = 1): a clean one-round update of the tiny UNet moves weights far less
    model = torch.load(job["global_model"], weights_only=False)["model"]
    big = max((v for v in model.values() if torch.is_tensor(v) and v.numel() > 1000), key=lambda v: v.numel())
    assert float(big.float().std()) > 0.5 * z * 2 / np.sqrt(2)
    # the validation metrics came back through the site's filter (scalars only)
    assert set(json.loads(Path(job["cross_site_val"]).read_text())) == set(SITES)


def test_private_jobs_are_noised_once_by_the_site_not_again_by_the_job(system, jobs):
    for mode in ("adpfl", "dpfl"):
        job = jobs[mode]
        assert job["status"] == "FINISHED:COMPLETED", mode
        report = json.loads(Path(job["privacy_report"]).read_text())
        for site in SITES:
            mine = [e for e in _site_entries(system, site) if e["job_id"] == job["id"]]
            assert [e["round"] for e in mine] == [0], mode
            # the job's own ledger (<task>.json) is never written: no second spend
            assert not any(e["job_id"] == job["id"] for e in _site_entries(system, site, TASK)), mode
            assert report["sites"][site]["releases"] == 1
            assert report["sites"][site]["ledger"][0]["noise_multiplier"] == pytest.approx(mine[0]["noise_multiplier"])
            log = (system["prod"] / site / job["id"] / "log.txt").read_text(errors="replace")
            assert "settings are superseded" in log


def test_site_ledger_composes_every_job_within_the_site_budget(system, jobs):
    done = [jobs[m]["id"] for m in ("npfl", "adpfl", "dpfl")]
    for site in SITES:
        entries = _site_entries(system, site)
        assert [e["job_id"] for e in entries] == done
        eps = [e["epsilon_rdp"] for e in entries]
        assert eps == sorted(eps) and 0 < eps[0] and eps[-1] <= SITE_EPSILON


def test_job_asking_for_a_scope_the_sites_do_not_define_is_refused(system, jobs):
    job = jobs["public"]
    assert job["status"] != "FINISHED:COMPLETED"
    server_log = (system["prod"] / "server" / "log.txt").read_text(errors="replace")
    assert all(f"{site}: NVFLARE_ERROR: privacy scope 'public' is not allowed" in server_log for site in SITES)
    for site in SITES:
        assert job["id"] not in [e["job_id"] for e in _site_entries(system, site)]
