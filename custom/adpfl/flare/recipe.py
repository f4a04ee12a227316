"""The FLARE 2.9 Recipe route: every task x mode job as a ``Recipe`` run on ``SimEnv``,
``PocEnv`` or ``ProdEnv``.

    python jobs/job.py --task skin2d --mode adpfl --env sim -w workspace/recipe
    python jobs/job.py --task skin2d --mode adpfl --env poc -w workspace/recipe
    python jobs/job.py --task skin2d --mode adpfl --env prod --startup-kit DIR --username ADMIN
    python jobs/job.py --task skin2d --mode adpfl --export --export-dir /tmp/jobs   (FLARE's own flags)

:class:`ADPFLRecipe` wraps the one job definition (:func:`adpfl.flare.jobs.build_job`, the
same one ``jobs/<task>_<mode>`` is exported from), so the Recipe route and the job folders
(``nvflare simulator``, ``nvflare job submit``) cannot drift apart. FLARE's own classes do
the running (``Recipe.execute``/``run``, the environments, ``Run.get_result``); this module
only chooses the environment from the command line and prints where the results are.
``adpfl run`` runs this module's ``--env sim`` in a child process whose output goes to a
log file, and prints one line per round instead (:mod:`adpfl.flare.run_view`). ``--env poc``
runs PocEnv in a folder of its own, on a free port, with each site's configuration and
(``--site-epsilon``) privacy policy, and always stops it (:mod:`adpfl.flare.recipe_poc`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# FLARE strips its reserved --export/--export-dir flags from sys.argv when nvflare.recipe is
# imported, so it is imported before this module's parser runs (its warning is for scripts
# that define flags of those names; this one does not)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="NVFlare reserves '--export'")
    from nvflare.recipe import ProdEnv, SimEnv
    from nvflare.recipe.spec import Recipe

from adpfl.flare.jobs import MODE_DEFAULTS, TASK_DEFAULTS, build_job, job_name, job_settings

ENVS = ("sim", "poc", "prod")
DEFAULT_WORKSPACE = os.path.join("workspace", "recipe")


class ADPFLRecipe(Recipe):
    """The ``task`` x ``mode`` job of this bundle as a FLARE Recipe.

    ``overrides`` are :func:`adpfl.flare.jobs.job_settings`'s (``num_rounds``, ``sites``,
    ``executor={...}``, ``privacy={...}``); ``settings`` holds the resolved result.
    """

    def __init__(self, task: str, mode: str, name: str | None = None, **overrides):
        self.task, self.mode = task, mode
        self.settings = job_settings(task, mode, **overrides)
        super().__init__(build_job(task, mode, name=name, **overrides))


def site_names(sites: int, clients: str | None) -> list[str]:
    """``clients`` ("a,b,c") as a list, else FLARE's simulator/POC names site-1 .. site-<sites>."""
    if clients:
        names = [c.strip() for c in clients.split(",") if c.strip()]
        if not names:
            raise ValueError(f"--clients names no site: {clients!r}")
        return names
    if sites < 1:
        raise ValueError(f"--sites must be >= 1, got {sites}")
    return [f"site-{i}" for i in range(1, sites + 1)]


def make_env(env: str, *, clients: list[str], workspace: str = DEFAULT_WORKSPACE, threads: int | None = None,
             startup_kit: str | None = None, username: str | None = None, poc_project: str | None = None,
             login_timeout: float = 10.0):
    """The FLARE execution environment ``env`` (sim | poc | prod).

    sim: ``SimEnv`` with the simulator workspace ``<workspace>/<job name>``; poc: ``PocEnv``
    (FLARE prepares, starts and afterwards stops a POC system in its POC workspace,
    ``NVFLARE_POC_WORKSPACE``), from ``poc_project`` (a project.yml) when given; prod:
    ``ProdEnv`` submitting with the admin startup kit ``startup_kit`` as ``username``.
    """
    if env == "sim":
        return SimEnv(clients=clients, num_threads=threads or len(clients), workspace_root=os.path.abspath(workspace))
    if env == "poc":
        kw = {"username": username} if username else {}
        if poc_project:
            if not os.path.isfile(poc_project):
                raise ValueError(f"--poc-project {poc_project} is not a file")
            kw["project_conf_path"] = os.path.abspath(poc_project)
        from adpfl.flare.recipe_poc import StoppingPocEnv

        # num_clients too: PocEnv's default (2) otherwise contradicts a list of 3 sites
        return StoppingPocEnv(num_clients=len(clients), clients=clients, extra={"login_timeout": login_timeout}, **kw)
    if env == "prod":
        if not startup_kit:
            raise ValueError("--env prod needs --startup-kit DIR (the admin's startup kit)")
        if not os.path.isdir(startup_kit):
            raise ValueError(f"--startup-kit {startup_kit} is not a folder")
        kw = {"username": username} if username else {}
        return ProdEnv(startup_kit_location=os.path.abspath(startup_kit), login_timeout=login_timeout, **kw)
    raise ValueError(f"--env must be one of {ENVS}, got {env!r}")


def _overrides(args) -> dict:
    overrides = {}
    if args.overrides:
        try:
            with open(args.overrides) as f:
                overrides = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--overrides {args.overrides}: not a readable JSON file: {e}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--overrides {args.overrides} must hold a JSON object of job settings")
    if args.rounds:
        overrides["num_rounds"] = args.rounds
    return overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="job.py", description="run an adpfl job as a FLARE Recipe (SimEnv, PocEnv, "
                                "ProdEnv); FLARE's --export [--export-dir DIR] writes the job folder instead")
    p.add_argument("--task", default="skin2d", choices=tuple(TASK_DEFAULTS))
    p.add_argument("--mode", default="adpfl", choices=tuple(MODE_DEFAULTS))
    p.add_argument("--env", default="sim", choices=ENVS)
    p.add_argument("-w", "--workspace", default=DEFAULT_WORKSPACE,
                   help="sim: the SimEnv workspace root (the run is <workspace>/<task>_<mode>)")
    p.add_argument("-n", "--sites", type=int, default=3, help="number of sites site-1..site-N (sim, poc)")
    p.add_argument("--clients", default=None, help="comma-separated site names instead of site-1..site-N")
    p.add_argument("-t", "--threads", type=int, default=None, help="sim: sites trained at once (default: all)")
    p.add_argument("--rounds", type=int, default=0, help="override num_rounds")
    p.add_argument("--overrides", default=None, help="JSON file of job settings (as adpfl.flare.jobs.job_settings)")
    p.add_argument("--name", default=None, help="job name (default <task>_<mode>)")
    p.add_argument("--startup-kit", default=None, help="prod: the admin's startup kit folder")
    p.add_argument("--username", default=None, help="poc/prod: the admin user (default FLARE's)")
    p.add_argument("--poc-workspace", default=None,
                   help="poc: the run's own POC folder (FLARE's POC workspace, HOME, project.yml, results; "
                        "default <workspace>/<name>_poc)")
    p.add_argument("--poc-project", default=None,
                   help="poc: your own project.yml for the POC system instead of the generated one (its ports, "
                        "its admin: pass --username; no site config or policy is written)")
    p.add_argument("--data-root", default=None, help="poc: the sites' data parent folder (the task's data is "
                   "<data-root>/<task>; default $ADPFL_DATA_ROOT, else ~/.cache/adpfl/data as in sim)")
    p.add_argument("--ledger-dir", default=None, help="poc: the sites' privacy ledger folder (default: each site's "
                   "workspace in the POC system, new at every run)")
    p.add_argument("--site-epsilon", type=float, default=None, help="poc: give every site its own privacy policy "
                   "(local/privacy.json, site-level update DP at delta 1e-5, Opacus RDP) with this budget; it "
                   "supersedes the job's own filter (default: none, the job's mode protects)")
    p.add_argument("--site-rounds", type=int, default=0, help="poc: releases the site budget covers (default: "
                   "the job's num_rounds)")
    p.add_argument("--timeout", type=float, default=0.0, help="poc/prod: seconds to wait for the result (0: no limit)")
    p.add_argument("--no-summary", action="store_true", help="sim, poc: do not print the run summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        clients = site_names(args.sites, args.clients)
        overrides = dict(_overrides(args))
        overrides.setdefault("sites", clients)
        if "min_clients" not in overrides:
            # the sites the run names are the ones it waits for (the job's default is 3)
            overrides["min_clients"] = min(len(clients), int(job_settings(args.task, args.mode)["min_clients"]))
        recipe = ADPFLRecipe(args.task, args.mode, name=args.name, **overrides)
        if len(clients) < int(recipe.settings["min_clients"]):
            raise ValueError(f"the job needs min_clients={recipe.settings['min_clients']} sites but runs "
                             f"{len(clients)} ({', '.join(clients)}); set min_clients in --overrides or add sites")
        if args.env == "poc" and not _exporting():
            return _run_poc(args, recipe, clients)
        env = make_env(args.env, clients=clients, workspace=args.workspace, threads=args.threads,
                       startup_kit=args.startup_kit, username=args.username, poc_project=args.poc_project)
    except ValueError as e:
        print(f"job.py: error: {e}", file=sys.stderr)
        return 2
    if args.env == "sim":
        from adpfl.flare.simulator import simulator_env

        os.environ.update(simulator_env(args.threads or len(clients)))
    name = args.name or job_name(args.task, args.mode)
    try:
        run = recipe.execute(env)  # --export: writes the job folder and exits here
    except RuntimeError as e:  # SimEnv: the simulator failed; ProdEnv: the submission failed
        print(f"job.py: {e}", file=sys.stderr)
        return 1
    print(f"job {name}: id {run.get_job_id()} on {type(env).__name__}", flush=True)
    # PocEnv stops its system after the result is in; keep its workspace (the download is there)
    result = run.get_result(timeout=args.timeout, clean_up=False)
    status = run.get_status()
    print(f"result: {result}" + (f" (status {status})" if status else ""), flush=True)
    if result is None:
        return 1
    if args.env == "sim" and not args.no_summary:
        from adpfl.cli import print_summary, summarize

        print_summary(summarize(result))
    return 0


def _exporting() -> bool:
    """Whether FLARE consumed --export from the command line (execute() then only exports)."""
    from nvflare.recipe.spec import _peek_recipe_args

    return bool(_peek_recipe_args()[0])


def _run_poc(args, recipe: ADPFLRecipe, clients: list[str]) -> int:
    """``--env poc``: the job on a POC system of its own (:mod:`adpfl.flare.recipe_poc`),
    stopped and its processes gone whatever happens; the result moved to
    ``<poc folder>/results/<job id>`` and summarized."""
    from adpfl.cli import print_summary
    from adpfl.flare import recipe_poc
    from adpfl.flare.simulator import simulator_env

    name = args.name or job_name(args.task, args.mode)
    root = recipe_poc.poc_root(args.workspace, name, args.poc_workspace)
    # the sites' data: where sim finds it (resolved now, before HOME points into the POC folder)
    data_root = args.data_root or os.environ.get("ADPFL_DATA_ROOT") or os.path.join(
        os.path.expanduser("~"), ".cache", "adpfl", "data")
    os.environ.update(simulator_env(len(clients)))  # each site process its share of the cores
    job_id, result, status = None, None, None
    try:
        with recipe_poc.isolated_poc(root) as state:
            project, username = args.poc_project, args.username
            if not project:
                project, port = recipe_poc.write_project(
                    root, clients, data_root, args.ledger_dir, args.site_epsilon,
                    args.site_rounds or int(recipe.settings["num_rounds"]))
                username = recipe_poc.ADMIN_USER
                print(f"POC system in {root}: server on localhost:{port}, sites {', '.join(clients)}, data "
                      f"{data_root}" + (f", site policy epsilon {args.site_epsilon:g}" if args.site_epsilon
                                        is not None else ""), flush=True)
            env = make_env("poc", clients=clients, username=username, poc_project=project)
            state["env"] = env
            run = recipe.execute(env)
            job_id = run.get_job_id()
            print(f"job {name}: id {job_id} on PocEnv", flush=True)
            result = run.get_result(timeout=args.timeout, clean_up=False)
            status = run.get_status()
    except KeyboardInterrupt:
        print(f"job.py: interrupted; the POC system in {root} was stopped", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"job.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # FLARE's provisioning, start or submission failed (the system is stopped)
        print(f"job.py: the POC run failed: {e} (logs under {os.path.join(root, recipe_poc.POC_DIR)})",
              file=sys.stderr)
        return 1
    result = recipe_poc.keep_result(root, result, job_id)
    print(f"result: {result}" + (f" (status {status})" if status else ""), flush=True)
    if result is None:
        return 1
    if not args.no_summary:
        print_summary(recipe_poc.poc_summary(result))
    return 0 if not status or "COMPLETED" in status else 1


def cli(argv: list[str] | None = None) -> None:
    """``jobs/job.py``'s entry point: :func:`main`, then exit. An admin session FLARE opened and
    an interrupt (Ctrl-C while it waited for the job) cut off leaves a non-daemon FLARE thread
    that would keep the process alive after the POC system is gone; then the process ends
    without waiting for it (everything is already stopped and flushed)."""
    import threading

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
