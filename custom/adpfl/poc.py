"""Run this bundle's jobs on a local FLARE POC system (``adpfl poc ...``).

A POC system is a real FLARE deployment on one machine: a server process and one
process per site, each with its own startup kit and workspace, talking over a local
port with mutual TLS. Unlike the simulator it runs jobs exactly as a real federation
does (job submission over the admin API, one job process per site, site-local
configuration in ``<site>/local/``), and it keeps running between jobs, so a site's
privacy ledger carries over from one job to the next.

Steps (each is one function here and one ``adpfl poc`` sub-command):

``prepare``   ``nvflare poc prepare`` from a generated project.yml: server + site-1..site-N
              + one project admin, on a free port; writes each site's
              ``local/adpfl_site.json`` (where its data and ledger live) and, unless opted
              out, ``local/privacy.json``: the site's own privacy policy on every job
              (:mod:`adpfl.flare.site_policy`)
``start``     ``nvflare poc start --no-wait`` (server and sites only, no admin console),
              then waits until every site is connected (FLARE's session API)
``submit``    submits a job folder, prints its id
``wait``      follows a job (status, current round from the server's job log) until done
``download``  downloads the job's result and finds the global model, TensorBoard logs,
              privacy_report.json and the final validation in it
``stop``      ``nvflare poc stop``, then ends any process of this POC system still alive,
              by PID (the service PID files and a scan for processes of this workspace)
``run``       all of the above for one job, with ``stop`` in a ``finally``

``nvflare poc`` keeps its settings in ``$HOME/.nvflare/config.conf`` and uses
``$NVFLARE_POC_WORKSPACE``; every function takes ``workspace`` and ``home`` so a test (or a
user with several systems) keeps them apart. The processes FLARE starts run ``python3``
from PATH: this module puts the running interpreter's ``bin`` folder first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

PROJECT_NAME = "adpfl_poc"
ADMIN_USER = "admin@adpfl.local"
SERVER_NAME = "server"
ORG = "adpfl"
STATE_FILE = "adpfl_poc.json"
DEFAULT_WORKSPACE = os.path.join("workspace", "poc")

#: classes a site must allow when it refuses custom code (jobs without app/custom/):
#: the bundle's own package plus the FLARE classes its jobs use that are not on FLARE's
#: default class_allow_list
ADPFL_ALLOW_LIST = ("adpfl.", "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor")

_ROUND_RE = re.compile(r"Round (\d+) started")
_TERMINAL = ("FINISHED", "FAILED", "ABORTED", "ABANDONED")


class PocError(RuntimeError):
    """A POC step failed; the message says what to do."""


# ---------------------------------------------------------------------------- environment
def nvflare_bin() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "nvflare")
    return path if os.path.exists(path) else (shutil.which("nvflare") or "nvflare")


def poc_env(workspace: str, home: Optional[str] = None, extra: Optional[dict] = None) -> Dict[str, str]:
    """Environment for ``nvflare poc`` and the processes it starts."""
    env = dict(os.environ)
    env["NVFLARE_POC_WORKSPACE"] = os.path.abspath(workspace)
    if home:
        env["HOME"] = os.path.abspath(home)
        os.makedirs(env["HOME"], exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _nvflare(args: List[str], workspace: str, home: Optional[str], timeout: float = 120, extra_env=None):
    cmd = [nvflare_bin()] + args
    try:
        proc = subprocess.run(
            cmd, env=poc_env(workspace, home, extra_env), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise PocError(f"`nvflare {' '.join(args)}` did not finish within {timeout:.0f}s") from e
    return proc


# ---------------------------------------------------------------------------- ports
def port_in_use(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- state
def prod_dir(workspace: str) -> Path:
    return Path(workspace).resolve() / PROJECT_NAME / "prod_00"


def load_state(workspace: str) -> dict:
    path = Path(workspace) / STATE_FILE
    if not path.is_file():
        raise PocError(f"{workspace} is not a POC workspace prepared by `adpfl poc prepare` (no {STATE_FILE})")
    return json.loads(path.read_text())


def _save_state(workspace: str, state: dict) -> None:
    path = Path(workspace) / STATE_FILE
    path.write_text(json.dumps(state, indent=2))


def site_names(n: int) -> List[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


# ---------------------------------------------------------------------------- prepare
def project_config(sites: Iterable[str], port: int, name: str = PROJECT_NAME) -> dict:
    """The POC's project.yml: one server, the sites, one project admin, one port for
    both the FL and the admin connection."""
    participants = [
        {"name": SERVER_NAME, "type": "server", "org": ORG, "fed_learn_port": port, "admin_port": port},
        {"name": ADMIN_USER, "type": "admin", "org": ORG, "role": "project_admin"},
    ]
    participants += [{"name": s, "type": "client", "org": ORG} for s in sites]
    return {
        "api_version": 3,
        "name": name,
        "description": "adpfl POC system",
        "participants": participants,
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def site_config(data_root: str, ledger_dir: Optional[str] = None) -> dict:
    """``local/adpfl_site.json`` of a POC site: each task's data under ``<data_root>/<task>``."""
    from adpfl.flare.jobs import TASKS

    cfg = {"data_root": {t: os.path.join(os.path.abspath(data_root), t) for t in TASKS}}
    if ledger_dir:
        cfg["ledger_dir"] = os.path.abspath(ledger_dir)
    return cfg


def write_allow_list(participant_dir: str, extra: Iterable[str] = ADPFL_ALLOW_LIST) -> Path:
    """Make ``<participant>/local/resources.json`` allow ``extra`` next to FLARE's
    default class_allow_list (the route for sites that refuse jobs with custom code).

    Starts from the participant's existing resources.json, else its resources.json.default
    (both generated by provisioning), so the rest of the site's resources stay as they are.
    """
    local = Path(participant_dir) / "local"
    target = local / "resources.json"
    source = target if target.is_file() else local / "resources.json.default"
    if not source.is_file():
        raise PocError(f"{participant_dir} has no local/resources.json(.default); is it a startup kit?")
    resources = json.loads(source.read_text())
    if "class_allow_list" not in resources:
        from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

        resources["class_allow_list"] = list(DEFAULT_CLASS_ALLOW_LIST)
    allow = resources["class_allow_list"]
    for entry in extra:
        if entry not in allow:
            allow.append(entry)
    resources.setdefault("class_list_enforcement_mode", "enforce")
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(resources, indent=2))
    os.replace(tmp, target)
    return target


def remove_allow_list(participant_dir: str, extra: Iterable[str] = ADPFL_ALLOW_LIST) -> Optional[Path]:
    target = Path(participant_dir) / "local" / "resources.json"
    if not target.is_file():
        return None
    resources = json.loads(target.read_text())
    resources["class_allow_list"] = [c for c in resources.get("class_allow_list", []) if c not in set(extra)]
    target.write_text(json.dumps(resources, indent=2))
    return target


def prepare(
    workspace: str = DEFAULT_WORKSPACE,
    sites: int = 2,
    home: Optional[str] = None,
    port: int = 0,
    data_root: Optional[str] = None,
    ledger_dir: Optional[str] = None,
    allow_list: bool = False,
    log: Callable[[str], None] = print,
    site_epsilon: Optional[float] = 8.0,
    site_rounds: int = 20,
) -> dict:
    """Create (or re-create) the POC workspace; returns its state (port, sites, folders).

    ``site_epsilon``/``site_rounds``: each site's own budget (site-level update DP at delta
    1e-5, Opacus RDP) over that many releases in total, enforced on every job through the
    site's ``local/privacy.json``; ``site_epsilon=None`` writes no policy (the jobs decide)."""
    workspace = os.path.abspath(workspace)
    if sites < 1:
        raise PocError("a POC system needs at least one site (--sites N, N >= 1)")
    if os.path.exists(os.path.join(workspace, STATE_FILE)):
        alive = _live_pids(workspace)
        if alive:
            raise PocError(f"the POC system in {workspace} is still running (PIDs {alive}); run `adpfl poc stop` first")
    if port:
        if port_in_use(port):
            raise PocError(f"port {port} is already in use; pick another with --port, or --port 0 for a free one")
    else:
        port = free_port()
    if site_epsilon is not None:
        from adpfl.flare.site_policy import privacy_json_document

        try:  # a bad budget fails before anything is written
            privacy_json_document(site_epsilon, site_rounds)
        except Exception as e:
            raise PocError(f"site privacy policy (--site-epsilon {site_epsilon}, --site-rounds {site_rounds}): {e}") from None
    names = site_names(sites)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adpfl_poc_") as tmp:
        import yaml

        project_file = os.path.join(tmp, "project.yml")
        with open(project_file, "w") as f:
            yaml.safe_dump(project_config(names, port), f, sort_keys=False)
        proc = _nvflare(["poc", "prepare", "-i", project_file, "--force"], workspace, home)
    if proc.returncode != 0:
        raise PocError(f"`nvflare poc prepare` failed ({proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    prod = prod_dir(workspace)
    if not (prod / SERVER_NAME / "startup" / "fed_server.json").is_file():
        raise PocError(f"`nvflare poc prepare` wrote no server startup kit under {prod}:\n{_tail(proc.stdout)}")
    data_root = os.path.abspath(data_root) if data_root else os.path.join(workspace, "data")
    for name in names:
        cfg_path = prod / name / "local" / "adpfl_site.json"
        cfg_path.write_text(json.dumps(site_config(data_root, ledger_dir), indent=2))
        if allow_list:
            write_allow_list(str(prod / name))
        if site_epsilon is not None:
            from adpfl.flare.site_policy import write_privacy_json

            write_privacy_json(str(prod / name), site_epsilon, site_rounds)
    if allow_list:
        write_allow_list(str(prod / SERVER_NAME))
    state = {
        "workspace": workspace,
        "home": os.path.abspath(home) if home else None,
        "port": port,
        "sites": names,
        "server": SERVER_NAME,
        "admin": ADMIN_USER,
        "prod_dir": str(prod),
        "admin_dir": str(prod / ADMIN_USER),
        "data_root": data_root,
        "pids": [],
    }
    _save_state(workspace, state)
    log(f"POC workspace {workspace}: server on port {port}, sites {', '.join(names)} "
        f"(prepared in {time.perf_counter() - t0:.0f}s)")
    for name in names:
        log(f"  {name}: site config {prod / name / 'local' / 'adpfl_site.json'}"
            + (f"; privacy policy {prod / name / 'local' / 'privacy.json'} (epsilon {site_epsilon} over "
               f"{site_rounds} releases)" if site_epsilon is not None else "; no site privacy policy"))
    return state


# ---------------------------------------------------------------------------- start
def start(
    workspace: str = DEFAULT_WORKSPACE,
    home: Optional[str] = None,
    timeout: float = 120.0,
    extra_env: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Start the server and every site in the background; return once all sites are
    connected to the server (raises PocError after ``timeout`` seconds)."""
    state = load_state(workspace)
    home = home or state.get("home")
    alive = _live_pids(workspace)
    if alive:
        raise PocError(f"the POC system in {workspace} is already running (PIDs {alive}); `adpfl poc stop` first")
    if port_in_use(state["port"]):
        raise PocError(
            f"port {state['port']} (the POC server's) is already in use by another process; stop it or "
            f"prepare again with another port (`adpfl poc prepare --port 0` picks a free one)"
        )
    t0 = time.monotonic()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.update(extra_env or {})
    proc = _nvflare(["poc", "start", "--no-wait"], workspace, home, timeout=60, extra_env=env)
    state["pids"] = sorted(set(_pid_file_pids(state)))
    _save_state(workspace, state)
    if proc.returncode != 0:
        raise PocError(f"`nvflare poc start` failed ({proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    try:
        connected = wait_until_connected(state, timeout=max(1.0, timeout - (time.monotonic() - t0)), log=log)
    finally:
        state["pids"] = sorted(set(state["pids"]) | set(_pid_file_pids(state)))
        _save_state(workspace, state)
    log(f"POC system up in {time.monotonic() - t0:.0f}s: server port {state['port']}, sites {', '.join(connected)}")
    return state


def session(state: dict, timeout: float = 10.0):
    """An admin session (FLARE's Python API) as the POC's project admin."""
    import contextlib

    from nvflare.fuel.flare_api.flare_api import new_secure_session

    # FLARE prints "Connecting to FLARE ..." on stdout; keep stdout for results (job ids)
    with contextlib.redirect_stdout(sys.stderr):
        return new_secure_session(state["admin"], state["admin_dir"], timeout=timeout)


def wait_until_connected(state: dict, timeout: float = 120.0, log: Callable[[str], None] = print) -> List[str]:
    expected = set(state["sites"])
    deadline = time.monotonic() + timeout
    last_err, connected = "", set()
    sess = None
    try:
        while time.monotonic() < deadline:
            _check_services_alive(state)
            try:
                if sess is None:
                    sess = session(state, timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                info = sess.get_system_info()
                now = {c.name for c in info.client_info}
                if now != connected:
                    log(f"  connected sites: {', '.join(sorted(now)) or '(none yet)'}")
                connected = now
                if expected <= connected:
                    return sorted(connected)
            except Exception as e:  # server not up yet, login refused while starting, ...
                last_err = f"{type(e).__name__}: {e}"
                if sess is not None:
                    _close(sess)
                    sess = None
            time.sleep(1.0)
    finally:
        if sess is not None:
            _close(sess)
    missing = sorted(expected - connected)
    logs = "\n".join(f"  {p}" for p in _service_logs(state))
    raise PocError(
        f"POC system not ready after {timeout:.0f}s: sites not connected: {missing or 'none'}; "
        f"connected: {sorted(connected)}" + (f"; last error: {last_err}" if last_err and not connected else "")
        + f"\nservice logs:\n{logs}"
    )


def _check_services_alive(state: dict) -> None:
    prod = Path(state["prod_dir"])
    for name in [state["server"]] + state["sites"]:
        daemon = prod / name / "daemon_pid.fl"
        if daemon.is_file():
            continue
        console = prod / name / "poc_console.log"
        if console.is_file() and "System is in trouble" in console.read_text(errors="replace"):
            raise PocError(f"{name} failed to start repeatedly; see {console}:\n{_tail(console.read_text())}")


# ---------------------------------------------------------------------------- jobs
def submit(workspace: str, job_dir: str, log: Callable[[str], None] = print) -> str:
    state = load_state(workspace)
    job_dir = os.path.abspath(job_dir)
    if not os.path.isfile(os.path.join(job_dir, "meta.json")):
        raise PocError(f"{job_dir} is not a job folder (no meta.json)")
    sess = session(state)
    try:
        # FLARE signs the submitted folder in place (.__nvfl_sig.json, .__nvfl_submitter.crt
        # in every folder): submit a copy so checked-in job folders stay clean
        with tempfile.TemporaryDirectory(prefix="adpfl_submit_") as tmp:
            copy = os.path.join(tmp, os.path.basename(job_dir))
            shutil.copytree(job_dir, copy, symlinks=False)
            job_id = sess.submit_job(copy)
    finally:
        _close(sess)
    log(f"submitted {job_dir} as job {job_id}")
    return job_id


def current_round(state: dict, job_id: str) -> Optional[int]:
    """The round the server's job process last started (from its log), or None."""
    log_file = Path(state["prod_dir"]) / state["server"] / job_id / "log.txt"
    if not log_file.is_file():
        return None
    rounds = _ROUND_RE.findall(log_file.read_text(errors="replace"))
    return int(rounds[-1]) if rounds else None


def wait(
    workspace: str, job_id: str, timeout: float = 600.0, poll: float = 2.0, log: Callable[[str], None] = print
) -> dict:
    """Follow ``job_id`` until it ends; returns its final job meta (raises PocError on timeout)."""
    state = load_state(workspace)
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    last = None
    sess = session(state)
    try:
        while True:
            meta = sess.get_job_meta(job_id)
            status = str(meta.get("status", ""))
            rnd = current_round(state, job_id)
            if rnd is None and last is not None:
                rnd = last[1]  # the server's job folder goes away when the job ends
            if (status, rnd) != last:
                where = f", round {rnd}" if rnd is not None else ""
                log(f"  [{time.monotonic() - t0:5.0f}s] job {job_id}: {status}{where}")
                last = (status, rnd)
            if status.startswith(_TERMINAL):
                return meta
            if time.monotonic() > deadline:
                raise PocError(
                    f"job {job_id} still {status} after {timeout:.0f}s (abort it with "
                    f"`nvflare job abort {job_id}` or `adpfl poc stop`); server log: "
                    f"{Path(state['prod_dir']) / state['server'] / job_id / 'log.txt'}"
                )
            time.sleep(poll)
    finally:
        _close(sess)


def locate_results(result_dir: str) -> dict:
    """Where a downloaded job result keeps the global model, TB logs and the reports."""
    root = Path(result_dir)

    def first(pattern: str, want_dir: bool = False) -> Optional[str]:
        for p in sorted(root.rglob(pattern)):
            if p.is_dir() == want_dir:
                return str(p)
        return None

    out = {
        "result_dir": str(root),
        "global_model": first("FL_global_model.pt"),
        "best_global_model": first("best_FL_global_model.pt"),
        "tensorboard": first("tb_events", want_dir=True),
        "privacy_report": first("privacy_report.json"),
        "cross_site_val": first("cross_val_results.json"),
    }
    return out


def download(workspace: str, job_id: str, dest: str, log: Callable[[str], None] = print) -> dict:
    """Download the job's result (the server's job workspace) into ``dest``; returns
    :func:`locate_results` of it."""
    state = load_state(workspace)
    sess = session(state)
    try:
        path = sess.download_job_result(job_id, os.path.abspath(dest))
    finally:
        _close(sess)
    if not path or not os.path.isdir(path):
        raise PocError(f"download of job {job_id} returned no folder ({path!r})")
    found = locate_results(path)
    log(f"job {job_id} result in {path}")
    for key in ("global_model", "best_global_model", "tensorboard", "privacy_report", "cross_site_val"):
        log(f"  {key:17s} {found[key] or '(not in the result)'}")
    return found


def abort(workspace: str, job_id: str, log: Callable[[str], None] = print) -> None:
    """Abort a running job (its sites stop; what they released stays in their ledgers)."""
    state = load_state(workspace)
    sess = session(state)
    try:
        sess.abort_job(job_id)
    finally:
        _close(sess)
    log(f"abort requested for job {job_id}")


def resume(workspace: str, job_id: str, job_dir: str, log: Callable[[str], None] = print) -> str:
    """Submit a job that continues the stopped (aborted, failed or cut off) job ``job_id``
    from its last persisted round; ``job_dir`` is the job folder it was submitted from.

    The stopped job's progress and global model come from the server's job folder (still
    there when the server died) or else from its downloaded result. The model is copied to
    ``<server kit>/local/adpfl_resume/`` (the server loads it from that absolute path), the
    resume job is written next to it and submitted. Returns the new job id.
    """
    from adpfl.flare.resume import ResumeError, make_resume_job, read_progress

    state = load_state(workspace)
    server_dir = Path(state["prod_dir"]) / state["server"]
    run_dir = server_dir / job_id
    if not (run_dir / "run_progress.json").is_file():
        dest = Path(workspace) / "resume" / job_id
        if dest.exists():
            shutil.rmtree(dest)
        run_dir = Path(download(workspace, job_id, str(dest), log=lambda m: None)["result_dir"])
    try:
        found = sorted(run_dir.rglob("run_progress.json"))
        if not found:
            raise ResumeError(f"job {job_id} recorded no completed round (no run_progress.json in {run_dir})")
        progress = read_progress(str(found[0]))
        models = sorted(p for p in run_dir.rglob("FL_global_model.pt") if not p.name.startswith("best_"))
        if not models:
            raise ResumeError(f"job {job_id} left no FL_global_model.pt under {run_dir}")
        k = int(progress["last_completed_round"])
        keep = server_dir / "local" / "adpfl_resume"
        keep.mkdir(parents=True, exist_ok=True)
        checkpoint = keep / f"{job_id}_round{k}_FL_global_model.pt"
        shutil.copyfile(models[0], checkpoint)
        out = keep / "jobs" / f"{os.path.basename(os.path.normpath(job_dir))}_from_round{k + 1}"
        info = make_resume_job(job_dir, str(out), progress, str(checkpoint))
    except ResumeError as e:
        raise PocError(str(e)) from None
    log(f"job {job_id} stopped after round {k}: resuming at round {info['start_round']} of {info['num_rounds']} "
        f"from {checkpoint}")
    return submit(workspace, info["job"], log=log)


def site_ledger(workspace: str, site: str, task: str) -> Path:
    """The site's own privacy ledger file (default location: the site's workspace)."""
    state = load_state(workspace)
    site_dir = Path(state["prod_dir"]) / site
    from adpfl.flare.site_config import resolve_ledger_dir

    return Path(resolve_ledger_dir("", str(site_dir))) / site / f"{task}.json"


# ---------------------------------------------------------------------------- stop
def stop(workspace: str = DEFAULT_WORKSPACE, home: Optional[str] = None, timeout: float = 60.0,
         grace: float = 15.0, log: Callable[[str], None] = print) -> List[int]:
    """Stop the POC system: ``nvflare poc stop`` first, then end every process of this
    workspace still alive, by PID. Safe to call after a failure or twice. Returns the
    PIDs that had to be killed."""
    workspace = os.path.abspath(workspace)
    try:
        state = load_state(workspace)
    except PocError:
        state = {"workspace": workspace, "prod_dir": str(prod_dir(workspace)), "pids": []}
    home = home or state.get("home")
    t0 = time.monotonic()
    if _live_pids(workspace):
        try:
            proc = _nvflare(["poc", "stop"], workspace, home, timeout=timeout)
            if proc.returncode != 0:
                log(f"`nvflare poc stop` exited with {proc.returncode}; killing the processes instead")
        except PocError as e:
            log(f"{e}; killing the processes instead")
        _wait_gone(lambda: _live_pids(workspace), grace)
    killed = kill_leftovers(workspace)
    if killed:
        log(f"killed leftover POC processes: {killed}")
    log(f"POC system in {workspace} stopped ({time.monotonic() - t0:.0f}s)")
    return killed


def kill_leftovers(workspace: str, grace: float = 5.0) -> List[int]:
    pids = _live_pids(workspace)
    if not pids:
        return []
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait_gone(lambda: _live_pids(workspace), grace)
    rest = _live_pids(workspace)
    for pid in rest:
        _signal(pid, signal.SIGKILL)
    _wait_gone(lambda: _live_pids(workspace), grace)
    return pids


def _live_pids(workspace: str) -> List[int]:
    """PIDs of this POC system's processes: the services' PID files, the PIDs recorded at
    start, their descendants, and any process whose command line names this workspace's
    startup kits (job processes of a crashed parent)."""
    import psutil

    workspace = os.path.abspath(workspace)
    prod = str(prod_dir(workspace))
    try:
        state = load_state(workspace)
    except PocError:
        state = {"prod_dir": prod, "pids": []}
    me = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    cands = set(state.get("pids") or []) | set(_pid_file_pids(state))
    roots = set()
    for pid in cands:
        try:
            p = psutil.Process(pid)
            if prod in " ".join(p.cmdline()):
                roots.add(pid)
                roots.update(c.pid for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    uid = os.getuid()
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            if p.info["uids"] is not None and p.info["uids"].real != uid:
                continue
            cmd = p.info["cmdline"] or []
            if any(prod in arg for arg in cmd):
                roots.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    alive = []
    for pid in sorted(roots - me):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _pid_file_pids(state: dict) -> List[int]:
    out = []
    prod = Path(state.get("prod_dir") or "")
    names = [state.get("server", SERVER_NAME)] + list(state.get("sites") or [])
    for name in names:
        for fname in ("daemon_pid.fl", "pid.fl"):
            f = prod / name / fname
            try:
                out.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
    return out


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


def _wait_gone(fn, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while fn() and time.monotonic() < deadline:
        time.sleep(0.5)


def _close(sess) -> None:
    try:
        sess.close()
    except Exception:
        pass


def _service_logs(state: dict) -> List[str]:
    prod = Path(state["prod_dir"])
    out = []
    for name in [state["server"]] + state["sites"]:
        for fname in ("log.txt", "poc_console.log"):
            if (prod / name / fname).is_file():
                out.append(str(prod / name / fname))
    return out


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ---------------------------------------------------------------------------- run
def run(
    job_dir: str,
    workspace: str = DEFAULT_WORKSPACE,
    sites: int = 2,
    home: Optional[str] = None,
    port: int = 0,
    data_root: Optional[str] = None,
    result_dir: Optional[str] = None,
    start_timeout: float = 120.0,
    job_timeout: float = 1800.0,
    log: Callable[[str], None] = print,
) -> dict:
    """prepare, start, submit ``job_dir``, wait, download; always stop."""
    try:
        prepare(workspace, sites=sites, home=home, port=port, data_root=data_root, log=log)
        start(workspace, home=home, timeout=start_timeout, log=log)
        job_id = submit(workspace, job_dir, log=log)
        meta = wait(workspace, job_id, timeout=job_timeout, log=log)
        found = download(workspace, job_id, result_dir or os.path.join(workspace, "results"), log=log)
        found.update(job_id=job_id, status=meta.get("status"))
        return found
    finally:
        stop(workspace, home=home, log=log)


# ---------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """Register ``adpfl poc ...`` on the ``adpfl`` command's sub-parsers."""
    p = sub.add_parser("poc", help="run jobs on a local FLARE POC system (server + N site processes)")
    psub = p.add_subparsers(dest="poc_command", required=True)

    def common(q):
        q.add_argument("-w", "--workspace", default=DEFAULT_WORKSPACE, help="POC workspace (NVFLARE_POC_WORKSPACE)")
        q.add_argument("--home", default=None, help="HOME for nvflare's ~/.nvflare/config.conf (default: yours)")

    q = psub.add_parser("prepare", help="create the POC workspace (server, site-1..site-N, admin)")
    common(q)
    q.add_argument("-n", "--sites", type=int, default=2)
    q.add_argument("--port", type=int, default=0, help="server port (default 0: a free one)")
    q.add_argument("--data-root", default=None, help="sites' data parent: <data-root>/<task>/<site> (default <workspace>/data)")
    q.add_argument("--ledger-dir", default=None, help="sites' privacy ledger folder (default: each site's workspace)")
    q.add_argument("--allow-list", action="store_true",
                   help="allow-list adpfl.* in every site's local/resources.json (jobs without app/custom/)")
    q.add_argument("--site-epsilon", type=float, default=8.0,
                   help="each site's own budget (site-level update DP, delta 1e-5) enforced on every job "
                        "through its local/privacy.json (default 8)")
    q.add_argument("--site-rounds", type=int, default=20, help="releases the site's budget covers in total (default 20)")
    q.add_argument("--no-site-policy", action="store_true", help="write no local/privacy.json: each job decides")
    q.set_defaults(func=_cli(lambda a: prepare(a.workspace, a.sites, a.home, a.port, a.data_root, a.ledger_dir,
                                               a.allow_list, site_epsilon=None if a.no_site_policy else a.site_epsilon,
                                               site_rounds=a.site_rounds)))

    q = psub.add_parser("start", help="start server and sites; wait until all sites are connected")
    common(q)
    q.add_argument("--timeout", type=float, default=120.0)
    q.set_defaults(func=_cli(lambda a: start(a.workspace, a.home, a.timeout)))

    q = psub.add_parser("submit", help="submit a job folder; prints the job id")
    common(q)
    q.add_argument("job_dir")
    q.set_defaults(func=_cli(lambda a: print(submit(a.workspace, a.job_dir, log=_stderr))))

    q = psub.add_parser("wait", help="follow a job (status, round) until it ends")
    common(q)
    q.add_argument("job_id")
    q.add_argument("--timeout", type=float, default=1800.0)
    q.set_defaults(func=_cli(_cli_wait))

    q = psub.add_parser("download", help="download a job's result; show where model, TB logs, report are")
    common(q)
    q.add_argument("job_id")
    q.add_argument("-o", "--output", default=None, help="destination folder (default <workspace>/results)")
    q.set_defaults(func=_cli(lambda a: download(a.workspace, a.job_id, a.output or os.path.join(a.workspace, "results"))))

    q = psub.add_parser("abort", help="abort a running job")
    common(q)
    q.add_argument("job_id")
    q.set_defaults(func=_cli(lambda a: abort(a.workspace, a.job_id, log=_stderr)))

    q = psub.add_parser("resume", help="continue a stopped job from its last persisted round (new job); "
                                       "prints the new job id")
    common(q)
    q.add_argument("job_id", help="the stopped job")
    q.add_argument("job_dir", help="the job folder it was submitted from")
    q.set_defaults(func=_cli(lambda a: print(resume(a.workspace, a.job_id, a.job_dir, log=_stderr))))

    q = psub.add_parser("stop", help="stop the POC system (and kill whatever of it is left)")
    common(q)
    q.set_defaults(func=_cli(lambda a: stop(a.workspace, a.home)))

    q = psub.add_parser("allow-list", help="allow adpfl.* classes in a startup kit's local/resources.json")
    q.add_argument("participant_dirs", nargs="+", help="startup kit folders (server and/or sites)")
    q.set_defaults(func=_cli(_cli_allow_list))

    q = psub.add_parser("run", help="prepare, start, submit, wait, download, stop")
    common(q)
    q.add_argument("job_dir")
    q.add_argument("-n", "--sites", type=int, default=2)
    q.add_argument("--port", type=int, default=0)
    q.add_argument("--data-root", default=None)
    q.add_argument("-o", "--output", default=None)
    q.add_argument("--timeout", type=float, default=1800.0)
    q.set_defaults(func=_cli(_cli_run))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _cli(fn):
    """Exit code 0 unless ``fn`` returns an int; a PocError is one line on stderr, code 2."""

    def call(a) -> int:
        try:
            rc = fn(a)
        except PocError as e:
            print(f"adpfl poc: error: {e}", file=sys.stderr)
            return 2
        return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0

    return call


def _cli_wait(a) -> int:
    meta = wait(a.workspace, a.job_id, timeout=a.timeout)
    status = str(meta.get("status"))
    print(f"job {a.job_id} ended: {status}")
    return 0 if status == "FINISHED:COMPLETED" else 1


def _cli_allow_list(a) -> int:
    for d in a.participant_dirs:
        print(f"allow-listed {', '.join(ADPFL_ALLOW_LIST)} in {write_allow_list(d)}")
    return 0


def _cli_run(a) -> int:
    found = run(a.job_dir, a.workspace, a.sites, a.home, a.port, a.data_root, a.output, job_timeout=a.timeout)
    print(f"job {found['job_id']} ended: {found['status']}")
    return 0 if found["status"] == "FINISHED:COMPLETED" else 1
