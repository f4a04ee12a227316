"""Run this bundle's jobs on a local FLARE POC system (``adpfl poc ...``).

A POC system is a real FLARE deployment on one machine: a server process and one
process per site, each with its own startup kit and workspace, talking over a local
port with mutual TLS. Unlike the simulator it runs jobs exactly as a real federation
does (job submission over the admin API, one job process per site, site-local
configuration in ``<site>/local/``), and it keeps running between jobs, so a site's
privacy ledger carries over from one job to the next.

Steps (each is one function of this package and one ``adpfl poc`` sub-command):

``prepare``   ``nvflare poc prepare`` from a generated project.yml: server + site-1..site-N
              + one project admin, on a free port; writes each site's
              ``local/adpfl_site.json`` (where its data and ledger live)
``start``     ``nvflare poc start --no-wait`` (server and sites only, no admin console),
              then waits until every site is connected (FLARE's session API)
``submit``    submits a job folder, prints its id
``wait``      follows a job (status, current round from the server's job log) until done
``download``  downloads the job's result and finds the global model, TensorBoard logs,
              privacy_report.json and the final validation in it
``stop``      ``nvflare poc stop``, then ends any process of this POC system still alive,
              by PID (the service PID files and a scan for processes of this workspace)
``run``       all of the above for one job, with ``stop`` in a ``finally``

``nvflare poc`` keeps its settings in ``$HOME/.nvflare/config.conf`` and uses
``$NVFLARE_POC_WORKSPACE``; every function takes ``workspace`` and ``home`` so a test (or a
user with several systems) keeps them apart. The processes FLARE starts run ``python3``
from PATH: :func:`poc_env` puts the running interpreter's ``bin`` folder first.

Modules: ``state`` (names, the workspace's state file), ``project`` (project.yml, site
config, allow-list, ``prepare``), ``processes`` (``nvflare poc`` calls, ports, ``start``,
``stop``, leftovers), ``admin`` (the admin session: submit, wait, download, abort,
resume), ``cli`` (the ``adpfl poc`` sub-commands and ``run``), ``kits`` and ``kits_cli``
(``adpfl kits``: the provisioned kits of ``poc/project.yml`` started with their own
``start.sh`` on one machine, ``nvflare job submit`` / ``ProdEnv`` submission, admin console
commands, shutdown through the admin API).
"""

from adpfl.poc.admin import abort, download, resume, submit, wait
from adpfl.poc.cli import add_parser, run
from adpfl.poc.processes import live_pids, start, stop
from adpfl.poc.project import ADPFL_ALLOW_LIST, prepare, write_allow_list
from adpfl.poc.state import STATE_FILE, PocError, load_state

__all__ = [
    "ADPFL_ALLOW_LIST", "STATE_FILE", "PocError", "abort", "add_parser", "download", "live_pids", "load_state",
    "prepare", "resume", "run", "start", "stop", "submit", "wait", "write_allow_list",
]
