"""The POC system's admin session (FLARE's Python admin API as the project admin): wait
for the sites, submit, follow, download, abort and resume jobs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adpfl.flare.simulator import last_started_round
from adpfl.poc.processes import check_services_alive, service_logs
from adpfl.poc.state import PocError, load_state

_TERMINAL = ("FINISHED", "FAILED", "ABORTED", "ABANDONED")


def session(state: dict, timeout: float = 10.0):
    """An admin session (FLARE's Python API) as the POC's project admin."""
    import contextlib

    from nvflare.fuel.flare_api.flare_api import new_secure_session

    # FLARE prints "Connecting to FLARE ..." on stdout; keep stdout for results (job ids)
    with contextlib.redirect_stdout(sys.stderr):
        return new_secure_session(state["admin"], state["admin_dir"], timeout=timeout)


def close_session(sess) -> None:
    try:
        sess.close()
    except Exception:
        pass


def wait_until_connected(state: dict, timeout: float = 120.0, log: Callable[[str], None] = print) -> list[str]:
    expected = set(state["sites"])
    deadline = time.monotonic() + timeout
    last_err, connected = "", set()
    sess = None
    try:
        while time.monotonic() < deadline:
            check_services_alive(state)
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
                    close_session(sess)
                    sess = None
            time.sleep(1.0)
    finally:
        if sess is not None:
            close_session(sess)
    missing = sorted(expected - connected)
    logs = "\n".join(f"  {p}" for p in service_logs(state))
    raise PocError(
        f"POC system not ready after {timeout:.0f}s: sites not connected: {missing or 'none'}; "
        f"connected: {sorted(connected)}" + (f"; last error: {last_err}" if last_err and not connected else "")
        + f"\nservice logs:\n{logs}"
    )


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
        close_session(sess)
    log(f"submitted {job_dir} as job {job_id}")
    return job_id


def current_round(state: dict, job_id: str) -> int | None:
    """The round the server's job process last started (from its log), or None."""
    return last_started_round(Path(state["prod_dir"]) / state["server"] / job_id / "log.txt")


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
        close_session(sess)


def locate_results(result_dir: str) -> dict:
    """Where a downloaded job result keeps the global model, TB logs and the reports."""
    root = Path(result_dir)

    def first(pattern: str, want_dir: bool = False) -> str | None:
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
        close_session(sess)
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
        close_session(sess)
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



def run_cycle(workspace: str, setup: Callable[[], object], submit_job: Callable[[], str],
              teardown: Callable[[], object], result_dir: str | None = None, job_timeout: float = 1800.0,
              log: Callable[[str], None] = print) -> dict:
    """``setup()`` (bring a system up), ``submit_job()`` (returns the job id), wait, download into
    ``result_dir`` (default ``<workspace>/results``); ``teardown()`` always. Returns
    :func:`locate_results` of the result plus ``job_id`` and ``status``."""
    try:
        setup()
        job_id = submit_job()
        meta = wait(workspace, job_id, timeout=job_timeout, log=log)
        found = download(workspace, job_id, result_dir or os.path.join(workspace, "results"), log=log)
        found.update(job_id=job_id, status=meta.get("status"))
        return found
    finally:
        teardown()
