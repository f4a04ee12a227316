"""Provisioned startup kits run on one machine (``adpfl kits ...``): the real-sites route, end to end.

``nvflare provision`` of ``poc/project.yml`` writes one startup kit per participant (server,
hospitals, project admin). Here they run on one machine over loopback, exactly as each
participant runs its own kit:

``provision``  a copy of the project file with the server's name set to ``localhost`` (also
               the name on its certificate) and a free port, ``nvflare provision`` of it, then
               each hospital's ``local/adpfl_site.json`` and ``local/privacy.json`` (the same
               writers as ``adpfl poc prepare``)
``start``      each kit's own ``startup/start.sh`` (server first), then waits until every
               hospital is connected (FLARE's session API, as the project admin)
``submit``     from the admin kit: ``nvflare job submit -j <job> --startup-kit <admin kit>``
               (the CLI an operator types), or a Recipe on ``ProdEnv(startup_kit_location=...)``
``console``    one admin console command (``check_status server``, ``list_jobs``,
               ``download_job <id>``, ``abort_job <id>`` ...), the same command strings the
               console (``<admin kit>/startup/fl_admin.sh``) takes, sent through FLARE's admin API
``stop``       ``shutdown client`` then ``shutdown server`` through the admin API, waits for
               the processes to exit, then kills whatever is left by PID

The workspace keeps the same state file as a POC workspace (``adpfl_poc.json``), so the POC
commands that talk to a running system (``adpfl poc wait/download/abort/resume``) work on it.
Written by hand because FLARE has no command that starts a set of provisioned kits on one
machine (``nvflare poc`` provisions its own kits).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from adpfl.poc.processes import free_port, kill_leftovers, live_pids, pid_file_pids, poc_env, port_in_use, run_nvflare
from adpfl.poc.project import (
    DEFAULT_SITE_EPSILON,
    DEFAULT_SITE_ROUNDS,
    check_site_policy,
    log_site_files,
    write_allow_list,
    write_site_files,
)
from adpfl.poc.state import PocError, load_state, save_state, tail

DEFAULT_PROJECT = os.path.join("poc", "project.yml")
DEFAULT_KITS_WORKSPACE = os.path.join("workspace", "kits")
LOCALHOST = "localhost"
#: the admin console's operator commands (README, "Deploy to real sites")
CONSOLE_COMMANDS = ("check_status", "submit_job", "list_jobs", "download_job", "abort_job", "shutdown")


def local_project(project_file: str, port: int, host: str = LOCALHOST) -> dict:
    """``project_file`` with the server named ``host`` and listening on ``port`` (FL and admin)."""
    import yaml

    try:
        project = yaml.safe_load(Path(project_file).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PocError(f"project file {project_file}: {e}") from None
    if not isinstance(project, dict):
        raise PocError(f"project file {project_file} holds no project")
    participants = project.get("participants") or []
    servers = [p for p in participants if p.get("type") == "server"]
    if len(servers) != 1:
        raise PocError(f"project file {project_file} must name exactly one server, found {len(servers)}")
    if not [p for p in participants if p.get("type") == "client"]:
        raise PocError(f"project file {project_file} names no client (hospital)")
    if not [p for p in participants if p.get("type") == "admin" and p.get("role") == "project_admin"]:
        raise PocError(f"project file {project_file} names no admin with role project_admin")
    servers[0].update(name=host, fed_learn_port=port, admin_port=port)
    return project


def provision(
    workspace: str = DEFAULT_KITS_WORKSPACE,
    project_file: str = DEFAULT_PROJECT,
    home: str | None = None,
    port: int = 0,
    data_root: str | None = None,
    ledger_dir: str | None = None,
    allow_list: bool = False,
    site_epsilon: float | None = DEFAULT_SITE_EPSILON,
    site_rounds: int = DEFAULT_SITE_ROUNDS,
    log: Callable[[str], None] = print,
) -> dict:
    """Provision ``project_file`` for this machine into ``<workspace>/provision``; returns the
    workspace's state. Every hospital gets its site config and privacy policy (``site_epsilon``
    None: no policy) in ``<kit>/local/``."""
    import yaml

    workspace = os.path.abspath(workspace)
    if live_pids(workspace):
        raise PocError(f"the kits in {workspace} are still running; run `adpfl kits stop -w {workspace}` first")
    if port and port_in_use(port):
        raise PocError(f"port {port} is already in use; pick another with --port, or --port 0 for a free one")
    port = port or free_port()
    check_site_policy(site_epsilon, site_rounds)
    project = local_project(project_file, port)
    out = Path(workspace) / "provision"
    if out.exists():
        shutil.rmtree(out)  # a fresh prod_00, not prod_01 next to an old one
    out.mkdir(parents=True)
    local_file = Path(workspace) / "project.yml"
    local_file.write_text(yaml.safe_dump(project, sort_keys=False))
    t0 = time.monotonic()
    proc = run_nvflare(["provision", "-p", str(local_file), "-w", str(out), "--force"], workspace, home)
    prod = out / project["name"] / "prod_00"
    if proc.returncode != 0 or not (prod / LOCALHOST / "startup" / "start.sh").is_file():
        raise PocError(f"`nvflare provision -p {local_file}` failed ({proc.returncode}):\n"
                       f"{tail(proc.stdout + proc.stderr)}")
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    admin = next(p["name"] for p in project["participants"] if p["type"] == "admin" and p["role"] == "project_admin")
    data_root = os.path.abspath(data_root) if data_root else os.path.join(workspace, "data")
    for site in sites:
        write_site_files(str(prod / site), data_root, ledger_dir, allow_list, site_epsilon, site_rounds)
    # the server keeps its job store and snapshots in its own kit, not in FLARE's default
    # /tmp/nvflare/..., which every provisioned server on the machine would share
    from nvflare.lighter.utils import update_storage_locations

    update_storage_locations(local_dir=str(prod / LOCALHOST / "local"), workspace=str(prod / LOCALHOST))
    if allow_list:
        write_allow_list(str(prod / LOCALHOST))
    state = {
        "kind": "kits", "workspace": workspace, "home": os.path.abspath(home) if home else None, "port": port,
        "project_file": str(local_file), "sites": sites, "server": LOCALHOST, "admin": admin,
        "prod_dir": str(prod), "admin_dir": str(prod / admin), "data_root": data_root, "pids": [],
    }
    save_state(workspace, state)
    log(f"provisioned {project_file} for this machine in {time.monotonic() - t0:.0f}s: {prod} "
        f"(server {LOCALHOST}:{port}, hospitals {', '.join(sites)}, admin {admin})")
    log_site_files(prod, sites, site_epsilon, site_rounds, log)
    return state


def start(workspace: str = DEFAULT_KITS_WORKSPACE, timeout: float = 180.0, extra_env: dict | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Run ``startup/start.sh`` of the server kit and of every hospital kit (each writes its
    output to ``<kit>/start_console.log``); return once every hospital is connected."""
    from adpfl.poc.admin import wait_until_connected

    state = load_state(workspace)
    alive = live_pids(workspace)
    if alive:
        raise PocError(f"the kits in {workspace} are already running (PIDs {alive}); `adpfl kits stop` first")
    if port_in_use(state["port"]):
        raise PocError(f"port {state['port']} (the server kit's) is already in use by another process; "
                       f"provision again with another port (`adpfl kits provision --port 0` picks a free one)")
    env = poc_env(workspace, state.get("home"), dict({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                                                     **(extra_env or {})))
    env.pop("NVFLARE_POC_WORKSPACE", None)
    t0 = time.monotonic()
    try:
        for name in [state["server"]] + state["sites"]:
            kit = Path(state["prod_dir"]) / name
            with open(kit / "start_console.log", "ab") as out:
                # start.sh puts startup/sub_start.sh (the kit's restart loop) in the background and returns
                rc = subprocess.call(["bash", str(kit / "startup" / "start.sh")], cwd=str(kit), env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, timeout=60)
            if rc != 0:
                raise PocError(f"{kit / 'startup' / 'start.sh'} exited with {rc}; see {kit / 'start_console.log'}")
        connected = wait_until_connected(state, timeout=max(1.0, timeout - (time.monotonic() - t0)), log=log)
    finally:
        state["pids"] = sorted(set(state.get("pids") or []) | set(pid_file_pids(state)) | set(live_pids(workspace)))
        save_state(workspace, state)
    log(f"kits up in {time.monotonic() - t0:.0f}s: server {state['server']}:{state['port']}, "
        f"hospitals {', '.join(connected)}")
    return state


@contextlib.contextmanager
def admin_console(workspace: str, timeout: float = 30.0):
    """An admin session as the project admin, yielding ``send(command) -> reply``: one console
    command string (as typed in ``fl_admin.sh``) per call, FLARE's reply checked
    (:func:`checked_reply`)."""
    from adpfl.poc.admin import close_session, session

    sess = session(load_state(workspace), timeout=timeout)
    try:
        yield lambda command: checked_reply(command, sess.api.do_command(command))
    finally:
        close_session(sess)


def console(workspace: str, *commands: str, timeout: float = 30.0) -> list[dict]:
    """Send admin console commands in order, in one session; returns FLARE's replies
    (``status``, ``data``, ``meta``). A command the server rejects raises PocError with FLARE's reason."""
    with admin_console(workspace, timeout) as send:
        return [send(command) for command in commands]


def checked_reply(command: str, reply) -> dict:
    from nvflare.fuel.hci.client.api_status import APIStatus
    from nvflare.fuel.hci.proto import MetaKey, MetaStatusValue

    if not isinstance(reply, dict):
        raise PocError(f"`{command}`: no reply from the server ({reply!r})")
    meta = reply.get("meta") or {}
    status = reply.get("status")
    if status != APIStatus.SUCCESS or meta.get(MetaKey.STATUS, MetaStatusValue.OK) != MetaStatusValue.OK:
        why = meta.get(MetaKey.INFO) or reply.get("details") or reply_text(reply)
        raise PocError(f"`{command}` failed: {meta.get(MetaKey.STATUS) or status}: {why}")
    return reply


def reply_text(reply: dict) -> str:
    """The text the console would print for ``reply`` (strings, and tables row by row)."""
    lines = []
    for item in reply.get("data") or []:
        if item.get("type") == "string":
            lines.append(str(item.get("data")))
        elif item.get("type") == "table":
            lines += ["  ".join(str(c) for c in row) for row in item.get("rows") or []]
        elif item.get("type") == "error":
            lines.append(f"error: {item.get('data')}")
    return "\n".join(lines)


def submit_cli(workspace: str, job_dir: str, log: Callable[[str], None] = print) -> str:
    """``nvflare job submit -j <job_dir> --startup-kit <admin kit>``; returns the job id (the
    CLI signs and submits a temporary copy: ``job_dir`` stays as it is)."""
    state = load_state(workspace)
    job_dir = os.path.abspath(job_dir)
    if not os.path.isfile(os.path.join(job_dir, "meta.json")):
        raise PocError(f"{job_dir} is not a job folder (no meta.json)")
    args = ["--format", "json", "job", "submit", "-j", job_dir, "--startup-kit", state["admin_dir"]]
    proc = run_nvflare(args, workspace, state.get("home"), timeout=180)
    job_id = _job_id_from_output(proc.stdout)
    if proc.returncode != 0 or not job_id:
        raise PocError(f"`nvflare job submit -j {job_dir} --startup-kit {state['admin_dir']}` failed "
                       f"({proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")
    log(f"submitted {job_dir} with `nvflare job submit` as job {job_id}")
    return job_id


def _job_id_from_output(text: str) -> str | None:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        data = doc.get("data") if isinstance(doc.get("data"), dict) else doc
        if data.get("job_id"):
            return str(data["job_id"])
    m = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)
    return m.group(0) if m else None


def submit_recipe(workspace: str, recipe, log: Callable[[str], None] = print) -> str:
    """Run ``recipe`` (an ``nvflare.recipe`` Recipe) on ``ProdEnv`` with the admin kit; returns
    the job id (the job runs on; follow it with ``adpfl poc wait``)."""
    import sys

    from adpfl.flare.recipe import make_env

    state = load_state(workspace)
    env = make_env("prod", clients=state["sites"], startup_kit=state["admin_dir"], username=state["admin"])
    with contextlib.redirect_stdout(sys.stderr):  # FLARE prints "Submitted job ..." on stdout
        job_id = recipe.run(env).get_job_id()
    log(f"submitted recipe {recipe.name if hasattr(recipe, 'name') else type(recipe).__name__} on ProdEnv "
        f"as job {job_id}")
    return job_id


def job_recipe(task: str, mode: str, workspace: str | None = None, **overrides):
    """The bundle's Recipe of ``task`` x ``mode`` (:class:`adpfl.flare.recipe.ADPFLRecipe`, the
    same one ``python jobs/job.py --env prod`` runs); with ``workspace`` its sites are the
    provisioned hospitals (each weighed by name in private jobs)."""
    from adpfl.flare.recipe import ADPFLRecipe

    if workspace is not None:
        overrides.setdefault("sites", list(load_state(workspace)["sites"]))
    return ADPFLRecipe(task, mode, **overrides)


def stop(workspace: str = DEFAULT_KITS_WORKSPACE, timeout: float = 60.0,
         log: Callable[[str], None] = print) -> list[int]:
    """Shut the system down through the admin API (``shutdown client``, ``shutdown server``),
    wait up to ``timeout`` s for its processes to exit, then kill what is left by PID. Safe
    after a failure or twice. Returns the PIDs that had to be killed."""
    workspace = os.path.abspath(workspace)
    t0 = time.monotonic()
    if live_pids(workspace):
        for command in ("shutdown client", "shutdown server"):
            try:
                console(workspace, command, timeout=10.0)
            except Exception as e:  # no clients left, server already down, ...
                log(f"`{command}`: {e}")
        deadline = time.monotonic() + timeout
        while live_pids(workspace) and time.monotonic() < deadline:
            time.sleep(0.5)
    killed = kill_leftovers(workspace)
    if killed:
        log(f"killed leftover kit processes: {killed}")
    log(f"kits in {workspace} stopped ({time.monotonic() - t0:.0f}s)")
    return killed


def run(
    job_dir: str,
    workspace: str = DEFAULT_KITS_WORKSPACE,
    project_file: str = DEFAULT_PROJECT,
    home: str | None = None,
    port: int = 0,
    data_root: str | None = None,
    result_dir: str | None = None,
    job_timeout: float = 1800.0,
    site_epsilon: float | None = DEFAULT_SITE_EPSILON,
    site_rounds: int = DEFAULT_SITE_ROUNDS,
    log: Callable[[str], None] = print,
) -> dict:
    """provision, start, ``nvflare job submit`` ``job_dir``, wait, download; always stop."""
    from adpfl.poc.admin import run_cycle

    def setup():
        provision(workspace, project_file, home=home, port=port, data_root=data_root, site_epsilon=site_epsilon,
                  site_rounds=site_rounds, log=log)
        start(workspace, log=log)

    return run_cycle(workspace, setup, lambda: submit_cli(workspace, job_dir, log=log),
                     lambda: stop(workspace, log=log), result_dir, job_timeout, log)
