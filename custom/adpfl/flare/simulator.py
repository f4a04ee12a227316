"""Running FLARE's simulator from outside (``adpfl run``, ``adpfl compare``, the tests):
where the ``nvflare`` command is, the simulator's command line and environment, and where
a finished run left its results. No FLARE import: these are facts about the command and
the folders it writes.

The simulator writes ``<workspace>/server/simulate_job/`` (``simulate_job_0`` in some
FLARE versions): the server's run folder with the global models (``app_server/``), the
final validation (``cross_site_val/``), ``tb_events/`` and the bundle's
``privacy_report.json`` and ``run_progress.json``. FLARE's ``SimEnv`` (the Recipe route,
:mod:`adpfl.flare.recipe`) puts the simulator workspace one level down, at
``<workspace_root>/<job name>/``; :func:`sim_workspace` finds either.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

_ROUND_RE = re.compile(r"Round (\d+) started")


def nvflare_bin() -> str:
    """The ``nvflare`` command of the running interpreter's environment (so a simulator or
    POC process runs the same installation as the caller), else the one on PATH."""
    path = os.path.join(os.path.dirname(sys.executable), "nvflare")
    return path if os.path.exists(path) else (shutil.which("nvflare") or "nvflare")


def simulator_command(job_dir: str | os.PathLike, workspace: str | os.PathLike, sites: int,
                      threads: int | None = None) -> list[str]:
    """``nvflare simulator JOB -w WS -n SITES -t THREADS`` (``threads`` defaults to one per site)."""
    threads = threads or sites
    return [nvflare_bin(), "simulator", os.fspath(job_dir), "-w", os.fspath(workspace), "-n", str(sites),
            "-t", str(threads)]


def simulator_env(threads: int, extra: Mapping[str, str] | None = None,
                  base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a simulator run with ``threads`` site processes at once.

    Each process gets its share of the CPU cores as ``OMP_NUM_THREADS`` (torch otherwise
    starts one thread per core in every process and they fight); a value already set in
    ``base`` (default: this process's environment) or given in ``extra`` wins.
    """
    env = dict(os.environ if base is None else base)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, threads)))
    env.update(extra or {})
    return env


def sim_workspace(workspace: str | os.PathLike) -> Path:
    """The simulator workspace in ``workspace``: ``workspace`` itself when it holds a
    ``server/`` folder (``nvflare simulator -w``), else the ``SimEnv`` job folder
    ``workspace/<job name>/`` that holds one (the most recently written if several);
    ``workspace`` itself when there is neither (a run that has not started yet)."""
    ws = Path(workspace)
    if (ws / "server").is_dir():
        return ws
    cands = [p.parent for p in ws.glob("*/server") if p.is_dir()] if ws.is_dir() else []
    if not cands:
        return ws
    return max(cands, key=lambda p: (p / "server").stat().st_mtime)


def result_dir(workspace: str | os.PathLike) -> Path:
    """The server's run folder of the simulator run in ``workspace`` (either layout, see
    :func:`sim_workspace`).

    Raises:
        FileNotFoundError: no simulator run under ``<workspace>/server``.
    """
    server = sim_workspace(workspace) / "server"
    for name in ("simulate_job", "simulate_job_0"):
        if (server / name).is_dir():
            return server / name
    cands = sorted(server.glob("simulate_job*")) if server.is_dir() else []
    if not cands:
        raise FileNotFoundError(f"no simulator run under {server} (did the run start?)")
    return cands[-1]


def server_log(workspace: str | os.PathLike) -> Path | None:
    """The simulator server's log (the run's, else the workspace's), or None before it exists."""
    server = sim_workspace(workspace) / "server"
    try:
        run_log = result_dir(workspace) / "log.txt"
    except FileNotFoundError:
        run_log = None
    for p in (run_log, server / "log.txt"):
        if p is not None and p.is_file():
            return p
    return None


def last_started_round(log_file: Path | None) -> int | None:
    """The round a FLARE server job (simulator or POC) last started, from its log; None if
    the log is missing, unreadable or names no round yet."""
    if log_file is None:
        return None
    try:
        found = _ROUND_RE.findall(Path(log_file).read_text(errors="replace"))
    except OSError:
        return None
    return int(found[-1]) if found else None
