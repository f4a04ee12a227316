"""`nvflare provision` of poc/project.yml, and the allow-list route of locked-down sites.

The end-to-end version of the allow-list route (a job without app/custom/ refused with
ComponentNotAuthorized, then run once the sites allow-list adpfl.*) runs on a real POC
system in test_poc.py; here FLARE's own ComponentPathAuthorizer is checked against a
provisioned kit's local/resources.json.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adpfl import poc

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "poc" / "project.yml"
SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    ws = tmp_path_factory.mktemp("provision")
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    env = dict(os.environ, HOME=str(ws / "home"))
    proc = subprocess.run(
        [nvflare, "provision", "-p", str(PROJECT), "-w", str(ws), "--force"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    project = yaml.safe_load(PROJECT.read_text())
    return ws / project["name"] / "prod_00", project


def _participants(project, kind):
    return [p for p in project["participants"] if p["type"] == kind]


def test_project_file_describes_one_server_three_hospitals_one_admin():
    project = yaml.safe_load(PROJECT.read_text())
    assert len(_participants(project, "server")) == 1
    assert sorted(p["name"] for p in _participants(project, "client")) == list(SITES)
    admins = _participants(project, "admin")
    assert len(admins) == 1 and admins[0]["role"] == "project_admin"
    assert [b["path"].rsplit(".", 1)[-1] for b in project["builders"]] == [
        "WorkspaceBuilder", "StaticFileBuilder", "CertBuilder", "SignatureBuilder",
    ]


def test_startup_kits_for_server_sites_and_admin(kits):
    from cryptography import x509

    prod, project = kits
    server = _participants(project, "server")[0]
    admin = _participants(project, "admin")[0]["name"]
    root_ca = x509.load_pem_x509_certificate((prod / server["name"] / "startup" / "rootCA.pem").read_bytes())

    def check_cert(path: Path, name: str):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == name
        assert cert.issuer == root_ca.subject  # signed by the project's root CA

    s = prod / server["name"] / "startup"
    for f in ("fed_server.json", "server.crt", "server.key", "rootCA.pem", "start.sh"):
        assert (s / f).is_file(), f
    fed_server = json.loads((s / "fed_server.json").read_text())
    assert fed_server["servers"][0]["service"]["target"].endswith(f":{server['fed_learn_port']}")
    check_cert(s / "server.crt", server["name"])

    for site in SITES:
        c = prod / site / "startup"
        for f in ("fed_client.json", "client.crt", "client.key", "rootCA.pem", "start.sh"):
            assert (c / f).is_file(), (site, f)
        fed_client = json.loads((c / "fed_client.json").read_text())
        assert fed_client["client"]["fqsn"] == site
        assert fed_client["servers"][0]["service"]["target"] == f"{server['name']}:{server['fed_learn_port']}"
        check_cert(c / "client.crt", site)
        assert (prod / site / "local" / "resources.json.default").is_file()
        assert os.access(c / "start.sh", os.X_OK)

    a = prod / admin / "startup"
    for f in ("fed_admin.json", "client.crt", "client.key", "rootCA.pem", "fl_admin.sh"):
        assert (a / f).is_file(), f
    fed_admin = json.loads((a / "fed_admin.json").read_text())
    assert fed_admin["admin"]["host"] == server["name"]
    assert fed_admin["admin"]["port"] == server["fed_learn_port"]
    check_cert(a / "client.crt", admin)


def _authorize(kit: Path, path: str):
    from nvflare.apis.workspace import Workspace
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    ComponentPathAuthorizer().authorize_component_config({"path": path}, workspace=Workspace(str(kit)))


def test_locked_down_site_allow_lists_the_installed_package(kits):
    from nvflare.apis.fl_exception import UnsafeComponentError

    prod, project = kits
    site = prod / "hospital-a"
    server = prod / _participants(project, "server")[0]["name"]
    executor = "adpfl.flare.executor.SegmentationExecutor"
    persistor = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
    # FLARE's default allow-list (resources.json.default): no adpfl class, no PT persistor
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        _authorize(site, executor)
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        _authorize(server, persistor)

    written = poc.write_allow_list(str(site))
    poc.write_allow_list(str(server))
    assert written == site / "local" / "resources.json"
    resources = json.loads(written.read_text())
    assert "adpfl." in resources["class_allow_list"]
    assert resources["class_list_enforcement_mode"] == "enforce"
    # the default list is kept: the FLARE classes the jobs use stay allowed
    default = json.loads((site / "local" / "resources.json.default").read_text())
    assert set(default["class_allow_list"]) <= set(resources["class_allow_list"])

    for path in (executor, "adpfl.flare.privacy_filter.ADPFilter",
                 "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent"):
        _authorize(site, path)
    for path in ("adpfl.tasks.network.TaskNetwork", "adpfl.flare.privacy_widget.PrivacyAccountingWidget", persistor,
                 "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"):
        _authorize(server, path)
    # the allow-list is a package prefix, not "anything goes"
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        _authorize(site, "adpflx.evil.Component")
    # idempotent
    poc.write_allow_list(str(site))
    again = json.loads(written.read_text())["class_allow_list"]
    assert again.count("adpfl.") == 1


def test_every_class_of_the_checked_in_jobs_is_allowed_after_allow_listing(kits, tmp_path):
    """What a locked-down site allow-lists covers every component the bundle's jobs name."""
    prod, project = kits
    site, server = prod / "hospital-b", prod / _participants(project, "server")[0]["name"]
    poc.write_allow_list(str(site))
    poc.write_allow_list(str(server))
    paths = {"server": set(), "client": set()}

    def collect(node, into):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and "." in node["path"]:
                into.add(node["path"])
            for v in node.values():
                collect(v, into)
        elif isinstance(node, list):
            for v in node:
                collect(v, into)

    for cfg in (REPO / "jobs").glob("*/app/config/config_fed_server.json"):
        collect(json.loads(cfg.read_text()), paths["server"])
    for cfg in (REPO / "jobs").glob("*/app/config/config_fed_client.json"):
        collect(json.loads(cfg.read_text()), paths["client"])
    assert paths["server"] and paths["client"]
    for p in sorted(paths["server"]):
        _authorize(server, p)
    for p in sorted(paths["client"]):
        _authorize(site, p)


def test_kits_project_copy_names_the_server_localhost_on_the_chosen_port():
    from adpfl.poc import kits

    project = kits.local_project(str(PROJECT), 43210)
    server = _participants(project, "server")[0]
    assert (server["name"], server["fed_learn_port"], server["admin_port"]) == ("localhost", 43210, 43210)
    assert [p["name"] for p in _participants(project, "client")] == list(SITES)
    assert yaml.safe_load(PROJECT.read_text())["participants"][0]["name"] == "fl-server"  # the file is untouched


def test_kits_bad_project_file_or_workspace_is_a_clear_error(tmp_path, capsys):
    from adpfl.cli import main
    from adpfl.poc import kits

    two_servers = yaml.safe_load(PROJECT.read_text())
    two_servers["participants"].append(dict(_participants(two_servers, "server")[0], name="other"))
    bad = tmp_path / "project.yml"
    bad.write_text(yaml.safe_dump(two_servers))
    with pytest.raises(poc.PocError, match="must name exactly one server, found 2"):
        kits.provision(str(tmp_path / "ws"), str(bad))
    assert main(["kits", "provision", "-w", str(tmp_path / "ws"), "-p", str(tmp_path / "missing.yml")]) == 2
    assert "missing.yml" in capsys.readouterr().err
    assert main(["kits", "console", "-w", str(tmp_path / "nothing"), "list_jobs"]) == 2
    assert "is not a workspace prepared by" in capsys.readouterr().err
