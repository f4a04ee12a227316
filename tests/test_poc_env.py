"""The Recipe route on FLARE's PocEnv (``python jobs/job.py --env poc``), isolated and always stopped.

The unit tests check the isolation (HOME and the POC workspace pointed into the run's folder and
restored, a running system of the folder refused, the PocEnv stopped on Ctrl-C/SIGTERM) and the
project file (a free port, the site-kit builder). The integration test runs the command end to
end, as the README gives it, with tiny data (2 sites, 1 round) and a site privacy policy, as a
user whose HOME has no FLARE files: the job completes, the global model and the privacy report
(each site's update-level epsilon) are in the result folder, the sites enforced the policy
written into their kits by the builder, nothing was written to the user's HOME and no process
of the POC system is left.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adpfl.flare import recipe_poc
from adpfl.poc.processes import kill_leftovers, live_pids
from adpfl.poc.state import prod_dir
from flare_helpers import TINY_EXECUTOR

REPO = Path(__file__).resolve().parents[1]
SITES = ("site-1", "site-2")


class _FakeEnv:
    def __init__(self):
        self.stops = []

    def stop(self, clean_up=False):
        self.stops.append(clean_up)


def test_isolated_poc_points_flare_into_the_folder_and_stops_the_env_on_interrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/user-x")
    monkeypatch.delenv("NVFLARE_POC_WORKSPACE", raising=False)
    root = tmp_path / "run_poc"
    (root / "poc" / "stale").mkdir(parents=True)  # a previous run's system (not running): re-created
    env = _FakeEnv()
    with pytest.raises(KeyboardInterrupt):
        with recipe_poc.isolated_poc(str(root), log=lambda m: None) as state:
            assert os.environ["HOME"] == str(root / "home") and (root / "home").is_dir()
            assert os.environ["NVFLARE_POC_WORKSPACE"] == state["workspace"] == str(root / "poc")
            assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
            assert not (root / "poc" / "stale").exists()
            state["env"] = env
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` of job.py: stopped, not left running
    assert env.stops == [False]  # stopped, its workspace (logs, downloaded result) kept
    assert os.environ["HOME"] == "/home/user-x" and "NVFLARE_POC_WORKSPACE" not in os.environ
    assert signal.getsignal(signal.SIGTERM) is not recipe_poc._raise_interrupt


def test_isolated_poc_refuses_a_folder_whose_system_is_running(tmp_path):
    root = tmp_path / "run_poc"
    server = prod_dir(str(root / "poc")) / "server"
    server.mkdir(parents=True)
    # a process of that system (its command line names the system's kits, as FLARE's do)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(server)])
    try:
        with pytest.raises(ValueError, match="still running"):
            with recipe_poc.isolated_poc(str(root), log=lambda m: None):
                pass
        assert server.is_dir()  # nothing of the running system was touched
    finally:
        proc.kill()
        proc.wait()


def test_poc_env_takes_any_number_of_sites(tmp_path, monkeypatch):
    from adpfl.flare.recipe import make_env

    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))  # else PocEnv reads (makes) ~/.nvflare

    env = make_env("poc", clients=["site-1", "site-2", "site-3"], username=recipe_poc.ADMIN_USER,
                   poc_project=str(Path(recipe_poc.write_project(str(tmp_path), ["site-1"], str(tmp_path))[0])))
    assert env.clients == ["site-1", "site-2", "site-3"] and env.username == recipe_poc.ADMIN_USER


def test_project_file_has_a_free_port_and_the_site_kit_builder(tmp_path):
    path, port = recipe_poc.write_project(str(tmp_path), list(SITES), str(tmp_path / "data"), site_epsilon=8.0,
                                          site_rounds=4)
    cfg = yaml.safe_load(Path(path).read_text())
    server = next(p for p in cfg["participants"] if p["type"] == "server")
    assert server["fed_learn_port"] == server["admin_port"] == port and port not in (8002, 8003)
    assert [p["name"] for p in cfg["participants"] if p["type"] == "client"] == list(SITES)
    builder = cfg["builders"][-1]
    assert builder["path"] == "adpfl.flare.recipe_poc.SiteKitBuilder"
    assert builder["args"]["site_epsilon"] == 8.0 and builder["args"]["site_rounds"] == 4
    with pytest.raises(ValueError, match="--site-epsilon -1"):
        recipe_poc.write_project(str(tmp_path), list(SITES), str(tmp_path / "data"), site_epsilon=-1, site_rounds=4)


def test_site_kit_builder_writes_each_sites_config_and_policy(tmp_path):
    class Site:
        def __init__(self, name):
            self.name = name

    class Project:
        def get_clients(self):
            return [Site(s) for s in SITES]

    class Ctx:
        def get_ws_dir(self, entity):
            return str(tmp_path / entity.name)

    for s in SITES:
        (tmp_path / s / "local").mkdir(parents=True)
    recipe_poc.SiteKitBuilder(str(tmp_path / "data"), None, 8.0, 4).build(Project(), Ctx())
    for s in SITES:
        cfg = json.loads((tmp_path / s / "local" / "adpfl_site.json").read_text())
        assert cfg["data_root"]["skin2d"] == str(tmp_path / "data" / "skin2d")
        policy = json.loads((tmp_path / s / "local" / "privacy.json").read_text())
        args = policy["scopes"][0]["task_result_filters"][0]["args"]
        assert (args["target_epsilon"], args["planned_rounds"]) == (8.0, 4) and policy["default_scope"] == "private"


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poc_run(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("pocenv")
    root, user_home = tmp / "ws" / "skin2d_adpfl_poc", tmp / "user_home"
    user_home.mkdir()
    # registered before anything starts: whatever happens, nothing of the system outlives the module
    request.addfinalizer(lambda: kill_leftovers(str(root / "poc")))
    overrides = tmp / "tiny.json"
    overrides.write_text(json.dumps({"min_clients": 2, "executor": TINY_EXECUTOR}))
    env = {k: v for k, v in os.environ.items() if k != "NVFLARE_POC_WORKSPACE"}
    env.update(HOME=str(user_home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "jobs/job.py", "--task", "skin2d", "--mode", "adpfl", "--env", "poc",
           "-w", str(tmp / "ws"), "-n", "2", "--rounds", "1", "--overrides", str(overrides),
           "--data-root", str(tmp / "data"), "--site-epsilon", "1e5", "--timeout", "300"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    return {"proc": proc, "root": root, "user_home": user_home, "out": proc.stdout + proc.stderr}


@pytest.mark.integration
def test_poc_route_completes_with_model_and_privacy_report(poc_run):
    proc, root, out = poc_run["proc"], poc_run["root"], poc_run["out"]
    assert proc.returncode == 0, out[-4000:]
    assert "(status FINISHED:COMPLETED)" in out
    results = sorted((root / "results").iterdir())
    assert len(results) == 1 and f"result: {results[0]}" in out
    found = {p.name: p for p in results[0].rglob("*") if p.name in ("FL_global_model.pt", "privacy_report.json")}
    model = torch.load(found["FL_global_model.pt"], map_location="cpu", weights_only=False)
    assert model["model"] and all(torch.is_tensor(v) for v in model["model"].values())
    assert f"model:        {found['FL_global_model.pt']}" in out
    report = json.loads(found["privacy_report.json"].read_text())
    assert report["delta"] == 1e-5 and set(report["sites"]) == set(SITES)
    for site in SITES:
        info = report["sites"][site]
        assert info["releases"] == 1 and 0 < info["epsilon_rdp"] <= 1e5, (site, info)
        # the policy the builder put into the site's kit before it started is what protected it
        kit = prod_dir(str(root / "poc")) / site
        assert json.loads((kit / "local" / "privacy.json").read_text())["default_scope"] == "private"
        assert any("settings are superseded" in p.read_text(errors="replace") for p in kit.glob("*/log.txt"))


@pytest.mark.integration
def test_poc_route_is_isolated_and_leaves_no_process(poc_run):
    root, out = poc_run["root"], poc_run["out"]
    assert poc_run["proc"].returncode == 0, out[-4000:]
    assert not (poc_run["user_home"] / ".nvflare").exists()  # the user's FLARE files were not touched
    port = yaml.safe_load((root / "project.yml").read_text())["participants"][0]["fed_learn_port"]
    assert f"server on localhost:{port}" in out and port not in (8002, 8003)
    server_cfg = json.loads((prod_dir(str(root / "poc")) / "server" / "startup" / "fed_server.json").read_text())
    assert str(port) in json.dumps(server_cfg["servers"])
    assert "POC system stopped, no process left" in out
    assert live_pids(str(root / "poc")) == []
