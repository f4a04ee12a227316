"""The POC system's processes: ``nvflare poc`` calls, ports, start, stop, and ending
whatever a stopped or crashed system left behind (by PID)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from adpfl.flare.simulator import nvflare_bin
from adpfl.poc.state import DEFAULT_WORKSPACE, SERVER_NAME, PocError, load_state, prod_dir, save_state, tail


def poc_env(workspace: str, home: str | None = None, extra: dict | None = None) -> dict[str, str]:
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


def run_nvflare(args: list[str], workspace: str, home: str | None, timeout: float = 120, extra_env=None):
    cmd = [nvflare_bin()] + args
    try:
        proc = subprocess.run(
            cmd, env=poc_env(workspace, home, extra_env), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise PocError(f"`nvflare {' '.join(args)}` did not finish within {timeout:.0f}s") from e
    return proc


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


def start(
    workspace: str = DEFAULT_WORKSPACE,
    home: str | None = None,
    timeout: float = 120.0,
    extra_env: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Start the server and every site in the background; return once all sites are
    connected to the server (raises PocError after ``timeout`` seconds)."""
    from adpfl.poc.admin import wait_until_connected  # the admin session module imports this one

    state = load_state(workspace)
    home = home or state.get("home")
    alive = live_pids(workspace)
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
    proc = run_nvflare(["poc", "start", "--no-wait"], workspace, home, timeout=60, extra_env=env)
    state["pids"] = sorted(set(pid_file_pids(state)))
    save_state(workspace, state)
    if proc.returncode != 0:
        raise PocError(f"`nvflare poc start` failed ({proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")
    try:
        connected = wait_until_connected(state, timeout=max(1.0, timeout - (time.monotonic() - t0)), log=log)
    finally:
        state["pids"] = sorted(set(state["pids"]) | set(pid_file_pids(state)))
        save_state(workspace, state)
    log(f"POC system up in {time.monotonic() - t0:.0f}s: server port {state['port']}, sites {', '.join(connected)}")
    return state


def check_services_alive(state: dict) -> None:
    prod = Path(state["prod_dir"])
    for name in [state["server"]] + state["sites"]:
        daemon = prod / name / "daemon_pid.fl"
        if daemon.is_file():
            continue
        for fname in ("poc_console.log", "start_console.log"):  # nvflare poc's / adpfl kits' console output
            console = prod / name / fname
            if console.is_file() and "System is in trouble" in console.read_text(errors="replace"):
                raise PocError(f"{name} failed to start repeatedly; see {console}:\n{tail(console.read_text())}")


def stop(workspace: str = DEFAULT_WORKSPACE, home: str | None = None, timeout: float = 60.0,
         grace: float = 15.0, log: Callable[[str], None] = print) -> list[int]:
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
    if live_pids(workspace):
        try:
            proc = run_nvflare(["poc", "stop"], workspace, home, timeout=timeout)
            if proc.returncode != 0:
                log(f"`nvflare poc stop` exited with {proc.returncode}; killing the processes instead")
        except PocError as e:
            log(f"{e}; killing the processes instead")
        _wait_gone(lambda: live_pids(workspace), grace)
    killed = kill_leftovers(workspace)
    if killed:
        log(f"killed leftover POC processes: {killed}")
    log(f"POC system in {workspace} stopped ({time.monotonic() - t0:.0f}s)")
    return killed


def kill_leftovers(workspace: str, grace: float = 5.0) -> list[int]:
    pids = live_pids(workspace)
    if not pids:
        return []
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait_gone(lambda: live_pids(workspace), grace)
    rest = live_pids(workspace)
    for pid in rest:
        _signal(pid, signal.SIGKILL)
    _wait_gone(lambda: live_pids(workspace), grace)
    return pids


def live_pids(workspace: str) -> list[int]:
    """PIDs of this POC system's processes: the services' PID files, the PIDs recorded at
    start, their descendants, and any process whose command line names this workspace's
    startup kits (job processes of a crashed parent)."""
    import psutil

    workspace = os.path.abspath(workspace)
    try:
        state = load_state(workspace)
    except PocError:
        state = {"prod_dir": str(prod_dir(workspace)), "pids": []}
    # a POC system's kits are under <workspace>/adpfl_poc/prod_00, provisioned kits where provisioning put them
    prod = state.get("prod_dir") or str(prod_dir(workspace))
    me = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    cands = set(state.get("pids") or []) | set(pid_file_pids(state))
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


def pid_file_pids(state: dict) -> list[int]:
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


def service_logs(state: dict) -> list[str]:
    prod = Path(state["prod_dir"])
    out = []
    for name in [state["server"]] + state["sites"]:
        for fname in ("log.txt", "poc_console.log", "start_console.log"):
            if (prod / name / fname).is_file():
                out.append(str(prod / name / fname))
    return out

