"""The ``adpfl`` command: jobs, data, run, summary, poc, compare, report.

One argparse tree: this module builds it; the sub-command groups that live with their
code (``adpfl.data.cli``, ``adpfl.poc.cli``, ``adpfl.experiments.compare``) register their
own parsers on it.

``adpfl run`` is what the README's main command calls: it runs a job on FLARE's SimEnv
(3 sites by default), prints one line per round, then the final global Dice per site, the
privacy spent per site, and where the log, curves, TensorBoard logs and models are.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from adpfl._io import read_json, write_json_atomic
from adpfl.data.sizes import DATA_SIZES
from adpfl.modes import MODES
from adpfl.tasks.base import TASK_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOBS_DIR = REPO_ROOT / "jobs"


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- jobs
def cmd_jobs_export(args) -> int:
    from adpfl.flare.jobs import all_jobs, export_job

    out = Path(args.jobs_dir)
    overrides = {"executor": {"data_size": args.data_size}} if args.data_size else {}
    if args.data_size and Path(args.jobs_dir).resolve() == DEFAULT_JOBS_DIR.resolve():
        raise CliError("--data-size writes jobs that differ from the checked-in ones; give another --jobs-dir")
    for task, mode in all_jobs():
        path = export_job(task, mode, str(out), **overrides)
        print(f"exported {path}")
    return 0


# ---------------------------------------------------------------------------- run
def summarize(workspace: Path) -> dict:
    """Collect the run's final metrics, privacy spend and artefact locations."""
    from adpfl.flare.simulator import result_dir

    try:
        run_dir = result_dir(workspace)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    out = {"run_dir": str(run_dir)}
    cv = run_dir / "cross_site_val" / "cross_val_results.json"
    if cv.is_file():
        out["final_validation"] = read_json(cv)
    pr = run_dir / "privacy_report.json"
    if pr.is_file():
        out["privacy"] = read_json(pr)
    progress = run_dir / "run_progress.json"
    if progress.is_file():
        out["progress"] = read_json(progress)
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
    if summary.get("curves"):
        print(f"curves:       {summary['curves']}")
    for path in summary.get("models", {}).values():
        print(f"model:        {path}")


def _child_env(threads: int) -> dict:
    from adpfl.flare.simulator import simulator_env

    env = simulator_env(threads)
    env["PYTHONUNBUFFERED"] = "1"  # the log file fills as the run goes
    return env


def cmd_run(args) -> int:
    """The simulator run through FLARE's SimEnv (the Recipe route, :mod:`adpfl.flare.recipe`)
    in a child process whose whole output goes to ``<workspace>/flare_log.txt``; the terminal
    gets one line per round (:mod:`adpfl.flare.run_view`) and the summary. ``--resume`` runs
    the edited copy of the stopped job (:mod:`adpfl.flare.resume`) with the simulator the
    stopped run used, under the same printer."""
    from adpfl.flare.jobs import job_name, job_settings
    from adpfl.flare.run_view import watch
    from adpfl.flare.simulator import result_dir, simulator_command

    workspace = Path(args.workspace).resolve()
    if args.resume and (args.clean or args.rounds or args.overrides or args.data_size or args.seed is not None):
        raise CliError("--resume continues the stopped run in the workspace; it takes no "
                       "--clean/--rounds/--overrides/--data-size/--seed")
    if args.clean and workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    log_path = workspace / "flare_log.txt"
    threads = args.threads or args.sites
    if args.resume:
        from adpfl.flare.resume import ResumeError, prepare_simulator_resume

        try:
            resume = prepare_simulator_resume(str(workspace), args.jobs_dir, args.task, args.mode)
        except ResumeError as e:
            raise CliError(str(e)) from None
        print(f"resuming job {resume['resumed_job_id']} at round {resume['start_round']} of {resume['num_rounds']} "
              f"from {resume['checkpoint']} (each site's privacy ledger continues from its spend)", flush=True)
        sim_ws = Path(resume["workspace"])
        cmd = simulator_command(resume["job"], sim_ws, args.sites, threads)
        num_rounds = int(resume["num_rounds"])
        private = True  # the round printer waits (at most a few seconds) for the privacy report
        what = f"resume job {resume['name']} in the simulator"
    else:
        args.task, args.mode = args.task or "skin2d", args.mode or "adpfl"
        overrides = {}
        if args.overrides:
            try:
                overrides = dict(read_json(args.overrides))
            except (OSError, ValueError, TypeError) as e:
                raise CliError(f"--overrides {args.overrides}: not a JSON object of job settings ({e})") from None
        if args.rounds:
            overrides["num_rounds"] = args.rounds
        if args.data_size:
            overrides["executor"] = {**dict(overrides.get("executor") or {}), "data_size": args.data_size}
        if args.seed is not None:
            overrides["executor"] = {**dict(overrides.get("executor") or {}), "seed": args.seed}
        sites = [f"site-{i}" for i in range(1, args.sites + 1)]
        settings = job_settings(args.task, args.mode, sites=sites, **overrides)
        num_rounds = settings["num_rounds"]
        private = settings["privacy"] is not None or bool(settings["executor"].get("dpsgd"))
        sim_ws = workspace / job_name(args.task, args.mode)
        cmd = [sys.executable, "-m", "adpfl.flare.recipe", "--env", "sim", "--task", args.task, "--mode", args.mode,
               "-w", str(workspace), "-n", str(args.sites), "-t", str(threads), "--no-summary"]
        if overrides:  # the run's settings, as the recipe's child process reads them
            settings_file = workspace / "overrides.json"
            write_json_atomic(settings_file, overrides)
            cmd += ["--overrides", str(settings_file.resolve())]
        what = f"{args.task}/{args.mode} on FLARE's SimEnv"
    print(f"{what}: {args.sites} sites, {num_rounds} rounds; FLARE's full log: {log_path}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env=_child_env(threads), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = watch(proc, lambda: result_dir(sim_ws), num_rounds, print_line=lambda m: print(m, flush=True),
                       private=private)
        except KeyboardInterrupt:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    print(f"FLARE {'finished' if rc == 0 else f'exited with {rc} (see the log)'} after "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    summary = summarize(sim_ws)
    summary["curves"] = write_curves(summary)
    print_summary(summary)
    if args.json:
        write_json_atomic(args.json, summary)
    return 0 if rc == 0 else 1


def write_curves(summary: dict) -> str | None:
    """The PNG of Dice and epsilon per round per site, in the run folder."""
    from adpfl.flare.run_view import PLOT_NAME, final_dice, plot_rounds, privacy_legend, round_rows

    rd = Path(summary["run_dir"])
    rows = round_rows(summary.get("progress"), summary.get("privacy"))
    return plot_rounds(rows, final_dice(rd), rd / PLOT_NAME, title=rd.parent.parent.name,
                       legend=privacy_legend(summary.get("privacy")))


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
    je.add_argument("--data-size", default=None, choices=DATA_SIZES,
                    help="export every job with this executor data_size (not into the checked-in jobs/)")
    je.set_defaults(func=cmd_jobs_export)

    r = sub.add_parser("run", help="run a job on FLARE's SimEnv, one line per round, then its summary")
    r.add_argument("--task", default=None, choices=TASK_NAMES, help="default skin2d")
    r.add_argument("--mode", default=None, choices=MODES, help="default adpfl")
    r.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --workspace from its last persisted round")
    r.add_argument("-w", "--workspace", default="workspace/run")
    r.add_argument("-n", "--sites", type=int, default=3)
    r.add_argument("-t", "--threads", type=int, default=3)
    r.add_argument("--jobs-dir", default=str(DEFAULT_JOBS_DIR), help="where --resume finds the stopped run's job")
    r.add_argument("--rounds", type=int, default=0, help="override num_rounds")
    r.add_argument("--overrides", default="", help="JSON file of job settings (adpfl.flare.jobs.job_settings)")
    r.add_argument("--data-size", default=None, choices=DATA_SIZES,
                   help="the executor's data_size: synthetic sites of the preset size (default: the job's, tiny)")
    r.add_argument("--seed", type=int, default=None,
                   help="the job's seed: initial model, each site's shuffling and augmentation (never the privacy "
                        "noise); default: fresh every run")
    r.add_argument("--clean", action="store_true", help="delete the workspace first")
    r.add_argument("--json", default="", help="also write the summary to this JSON file")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("summary", help="print the summary of a finished simulator workspace")
    s.add_argument("-w", "--workspace", required=True)
    s.set_defaults(func=cmd_summary)

    # sub-command groups that live with their code register their own parsers
    from adpfl.data.cli import add_parser as add_data_parser
    from adpfl.experiments.bundle import add_parser as add_export_parser
    from adpfl.experiments.compare import add_compare_parsers
    from adpfl.poc.cli import add_parser as add_poc_parser

    add_data_parser(sub)  # `adpfl data generate|prepare|validate`
    add_poc_parser(sub)  # `adpfl poc ...` (POC system)
    add_compare_parsers(sub)  # `adpfl compare` and `adpfl report`
    add_export_parser(sub)  # `adpfl export` (MONAI bundle with the privacy card)
    from adpfl.training.pretrain import add_parser as add_pretrain_parser

    add_pretrain_parser(sub)  # `adpfl pretrain-public` (warm-start checkpoint on public data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"adpfl: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # configuration errors from our own validation carry the setting's name; a missing
        # results/data folder names the path
        print(f"adpfl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
