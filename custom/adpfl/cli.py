"""The ``adpfl`` command: jobs, data, run, summary (and more sub-commands per feature).

``adpfl run`` is what the README's main command calls: it runs a job in the FLARE
simulator (3 sites by default) and prints the final global Dice per site, the privacy
spent per site, and where the TensorBoard logs and the best model are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOBS_DIR = REPO_ROOT / "jobs"


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- jobs
def cmd_jobs_export(args) -> int:
    from adpfl.flare.jobs import all_jobs, export_job

    out = Path(args.jobs_dir)
    for task, mode in all_jobs():
        path = export_job(task, mode, str(out))
        print(f"exported {path}")
    return 0


# ---------------------------------------------------------------------------- data
def cmd_data_generate(args) -> int:
    from adpfl.data.synthetic import ensure_site_data

    t0 = time.perf_counter()
    for i in range(1, args.sites + 1):
        p = ensure_site_data(
            args.task, args.data_root, f"site-{i}", num_train=args.num_train, num_val=args.num_val,
            size=args.size or None, seed=args.seed,
        )
        print(f"site-{i}: {p}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


# ---------------------------------------------------------------------------- run
def _simulator_result_dir(workspace: Path) -> Path:
    for name in ("simulate_job", "simulate_job_0"):
        p = workspace / "server" / name
        if p.is_dir():
            return p
    cands = sorted((workspace / "server").glob("simulate_job*")) if (workspace / "server").is_dir() else []
    if cands:
        return cands[-1]
    raise CliError(f"no simulator result under {workspace}/server (did the run start?)")


def summarize(workspace: Path) -> dict:
    """Collect the run's final metrics, privacy spend and artefact locations."""
    run_dir = _simulator_result_dir(workspace)
    out = {"run_dir": str(run_dir)}
    cv = run_dir / "cross_site_val" / "cross_val_results.json"
    if cv.is_file():
        out["final_validation"] = json.loads(cv.read_text())
    pr = run_dir / "privacy_report.json"
    if pr.is_file():
        out["privacy"] = json.loads(pr.read_text())
    out["tensorboard"] = str(run_dir / "tb_events")
    models = {}
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        p = run_dir / "app_server" / name
        if p.is_file():
            models[name] = str(p)
    out["models"] = models
    return out


def print_summary(summary: dict) -> None:
    print("\n=== adpfl run summary ===")
    print(f"run folder:   {summary['run_dir']}")
    fv = summary.get("final_validation") or {}
    if fv:
        print("final global model, validation Dice per site (mean over regions):")
        for site in sorted(fv):
            models = fv[site]
            parts = []
            for model_name in sorted(models):
                m = models[model_name]
                v = m.get("dice_mean")
                parts.append(f"{model_name}: dice_mean=" + ("no cases" if v is None else f"{v:.4f}"))
            print(f"  {site}: " + "; ".join(parts))
    else:
        print("final validation: none recorded (run failed or stopped before global evaluation)")
    priv = summary.get("privacy")
    if priv and priv.get("update_level", True):
        delta = priv.get("delta")
        print(f"privacy spent per site (site-level update DP, replace-one, delta={delta}):")
        for site, info in sorted((priv.get("sites") or {}).items()):
            prv = info.get("epsilon_prv")
            prv_text = f"{prv:.4g}" if isinstance(prv, (int, float)) else "n/a (z < 0.1)"
            exact = info.get("epsilon_exact")
            exact_text = f"{exact:.4g}" if isinstance(exact, (int, float)) else "n/a"
            print(
                f"  {site}: epsilon RDP={info.get('epsilon_rdp'):.4g}, PRV={prv_text}, exact={exact_text} "
                f"after {info.get('releases')} releases (target {priv.get('target_epsilon')})"
            )
    rec = (priv or {}).get("record_level")
    if rec:
        print(f"record-level privacy per site (DP-SGD, one training image/patient, delta={rec.get('delta')}; "
              "a different unit, never added to an update-level figure):")
        for site, info in sorted((rec.get("sites") or {}).items()):
            print(f"  {site}: epsilon RDP={info.get('epsilon_rdp'):.4g} after {info.get('steps')} DP-SGD steps "
                  f"(z={info.get('noise_multiplier'):.4g}, q={info.get('sample_rate'):.4g}; target "
                  f"{rec.get('target_epsilon')})")
    if priv and priv.get("stopped_early"):
        print(f"  run stopped early: {priv.get('stop_reason')}")
    print(f"TensorBoard:  tensorboard --logdir {summary['tensorboard']}")
    for name, path in summary.get("models", {}).items():
        print(f"model:        {path}")


def _simulator_env(threads: int) -> dict:
    """The simulator runs ``threads`` site processes at once; give each its share of the CPU
    cores (torch otherwise starts one thread per core in every process and they fight).
    A value the user already set wins."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, threads)))
    return env


def cmd_run(args) -> int:
    from adpfl.flare.jobs import job_name

    workspace = Path(args.workspace).resolve()
    if args.resume and (args.clean or args.job_api or args.rounds):
        raise CliError("--resume continues the stopped run in the workspace; it takes no --clean/--job-api/--rounds")
    if args.clean and workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    resume = None
    if args.resume:
        from adpfl.flare.resume import ResumeError, prepare_simulator_resume

        try:
            resume = prepare_simulator_resume(str(workspace), args.jobs_dir, args.task, args.mode)
        except ResumeError as e:
            raise CliError(str(e)) from None
        print(f"resuming job {resume['resumed_job_id']} at round {resume['start_round']} of {resume['num_rounds']} "
              f"from {resume['checkpoint']} (each site's privacy ledger continues from its spend)", flush=True)
    args.task, args.mode = args.task or "skin2d", args.mode or "adpfl"
    name = job_name(args.task, args.mode)
    t0 = time.perf_counter()
    if args.job_api:
        from adpfl.flare.jobs import build_job

        overrides = {"num_rounds": args.rounds} if args.rounds else {}
        job = build_job(args.task, args.mode, **overrides)
        os.environ.update(_simulator_env(args.threads))
        rc = job.simulator_run(str(workspace), n_clients=args.sites, threads=args.threads)
    else:
        if args.rounds:
            raise CliError("--rounds needs --job-api (checked-in job folders carry their own num_rounds)")
        job_dir = Path(resume["job"]) if resume else Path(args.jobs_dir) / name
        if not (job_dir / "meta.json").is_file():
            raise CliError(f"job folder {job_dir} not found (expected meta.json); run `adpfl jobs export`")
        cmd = ["nvflare", "simulator", str(job_dir), "-w", str(workspace), "-n", str(args.sites), "-t", str(args.threads)]
        print("running:", " ".join(cmd), flush=True)
        nvflare = shutil.which("nvflare") or os.path.join(os.path.dirname(sys.executable), "nvflare")
        rc = subprocess.call([nvflare] + cmd[1:], env=_simulator_env(args.threads))
    print(f"simulator exited with {rc} after {time.perf_counter() - t0:.0f}s")
    summary = summarize(workspace)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if rc == 0 else 1


def cmd_summary(args) -> int:
    print_summary(summarize(Path(args.workspace).resolve()))
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpfl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    j = sub.add_parser("jobs", help="job folders")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    je = jsub.add_parser("export", help="(re)generate jobs/<task>_<mode> from the job definition")
    je.add_argument("--jobs-dir", default=str(DEFAULT_JOBS_DIR))
    je.set_defaults(func=cmd_jobs_export)

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dg = dsub.add_parser("generate", help="write the synthetic data of N sites")
    dg.add_argument("--task", default="skin2d")
    dg.add_argument("--data-root", required=True, help="the task's data folder (<root>/<site>/datalist.json)")
    dg.add_argument("--sites", type=int, default=3)
    dg.add_argument("--num-train", type=int, default=40)
    dg.add_argument("--num-val", type=int, default=20)
    dg.add_argument("--size", type=int, default=0)
    dg.add_argument("--seed", type=int, default=0)
    dg.set_defaults(func=cmd_data_generate)
    # handled in main() by adpfl.data's own parser (listed here for --help)
    dsub.add_parser("prepare", help="split a public dataset (ISIC/HAM10000, KiTS23, BraTS 2024) into site datalists")
    dsub.add_parser("validate", help="check a site's datalist and files")

    r = sub.add_parser("run", help="run a job in the FLARE simulator and print its summary")
    r.add_argument("--task", default=None, help="skin2d (default), kidney3d or brain3d")
    r.add_argument("--mode", default=None, choices=["npfl", "dpfl", "adpfl", "dpsgd"], help="default adpfl")
    r.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --workspace from its last persisted round")
    r.add_argument("-w", "--workspace", default="workspace/run")
    r.add_argument("-n", "--sites", type=int, default=3)
    r.add_argument("-t", "--threads", type=int, default=3)
    r.add_argument("--jobs-dir", default=str(DEFAULT_JOBS_DIR))
    r.add_argument("--job-api", action="store_true", help="build the job with the Python Job API instead of jobs/")
    r.add_argument("--rounds", type=int, default=0, help="override num_rounds (with --job-api)")
    r.add_argument("--clean", action="store_true", help="delete the workspace first")
    r.add_argument("--json", default="", help="also write the summary to this JSON file")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("summary", help="print the summary of a finished simulator workspace")
    s.add_argument("-w", "--workspace", required=True)
    s.set_defaults(func=cmd_summary)

    from adpfl.poc import add_parser as add_poc_parser  # `adpfl poc ...` (POC system)

    add_poc_parser(sub)
    from adpfl.evaluation.compare import add_compare_parsers

    add_compare_parsers(sub)  # `adpfl compare` and `adpfl report`
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"] and argv[1:2] and argv[1] in ("prepare", "validate"):
        from adpfl.data.__main__ import main as data_main

        return data_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"adpfl: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # configuration errors from our own validation carry the setting's name
        print(f"adpfl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
