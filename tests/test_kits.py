"""The provisioned kits of poc/project.yml run end to end on one machine, with each hospital
enforcing its own privacy policy (local/privacy.json); the admin console's commands.

One system serves the module: ``nvflare provision`` of a copy of poc/project.yml with the server
named localhost on a free port, the server kit and the three hospital kits started with their own
``startup/start.sh`` (``adpfl kits``), each hospital with its own site config and privacy policy.
Jobs reach it the ways an operator submits them: an NP-FL job (1 round) with
``nvflare job submit``; then an ADP-FL job as a Recipe on ``ProdEnv`` and a DP-FL job with the
console's ``submit_job``, submitted at once so that they run at the same time on the same sites
(3 rounds each); a job asking for an undefined scope through the session API (``adpfl poc
submit``); a job aborted with ``abort_job``. ``check_status``, ``list_jobs``, ``download_job``
and, last, ``shutdown`` are sent as console command strings through FLARE's admin API.

Every site's result leaves noised by the site's own filter and is accounted once in the site's
own ledger (site_policy.json), never in a job's ledger and never twice; the two concurrent jobs
share each site's budget, which holds 3 more releases when they start (each job alone fits,
both do not): the site's file keeps every release of both jobs, its epsilon stays within the
budget and the releases that did not fit are refused, not lost; a job asking for a scope the
sites do not define is refused. (``nvflare simulator`` does not apply scope filters.) The
system is shut down through the admin API and every leftover killed by PID in a finalizer.
"""

import json
import re
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import poc_helpers
from adpfl import poc
from adpfl.flare.jobs import export_job
from adpfl.poc import kits
from adpfl.privacy.analysis import calibrate_noise_multiplier, epsilon_rdp
from adpfl.privacy.ledger import PrivacyLedger
from flare_helpers import TINY_EXECUTOR

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TASK = "skin2d"
SITES = ("hospital-a", "hospital-b", "hospital-c")
JOB_TIMEOUT = 300
SITE_EPSILON, SITE_ROUNDS = 8.0, 4  # each site's own budget: epsilon 8 over 4 releases in total
# run at once after the NP-FL job's release: 3 + 3 rounds against the 3 releases left per site
# (3 rounds, not 2: each job's releases then span about two rounds' time, well beyond the few
# seconds between the two jobs' starts, so their releases interleave; verified below from the logs)
PAIR, PAIR_ROUNDS = ("adpfl", "dpfl"), 3


@pytest.fixture(scope="module")
def system(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("kits")
    ws = root / "ws"
    request.addfinalizer(lambda: _stop_and_check(ws))  # first: runs even if provisioning or start fail
    state = kits.provision(str(ws), str(REPO / "poc" / "project.yml"), home=str(root / "home"),
                           data_root=str(root / "data"), site_epsilon=SITE_EPSILON, site_rounds=SITE_ROUNDS)
    kits.start(str(ws), timeout=240)
    return {"root": root, "ws": ws, "prod": Path(state["prod_dir"]), "state": state}


def _stop_and_check(ws: Path):
    kits.stop(str(ws))
    assert not poc.live_pids(str(ws)), "kit processes survived stop"


def _settings(mode: str, rounds: int = 1) -> dict:
    privacy = {} if mode == "npfl" else {"privacy": {"planned_rounds": 4}}
    return dict(num_rounds=rounds, min_clients=len(SITES), executor=TINY_EXECUTOR, **privacy)


def _export(system, mode: str, rounds: int = 1, scope: str = "", name: str = "") -> str:
    job = Path(export_job(TASK, mode, str(system["root"] / f"job_{mode}{scope}{name}"), **_settings(mode, rounds)))
    if scope:
        meta = json.loads((job / "meta.json").read_text())
        (job / "meta.json").write_text(json.dumps(dict(meta, scope=scope)))
    return str(job)


def _console(system, *commands):
    return kits.console(str(system["ws"]), *commands)


def _finish(system, job_id: str, name: str) -> dict:
    status = poc.wait(str(system["ws"]), job_id, timeout=JOB_TIMEOUT)["status"]
    out = {"id": job_id, "status": status}
    if status == "FINISHED:COMPLETED":
        out.update(poc.download(str(system["ws"]), job_id, str(system["root"] / f"result_{name}")))
    return out


@pytest.fixture(scope="module")
def jobs(system):
    ws = str(system["ws"])
    out = {"status_before": _console(system, "check_status server", "check_status client")}
    # `nvflare job submit`; the console's download_job
    npfl_job = _export(system, "npfl")
    out["npfl"] = {"id": kits.submit_cli(ws, npfl_job)}
    out["cli_job_folder_signed"] = sorted(str(p) for p in Path(npfl_job).rglob(".__nvfl_*"))
    out["npfl"]["status"] = poc.wait(ws, out["npfl"]["id"], timeout=JOB_TIMEOUT)["status"]
    download = _console(system, f"download_job {out['npfl']['id']}")[0]
    out["npfl"].update(poc.admin.locate_results(download["meta"]["location"]))
    # two private jobs at once on the same sites, neither waited for: the ADP-FL job as a Recipe on
    # ProdEnv, then at once the DP-FL job with the console's submit_job (a session opened beforehand)
    recipe = kits.job_recipe(TASK, "adpfl", workspace=ws, **_settings("adpfl", PAIR_ROUNDS))
    dpfl_job = _export(system, "dpfl", rounds=PAIR_ROUNDS)
    with kits.admin_console(ws) as send:
        ids = {"adpfl": kits.submit_recipe(ws, recipe)}
        ids["dpfl"] = send(f"submit_job {dpfl_job}")["meta"]["job_id"]
    out.update({mode: _finish(system, ids[mode], mode) for mode in PAIR})
    out["public"] = _finish(system, poc.submit(ws, _export(system, "npfl", scope="public")), "public")
    # the console's abort_job on a running job
    aborted = _console(system, f"submit_job {_export(system, 'npfl', rounds=2, name='_abort')}")[0]["meta"]["job_id"]
    _wait_running(system, aborted)
    out["abort_reply"] = _console(system, f"abort_job {aborted}")[0]
    out["aborted"] = {"id": aborted, "status": poc.wait(ws, aborted, timeout=JOB_TIMEOUT)["status"]}
    out["list_jobs"] = _console(system, "list_jobs")[0]
    return out


def _wait_running(system, job_id: str) -> None:
    sess = poc.admin.session(system["state"])
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while sess.get_job_meta(job_id)["status"] != "RUNNING":
            assert time.monotonic() < deadline, f"job {job_id} never started"
            time.sleep(1)
    finally:
        poc.admin.close_session(sess)


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
    # the global model is the initial one plus the mean of three noised updates (std z * 2C / sqrt 3
    # per coordinate, C = 1): a clean one-round update of the tiny UNet moves weights far less
    model = torch.load(job["global_model"], weights_only=False)["model"]
    big = max((v for v in model.values() if torch.is_tensor(v) and v.numel() > 1000), key=lambda v: v.numel())
    assert float(big.float().std()) > 0.5 * z * 2 / np.sqrt(len(SITES))
    # the validation metrics came back through the site's filter (scalars only)
    assert set(json.loads(Path(job["cross_site_val"]).read_text())) == set(SITES)


def _mine(system, site: str, job: dict) -> list:
    return [e for e in _site_entries(system, site) if e["job_id"] == job["id"]]


def test_private_jobs_are_noised_once_by_the_site_not_again_by_the_job(system, jobs):
    for mode in PAIR:
        job = jobs[mode]
        assert job["status"] == "FINISHED:COMPLETED", mode
        report = json.loads(Path(job["privacy_report"]).read_text())
        for site in SITES:
            mine = _mine(system, site, job)
            assert mine and len({e["round"] for e in mine}) == len(mine), (mode, site, mine)
            # the job's own ledger (<task>.json) is never written: no second spend
            assert not any(e["job_id"] == job["id"] for e in _site_entries(system, site, TASK)), mode
            # what the server accounted is exactly what the site's ledger recorded: same rounds, same noise
            seen = report["sites"][site]["ledger"]
            assert report["sites"][site]["releases"] == len(mine), (mode, site)
            by_round = {e["round"]: e["noise_multiplier"] for e in mine}
            assert sorted(e["round"] for e in seen) == sorted(by_round)
            assert all(e["noise_multiplier"] == pytest.approx(by_round[e["round"]]) for e in seen)
            log = (system["prod"] / site / job["id"] / "log.txt").read_text(errors="replace")
            assert "settings are superseded" in log


def test_site_ledger_composes_every_job_within_the_site_budget(system, jobs):
    pair = {jobs[m]["id"] for m in PAIR}
    for site in SITES:
        entries = _site_entries(system, site)
        assert entries[0]["job_id"] == jobs["npfl"]["id"]
        assert {e["job_id"] for e in entries[1:]} == pair and len(entries) == SITE_ROUNDS
        # each entry's cumulative epsilon counts every earlier entry of every job: strictly rising
        eps = [e["epsilon_rdp"] for e in entries]
        assert all(x < y for x, y in zip(eps, eps[1:])) and 0 < eps[0] and eps[-1] <= SITE_EPSILON


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - SitePolicyFilter - ")
RELEASED, REFUSED = "released round", "the site's budget refuses this release"


def _policy_events(system, site: str, job: dict) -> list:
    """(time, RELEASED or REFUSED) of each train result the site's policy filter decided on in
    ``job``, from the site's own log of the job (FLARE's time stamps)."""
    out = []
    for line in (system["prod"] / site / job["id"] / "log.txt").read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        for kind in (RELEASED, REFUSED):
            if m and kind in line:
                out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), kind))
    return out


def test_two_private_jobs_at_once_share_each_site_budget(system, jobs):
    """Issue 12: two private jobs submitted at once to the same sites. Each site's budget holds
    3 more releases when they start; they ask for 6. Combined spend within the budget, both
    jobs' entries in the site's ledger, the over-budget rounds refused (never lost, never clean)."""
    pair = [jobs[m] for m in PAIR]
    assert all(job["status"] == "FINISHED:COMPLETED" for job in pair), pair
    left = SITE_ROUNDS - 1  # the NP-FL job spent one release per site before the pair started
    assert 0 < PAIR_ROUNDS <= left < len(pair) * PAIR_ROUNDS  # each job alone fits, both do not
    for site in SITES:
        events = [_policy_events(system, site, job) for job in pair]
        # the jobs really ran at once: each one's train results at this site started before the other's ended
        spans = [(ev[0][0], ev[-1][0]) for ev in events if ev]
        assert len(spans) == 2 and max(s[0] for s in spans) < min(s[1] for s in spans), (site, events)
        # every train result of both jobs was either released (noised, accounted) or refused
        assert [len(ev) for ev in events] == [PAIR_ROUNDS, PAIR_ROUNDS], (site, events)
        assert sum(kind == REFUSED for ev in events for _, kind in ev) == len(pair) * PAIR_ROUNDS - left, site

        entries = _site_entries(system, site)
        path = poc_helpers.site_ledger(str(system["ws"]), site, "site_policy")
        for job, ev in zip(pair, events):
            mine = _mine(system, site, job)
            # no entry lost: one per release the site's log shows, and the server accepted exactly these
            assert mine and len(mine) == sum(kind == RELEASED for _, kind in ev), (site, job["id"])
            report = json.loads(Path(job["privacy_report"]).read_text())["sites"][site]
            assert report["releases"] == len(mine)
            # the site's cumulative epsilon each release reported to its job is the ledger's at that release
            assert sorted(e["site_reported_epsilon_rdp"] for e in report["ledger"]) == pytest.approx(
                sorted(e["epsilon_rdp"] for e in mine))
            # the refused rounds are the job's rounds without a release; the server saw each as an error
            refused = set(range(PAIR_ROUNDS)) - {e["round"] for e in mine}
            server_log = next(Path(job["result_dir"]).rglob("workspace/log.txt")).read_text(errors="replace")
            assert all(f"Ignore the result from {site} at round {r}" in server_log for r in refused), (site, refused)
        assert len(entries) == SITE_ROUNDS
        # combined spend, recomputed from the file with the accountant (Opacus RDP, delta 1e-5)
        zs = [e["noise_multiplier"] for e in entries]
        ledger = PrivacyLedger.load(path)
        assert epsilon_rdp(zs, 1e-5) == pytest.approx(ledger.epsilon("rdp")) and ledger.epsilon("rdp") <= SITE_EPSILON
        # and the refused release did not fit: one more at the site's noise would exceed the budget
        assert ledger.projected_epsilon(zs[-1], "rdp") > SITE_EPSILON


def test_job_asking_for_a_scope_the_sites_do_not_define_is_refused(system, jobs):
    job = jobs["public"]
    assert job["status"] != "FINISHED:COMPLETED"
    server_log = (system["prod"] / system["state"]["server"] / "log.txt").read_text(errors="replace")
    assert all(f"{site}: NVFLARE_ERROR: privacy scope 'public' is not allowed" in server_log for site in SITES)
    for site in SITES:
        assert job["id"] not in [e["job_id"] for e in _site_entries(system, site)]


def _rows(reply: dict) -> list:
    return [row for item in reply["data"] if item.get("type") == "table" for row in item["rows"]]


def test_console_check_status_shows_the_server_and_every_hospital(jobs):
    server, clients = jobs["status_before"]
    assert "Registered clients: 3" in kits.reply_text(server)
    assert {row[0] for row in _rows(server)} >= set(SITES)
    assert {row[0]: row[-1] for row in _rows(clients)[1:]} == dict.fromkeys(SITES, "No Jobs")


def test_jobs_from_nvflare_job_submit_and_prodenv_complete_with_model_report_and_tensorboard(jobs):
    assert not jobs["cli_job_folder_signed"], "nvflare job submit signed the job folder in place"
    # npfl: `nvflare job submit`; adpfl: a Recipe on ProdEnv; dpfl: the console's submit_job
    for name in ("npfl",) + PAIR:
        job = jobs[name]
        assert job["status"] == "FINISHED:COMPLETED", name
        assert torch.load(job["global_model"], weights_only=False)["model"], name
        assert any(Path(job["tensorboard"]).rglob("events.out.tfevents.*")), name
        if name == "npfl":  # an NP-FL job has no privacy widget: what its sites spent is in their ledgers
            assert job["privacy_report"] is None
            continue
        report = json.loads(Path(job["privacy_report"]).read_text())
        assert set(report["sites"]) == set(SITES), name


def test_console_download_abort_and_list_jobs(system, jobs):
    npfl = jobs["npfl"]  # downloaded with `download_job` into the admin kit's transfer folder
    assert Path(npfl["result_dir"]).parent == Path(system["state"]["admin_dir"]) / "transfer"
    assert npfl["global_model"] and any(Path(npfl["tensorboard"]).rglob("events.out.tfevents.*"))
    assert "Abort signal has been sent" in kits.reply_text(jobs["abort_reply"])
    assert jobs["aborted"]["status"] == "FINISHED:ABORTED"
    listed = {row[0]: row[2] for row in _rows(jobs["list_jobs"])[1:]}
    expected = {jobs[k]["id"]: jobs[k]["status"] for k in ("npfl", "adpfl", "dpfl", "public", "aborted")}
    assert listed == expected
    assert expected[jobs["public"]["id"]] != "FINISHED:COMPLETED"


def test_console_shutdown_stops_every_kit_process(system, jobs):
    """Last in the module: the system ends through the admin API, nothing left to kill."""
    ws = str(system["ws"])
    assert poc.live_pids(ws)
    _console(system, "shutdown client")
    _console(system, "shutdown server")
    deadline = time.monotonic() + 90
    while poc.live_pids(ws) and time.monotonic() < deadline:
        time.sleep(1)
    assert not poc.live_pids(ws), "kit processes still alive 90 s after shutdown"
