"""``adpfl kits ...``: provisioned startup kits run on one machine (:mod:`adpfl.poc.kits`)."""

from __future__ import annotations

from adpfl.poc import kits
from adpfl.poc.cli import _cli as cli
from adpfl.poc.cli import _site_policy_arguments as site_policy_arguments
from adpfl.poc.cli import _stderr as stderr
from adpfl.poc.cli import add_follow_commands


def add_parser(sub) -> None:
    """Register ``adpfl kits ...`` (same site-policy flags and error handling as ``adpfl poc``)."""
    p = sub.add_parser("kits", help="run provisioned startup kits (poc/project.yml) on this machine, end to end")
    ksub = p.add_subparsers(dest="kits_command", required=True)

    def ws(q):
        q.add_argument("-w", "--workspace", default=kits.DEFAULT_KITS_WORKSPACE,
                       help=f"kits workspace (default {kits.DEFAULT_KITS_WORKSPACE})")

    q = ksub.add_parser("provision", help="provision the project file for this machine (server localhost, free "
                                          "port); write each hospital's site config and privacy policy")
    ws(q)
    q.add_argument("-p", "--project", default=kits.DEFAULT_PROJECT, help="project file (default poc/project.yml)")
    q.add_argument("--port", type=int, default=0, help="server port (default 0: a free one)")
    q.add_argument("--home", default=None, help="HOME for nvflare (default: yours)")
    q.add_argument("--data-root", default=None,
                   help="hospitals' data parent: <data-root>/<task>/<site> (default <workspace>/data)")
    q.add_argument("--ledger-dir", default=None, help="hospitals' privacy ledger folder (default: each kit)")
    q.add_argument("--allow-list", action="store_true", help="allow-list adpfl.* in every kit's local/resources.json")
    site_policy_arguments(q)
    q.set_defaults(func=cli(lambda a: kits.provision(
        a.workspace, a.project, a.home, a.port, a.data_root, a.ledger_dir, a.allow_list,
        site_epsilon=None if a.no_site_policy else a.site_epsilon, site_rounds=a.site_rounds)))

    q = ksub.add_parser("start", help="run each kit's startup/start.sh; wait until every hospital is connected")
    ws(q)
    q.add_argument("--timeout", type=float, default=180.0)
    q.set_defaults(func=cli(lambda a: kits.start(a.workspace, a.timeout)))

    q = ksub.add_parser("submit", help="`nvflare job submit` a job folder with the admin kit; prints the job id")
    ws(q)
    q.add_argument("job_dir")
    q.set_defaults(func=cli(lambda a: print(kits.submit_cli(a.workspace, a.job_dir, log=stderr))))

    q = ksub.add_parser("recipe", help="run the bundle's job TASK x MODE as a Recipe on ProdEnv with the admin kit; "
                                       "prints the job id")
    ws(q)
    q.add_argument("task")
    q.add_argument("mode")
    q.add_argument("--num-rounds", type=int, default=None)
    q.set_defaults(func=cli(_cli_recipe))

    q = ksub.add_parser("console", help="send admin console commands (e.g. 'check_status client' 'list_jobs')")
    ws(q)
    q.add_argument("commands", nargs="+", help="one command string each, as typed in the admin console")
    q.set_defaults(func=cli(_cli_console))

    add_follow_commands(ksub, ws)

    q = ksub.add_parser("stop", help="shutdown client + server through the admin API; kill what is left by PID")
    ws(q)
    q.set_defaults(func=cli(lambda a: kits.stop(a.workspace)))

    q = ksub.add_parser("run", help="provision, start, submit (nvflare job submit), wait, download, stop")
    ws(q)
    q.add_argument("job_dir")
    q.add_argument("-p", "--project", default=kits.DEFAULT_PROJECT)
    q.add_argument("--port", type=int, default=0)
    q.add_argument("--data-root", default=None)
    q.add_argument("-o", "--output", default=None)
    q.add_argument("--timeout", type=float, default=1800.0)
    site_policy_arguments(q)
    q.set_defaults(func=cli(_cli_run))


def _cli_recipe(a) -> None:
    overrides = {} if a.num_rounds is None else {"num_rounds": a.num_rounds}
    recipe = kits.job_recipe(a.task, a.mode, workspace=a.workspace, **overrides)
    print(kits.submit_recipe(a.workspace, recipe, log=stderr))


def _cli_console(a) -> None:
    for command, reply in zip(a.commands, kits.console(a.workspace, *a.commands)):
        print(f"> {command}")
        print(kits.reply_text(reply) or reply.get("details") or "(done)")


def _cli_run(a) -> int:
    found = kits.run(a.job_dir, a.workspace, a.project, port=a.port, data_root=a.data_root, result_dir=a.output,
                     job_timeout=a.timeout, site_epsilon=None if a.no_site_policy else a.site_epsilon,
                     site_rounds=a.site_rounds)
    print(f"job {found['job_id']} ended: {found['status']}")
    return 0 if found["status"] == "FINISHED:COMPLETED" else 1
