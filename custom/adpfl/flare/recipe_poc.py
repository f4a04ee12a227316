"""The Recipe route on a POC system (``python jobs/job.py --env poc``): FLARE's ``PocEnv`` in a
folder of its own, with the sites' own configuration and privacy policy, always stopped.

FLARE's ``PocEnv`` (nvflare/recipe/poc_env.py) provisions, starts and afterwards stops a POC
system in the POC workspace FLARE finds (``$NVFLARE_POC_WORKSPACE``, else the one recorded in
``~/.nvflare/config.conf``, else ``/tmp/nvflare/poc``); a system it finds running there is
stopped and its workspace deleted first, and without a project file the server listens on
FLARE's default ports 8002/8003. Used as it is, it would stop and delete the machine-wide POC
system of whoever runs one and clash with its ports. :func:`isolated_poc` therefore gives each
run, for as long as it lasts:

* ``<root>/poc`` as ``NVFLARE_POC_WORKSPACE`` and ``<root>/home`` as ``HOME`` (FLARE's
  ``~/.nvflare`` files), restored afterwards; a system still running in ``<root>`` (another run
  of the same folder) is refused, not stopped;
* a project file ``<root>/project.yml`` (``PocEnv(project_conf_path=...)``) made by
  :func:`adpfl.poc.project.project_config` (the one ``adpfl poc prepare`` uses): the server on
  localhost and on a port that is free now, the sites, the admin ``admin@adpfl.local``;
* :class:`SiteKitBuilder` in that project file's builders: ``PocEnv.deploy`` provisions and
  starts in one call, and a provisioning builder is FLARE's hook in between. It writes each
  site's ``local/adpfl_site.json`` and (``site_epsilon``) ``local/privacy.json`` into the site's
  kit as FLARE provisions it, with the writers ``adpfl poc prepare`` uses;
* on leaving (success, error, Ctrl-C, SIGTERM): ``PocEnv.stop`` (:class:`StoppingPocEnv`:
  without FLARE's futile 30-s wait), then every process of the system still alive ended by PID
  (:func:`adpfl.poc.processes.kill_leftovers`).

Written by hand because FLARE has no option for any of this: PocEnv takes neither a
workspace nor a port (only a project file) and cleans up only when the result arrives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from nvflare.lighter.spec import Builder
from nvflare.recipe import PocEnv

from adpfl._io import write_json_atomic
from adpfl.flare.site_config import SITE_CONFIG_NAME
from adpfl.flare.site_policy import privacy_json_document, write_privacy_json
from adpfl.poc.processes import free_port, kill_leftovers, live_pids, port_in_use
from adpfl.poc.project import project_config, site_config
from adpfl.poc.state import ADMIN_USER, prod_dir

POC_DIR, HOME_DIR, PROJECT_FILE, RESULTS_DIR = "poc", "home", "project.yml", "results"


class SiteKitBuilder(Builder):
    """FLARE provisioning builder: each site's ``local/adpfl_site.json`` (its data and ledger
    folders) and, with ``site_epsilon``, its ``local/privacy.json`` (the site's own policy, see
    :mod:`adpfl.flare.site_policy`), written into the site's kit before the site starts."""

    def __init__(self, data_root: str, ledger_dir: str | None = None, site_epsilon: float | None = None,
                 site_rounds: int = 0):
        self.data_root, self.ledger_dir = data_root, ledger_dir
        self.site_epsilon, self.site_rounds = site_epsilon, site_rounds

    def build(self, project, ctx):
        for client in project.get_clients():
            site_dir = Path(ctx.get_ws_dir(client))
            write_json_atomic(site_dir / "local" / SITE_CONFIG_NAME, site_config(self.data_root, self.ledger_dir))
            if self.site_epsilon is not None:
                write_privacy_json(str(site_dir), self.site_epsilon, self.site_rounds)


class StoppingPocEnv(PocEnv):
    """FLARE's ``PocEnv`` whose ``stop`` does not wait 30 s in vain.

    FLARE 2.9's ``PocEnv.stop`` asks for the shutdown over the admin API and then waits for
    the server to go down by logging in again until a 30-second deadline; a login to the
    stopped server fails with another error than the ``NoConnection`` that wait looks for, so
    every run ended 30 s after its system was gone (measured: the services logged their
    "Good Bye" 24 s before job.py ended). Here the same FLARE shutdown (``shutdown_system``:
    running jobs aborted, then server and sites shut down) is asked for without that wait, and
    the system's own processes are watched instead, by PID; FLARE's ``stop`` then finds the
    system down and returns at once. A system from another project file (``--poc-project``:
    other admin kit) is left to FLARE's ``stop``.
    """

    stop_timeout = 30.0

    def stop(self, clean_up: bool = False) -> None:
        admin_kit = prod_dir(self.poc_workspace) / self.username
        if admin_kit.is_dir() and live_pids(self.poc_workspace):
            from nvflare.tool.api_utils import shutdown_system

            try:
                shutdown_system(str(admin_kit.parent), username=self.username, wait=False, verbose=False)
            except Exception as e:  # noqa: BLE001 - FLARE's stop and the PID sweep still follow
                self.logger.warning(f"shutdown over the admin API failed: {e}")
            deadline = time.monotonic() + self.stop_timeout
            while live_pids(self.poc_workspace) and time.monotonic() < deadline:
                time.sleep(0.5)
        super().stop(clean_up=clean_up)


def poc_root(workspace: str, name: str, poc_workspace: str | None = None) -> str:
    """The run's POC folder: ``poc_workspace`` if given, else ``<workspace>/<name>_poc``."""
    return os.path.abspath(poc_workspace or os.path.join(workspace, f"{name}_poc"))


def write_project(root: str, clients: list[str], data_root: str, ledger_dir: str | None = None,
                  site_epsilon: float | None = None, site_rounds: int = 0, port: int = 0) -> tuple[str, int]:
    """Write ``<root>/project.yml`` (server on ``port``, else on a free one); returns (path, port)."""
    import yaml

    if site_epsilon is not None:
        try:  # a bad budget fails here, naming the setting, not inside FLARE's provisioning
            privacy_json_document(site_epsilon, site_rounds)
        except Exception as e:
            raise ValueError(f"site privacy policy (--site-epsilon {site_epsilon}, --site-rounds {site_rounds}): "
                             f"{e}") from None
    port = port or free_port()
    if port_in_use(port):
        raise ValueError(f"port {port} is already in use")
    cfg = project_config(clients, port)
    args = {"data_root": os.path.abspath(data_root), "ledger_dir": os.path.abspath(ledger_dir) if ledger_dir else None,
            "site_epsilon": site_epsilon, "site_rounds": int(site_rounds)}
    cfg["builders"].append({"path": f"{SiteKitBuilder.__module__}.{SiteKitBuilder.__name__}", "args": args})
    path = os.path.join(root, PROJECT_FILE)
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, port


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def isolated_poc(root: str, log=print):
    """``HOME``/``NVFLARE_POC_WORKSPACE`` pointed into ``root`` while the block runs (create the
    ``PocEnv`` inside it: it reads the workspace when constructed). Yields a dict; put the env
    under ``"env"`` and the block's end stops it and kills what is left of the system, by PID."""
    poc_ws = os.path.join(root, POC_DIR)
    alive = live_pids(poc_ws)
    if alive:
        raise ValueError(f"a POC system of {root} is still running (PIDs {alive}); wait for that run or "
                         f"choose another --poc-workspace")
    shutil.rmtree(poc_ws, ignore_errors=True)  # a fresh system each run (its kits are prod_00)
    os.makedirs(os.path.join(root, HOME_DIR), exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("HOME", "NVFLARE_POC_WORKSPACE", "PATH")}
    os.environ["HOME"] = os.path.join(root, HOME_DIR)
    os.environ["NVFLARE_POC_WORKSPACE"] = poc_ws
    # FLARE starts the services with `python3` from PATH: this interpreter's
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + (saved["PATH"] or "")
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    state: dict = {"env": None, "workspace": poc_ws}
    try:
        yield state
    finally:
        try:
            _stop(state, log)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _stop(state: dict, log) -> None:
    t0 = time.monotonic()
    env = state.get("env")
    if env is not None:
        try:
            env.stop(clean_up=False)  # idempotent; keeps the workspace (logs, kits)
        except BaseException as e:  # noqa: BLE001 - the PID sweep below must run whatever happened
            log(f"PocEnv.stop failed ({e!r}); ending the processes by PID")
    killed = kill_leftovers(state["workspace"])
    if killed:
        log(f"killed leftover POC processes: {killed}")
    left = live_pids(state["workspace"])
    if left:
        log(f"POC processes still alive after stop: {left}")
    else:
        log(f"POC system stopped, no process left ({time.monotonic() - t0:.0f}s)")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def keep_result(root: str, result: str | None, job_id: str) -> str | None:
    """Move the downloaded result out of the POC workspace (re-created at the next run) to
    ``<root>/results/<job id>``; returns its new path."""
    if not result or not os.path.isdir(result):
        return None
    dest = os.path.join(root, RESULTS_DIR, job_id)
    if os.path.abspath(result) == dest:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(result, dest)
    return dest


def poc_summary(result_dir: str) -> dict:
    """The downloaded result as :func:`adpfl.cli.print_summary` wants it."""
    from adpfl._io import read_json
    from adpfl.poc.admin import locate_results

    found = locate_results(result_dir)
    run_dir = Path(found["privacy_report"] or found["global_model"] or result_dir)
    out = {"run_dir": str(run_dir.parent if run_dir.is_file() else run_dir), "tensorboard": found["tensorboard"] or "-",
           "models": {k: v for k, v in (("FL_global_model.pt", found["global_model"]),
                                        ("best_FL_global_model.pt", found["best_global_model"])) if v}}
    if found["privacy_report"]:
        out["privacy"] = read_json(found["privacy_report"])
    if found["cross_site_val"]:
        out["final_validation"] = read_json(found["cross_site_val"])
    return out


__all__ = ["ADMIN_USER", "SiteKitBuilder", "StoppingPocEnv", "isolated_poc", "keep_result", "poc_root",
           "poc_summary", "write_project"]
