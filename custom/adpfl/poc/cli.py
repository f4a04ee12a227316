"""``adpfl poc ...``: one sub-command per step, and ``run`` (all steps for one job)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from adpfl.poc.admin import abort, download, resume, run_cycle, submit, wait
from adpfl.poc.processes import start, stop
from adpfl.poc.project import ADPFL_ALLOW_LIST, DEFAULT_SITE_EPSILON, DEFAULT_SITE_ROUNDS, prepare, write_allow_list
from adpfl.poc.state import DEFAULT_WORKSPACE, PocError


def run(
    job_dir: str,
    workspace: str = DEFAULT_WORKSPACE,
    sites: int = 2,
    home: str | None = None,
    port: int = 0,
    data_root: str | None = None,
    result_dir: str | None = None,
    start_timeout: float = 120.0,
    job_timeout: float = 1800.0,
    log: Callable[[str], None] = print,
    site_epsilon: float | None = DEFAULT_SITE_EPSILON,
    site_rounds: int = DEFAULT_SITE_ROUNDS,
) -> dict:
    """prepare, start, submit ``job_dir``, wait, download; always stop. ``site_epsilon`` /
    ``site_rounds``: each site's privacy policy as in :func:`adpfl.poc.project.prepare`
    (None: no site policy)."""

    def setup():
        prepare(workspace, sites=sites, home=home, port=port, data_root=data_root, log=log,
                site_epsilon=site_epsilon, site_rounds=site_rounds)
        start(workspace, home=home, timeout=start_timeout, log=log)

    return run_cycle(workspace, setup, lambda: submit(workspace, job_dir, log=log),
                     lambda: stop(workspace, home=home, log=log), result_dir, job_timeout, log)


def _site_policy_arguments(q) -> None:
    q.add_argument("--site-epsilon", type=float, default=DEFAULT_SITE_EPSILON,
                   help="each site's own budget (site-level update DP, delta 1e-5) enforced on every job through "
                        f"its local/privacy.json (default {DEFAULT_SITE_EPSILON:g}, the bundled jobs' budget)")
    q.add_argument("--site-rounds", type=int, default=DEFAULT_SITE_ROUNDS,
                   help=f"releases the site's budget covers in total (default {DEFAULT_SITE_ROUNDS})")
    q.add_argument("--no-site-policy", action="store_true", help="write no local/privacy.json: each job decides")


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
    q.add_argument("--data-root", default=None,
                   help="sites' data parent: <data-root>/<task>/<site> (default <workspace>/data)")
    q.add_argument("--ledger-dir", default=None, help="sites' privacy ledger folder (default: each site's workspace)")
    q.add_argument("--allow-list", action="store_true",
                   help="allow-list adpfl.* in every site's local/resources.json (jobs without app/custom/)")
    _site_policy_arguments(q)
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

    add_follow_commands(psub, common)

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
    _site_policy_arguments(q)
    q.set_defaults(func=_cli(_cli_run))

    from adpfl.poc.kits_cli import add_parser as add_kits_parser

    # `adpfl kits ...` (provisioned kits on one machine) shares the site-policy flags and error handling
    add_kits_parser(sub)


def add_follow_commands(psub, common) -> None:
    """``wait`` and ``download`` of a running system's job (``adpfl poc`` and ``adpfl kits``)."""
    q = psub.add_parser("wait", help="follow a job (status, round) until it ends")
    common(q)
    q.add_argument("job_id")
    q.add_argument("--timeout", type=float, default=1800.0)
    q.set_defaults(func=_cli(_cli_wait))

    q = psub.add_parser("download", help="download a job's result; show where model, TB logs, report are")
    common(q)
    q.add_argument("job_id")
    q.add_argument("-o", "--output", default=None, help="destination folder (default <workspace>/results)")
    q.set_defaults(func=_cli(lambda a: download(a.workspace, a.job_id,
                                                a.output or os.path.join(a.workspace, "results"))))


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
    found = run(a.job_dir, a.workspace, a.sites, a.home, a.port, a.data_root, a.output, job_timeout=a.timeout,
                site_epsilon=None if a.no_site_policy else a.site_epsilon, site_rounds=a.site_rounds)
    print(f"job {found['job_id']} ended: {found['status']}")
    return 0 if found["status"] == "FINISHED:COMPLETED" else 1

