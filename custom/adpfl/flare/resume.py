"""Resume a stopped run: a copy of its job that starts at the next round from the last
persisted global model (FLARE job configs are edited as JSON; no FLARE import).

Why a new job: FLARE 2.9 cannot restore a running job (component snapshots are disabled,
the simulator deletes its workspace at every start, a restarted POC server tells its
clients to abort the old job). So the stopped run's ``run_progress.json`` (written by
:class:`adpfl.flare.progress.RunProgressWidget` after each persisted round) and its
``FL_global_model.pt`` define where to continue, and the job is re-issued with

* ``ScatterAndGather``: ``start_round = k + 1``, ``num_rounds = N - (k + 1)``
  (FLARE runs rounds ``start_round .. start_round + num_rounds - 1``);
* ``PTFileModelPersistor``: ``source_ckpt_file_full_name`` = the saved model (absolute);
* ``RunProgressWidget``: ``start_round = k + 1`` (the total plan ``N`` is unchanged);
* update-level ``ADPFilter``: unchanged -- ``planned_rounds = N`` and the round indices
  continue, so the adaptive schedule re-plans the budget left in the site's ledger over
  the rounds left, exactly as an uninterrupted run would;
* DP-SGD executors: ``dpsgd_planned_rounds = N - (k + 1)``: the site's record-level ledger
  already holds the rounds trained, and the noise is calibrated for what is left.

Privacy ledgers are never touched here: every site keeps its own on disk (see
``site_config``), so a resumed run continues from each site's real spend. A round that was
released but not aggregated before the stop was spent, stays in the ledger, and is run
again (and accounted again) in the resumed job: nothing is counted twice, nothing is reset.
"""

from __future__ import annotations

import os
import shutil

from adpfl._io import read_json, write_json_atomic
from adpfl.flare.progress import PROGRESS_FILE, PROGRESS_FORMAT
from adpfl.flare.simulator import result_dir, sim_workspace

SAG_SUFFIX = "ScatterAndGather"
PERSISTOR_SUFFIX = "PTFileModelPersistor"
PROGRESS_SUFFIX = "RunProgressWidget"
EXECUTOR_SUFFIX = "SegmentationExecutor"


class ResumeError(ValueError):
    """Why a run cannot be resumed (names the file or setting)."""


def read_progress(path: str) -> dict:
    """The progress record at ``path`` (a run folder or the ``run_progress.json`` itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, PROGRESS_FILE)
    if not os.path.isfile(path):
        raise ResumeError(
            f"nothing to resume: {path} does not exist (the run completed no round, or it is not an adpfl run folder)"
        )
    try:
        progress = read_json(path)
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
        raise ResumeError(f"{path} is not an adpfl run-progress file")
    for key in ("last_completed_round", "num_rounds", "model"):
        if key not in progress:
            raise ResumeError(f"{path} lacks {key!r}")
    progress["_path"] = path
    return progress


def _components(config: dict):
    for section in ("components", "workflows", "executors"):
        for item in config.get(section, []) or []:
            if section == "executors":
                item = item.get("executor", {})
            if isinstance(item, dict) and "path" in item:
                yield item


def _find(config: dict, suffix: str):
    return [c for c in _components(config) if str(c.get("path", "")).endswith(suffix)]


def _app_configs(job_dir: str) -> tuple[list, list]:
    servers, clients = [], []
    for root, _dirs, files in os.walk(job_dir):
        for name in files:
            if name == "config_fed_server.json":
                servers.append(os.path.join(root, name))
            elif name == "config_fed_client.json":
                clients.append(os.path.join(root, name))
    if not servers:
        raise ResumeError(f"{job_dir} holds no config_fed_server.json: not a FLARE job folder")
    return servers, clients


def make_resume_job(job_dir: str, out_dir: str, progress: dict, checkpoint: str, name: str | None = None) -> dict:
    """Write a copy of ``job_dir`` to ``out_dir`` that continues ``progress``'s run from
    ``checkpoint`` (absolute path, readable where the server runs). Returns a summary."""
    k = int(progress["last_completed_round"])
    total = int(progress["num_rounds"])
    start = k + 1
    if start >= total:
        raise ResumeError(
            f"the run already completed all its rounds ({k + 1} of {total}, per {progress.get('_path', 'progress')}); "
            "nothing to resume"
        )
    checkpoint = os.path.abspath(checkpoint)
    if not os.path.isfile(checkpoint):
        raise ResumeError(f"checkpoint {checkpoint} does not exist")
    if os.path.abspath(out_dir) == os.path.abspath(job_dir):
        raise ResumeError("the resume job must be written to another folder than the original job")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir)
    servers, clients = _app_configs(out_dir)
    for path in servers:
        cfg = read_json(path)
        sags = _find(cfg, SAG_SUFFIX)
        if len(sags) != 1:
            raise ResumeError(f"{path}: expected one ScatterAndGather workflow, found {len(sags)}")
        args = sags[0].setdefault("args", {})
        planned = int(args.get("start_round", 0)) + int(args.get("num_rounds", 0))
        if planned != total:
            raise ResumeError(
                f"{path} plans {planned} rounds, the stopped run planned {total}: not the job of this run"
            )
        args["start_round"], args["num_rounds"] = start, total - start
        persistors = _find(cfg, PERSISTOR_SUFFIX)
        if len(persistors) != 1:
            raise ResumeError(f"{path}: expected one PTFileModelPersistor, found {len(persistors)}")
        persistors[0].setdefault("args", {})["source_ckpt_file_full_name"] = checkpoint
        for widget in _find(cfg, PROGRESS_SUFFIX):
            widget.setdefault("args", {})["start_round"] = start
        write_json_atomic(path, cfg, indent=4)
    for path in clients:
        cfg = read_json(path)
        for ex in _find(cfg, EXECUTOR_SUFFIX):
            a = ex.setdefault("args", {})
            if a.get("dpsgd") and not a.get("dpsgd_noise_multiplier"):
                a["dpsgd_planned_rounds"] = total - start
        write_json_atomic(path, cfg, indent=4)
    meta_path = os.path.join(out_dir, "meta.json")
    job_name = name or f"{os.path.basename(os.path.normpath(job_dir))}_from_round{start}"
    if os.path.isfile(meta_path):
        meta = read_json(meta_path)
        meta["name"] = job_name
        write_json_atomic(meta_path, meta, indent=4)
    return {"job": out_dir, "name": job_name, "start_round": start, "rounds_left": total - start,
            "num_rounds": total, "checkpoint": checkpoint, "resumed_job_id": progress.get("job_id")}


def prepare_simulator_resume(workspace: str, jobs_dir: str, task: str | None = None,
                             mode: str | None = None) -> dict:
    """Set up the resume of the simulator run in ``workspace`` (before the simulator
    deletes it): keep its last global model and progress in ``<workspace>/local/adpfl_resume``
    (the one folder the simulator keeps) and write the resume job there.

    ``task``/``mode`` default to the stopped run's; the original job is
    ``<jobs_dir>/<task>_<mode>``. ``workspace`` may be the ``SimEnv`` root that holds the
    simulator workspace (see :func:`adpfl.flare.simulator.sim_workspace`). Returns
    :func:`make_resume_job`'s summary, with ``workspace``: the simulator workspace to resume in.
    """
    workspace = str(sim_workspace(workspace))
    try:
        run_dir = result_dir(workspace)
    except FileNotFoundError as e:
        raise ResumeError(f"nothing to resume: {e}") from None
    progress = read_progress(str(run_dir))
    for key, given in (("task", task), ("mode", mode)):
        if given and progress.get(key) and given != progress[key]:
            raise ResumeError(f"the stopped run in {workspace} is {key} {progress[key]!r}, not {given!r}")
    task, mode = task or progress.get("task"), mode or progress.get("mode")
    if not task or not mode:
        raise ResumeError(f"{progress['_path']} does not name the task and mode; pass them")
    job_dir = os.path.join(jobs_dir, f"{task}_{mode}")
    if not os.path.isfile(os.path.join(job_dir, "meta.json")):
        raise ResumeError(f"job folder {job_dir} not found (expected meta.json)")
    k = int(progress["last_completed_round"])
    if k + 1 >= int(progress["num_rounds"]):
        raise ResumeError(f"the run already completed all its rounds ({k + 1} of {progress['num_rounds']}, per "
                          f"{progress['_path']}); nothing to resume")
    keep = os.path.join(workspace, "local", "adpfl_resume")
    os.makedirs(keep, exist_ok=True)
    if not os.path.isfile(progress["model"]):
        raise ResumeError(f"the stopped run's global model {progress['model']} is missing")
    checkpoint = os.path.join(keep, f"round{k}_FL_global_model.pt")
    shutil.copyfile(progress["model"], checkpoint)
    if os.path.isfile(progress.get("best_model") or ""):
        shutil.copyfile(progress["best_model"], os.path.join(keep, f"round{k}_best_FL_global_model.pt"))
    write_json_atomic(os.path.join(keep, f"round{k}_{PROGRESS_FILE}"),
                      {k2: v for k2, v in progress.items() if not k2.startswith("_")})
    out = os.path.join(keep, "job", f"{task}_{mode}_from_round{k + 1}")
    return dict(make_resume_job(job_dir, out, progress, checkpoint), workspace=workspace)
