"""Where a site keeps its data and its privacy ledger, decided by the site, not the job.

Order of precedence for each setting (first found wins):
1. the site's own file ``<site workspace>/local/adpfl_site.json``, e.g.
   ``{"data_root": {"kidney3d": "/data/kits23_site"}, "ledger_dir": "/secure/adpfl"}``
   (``data_root`` may also be one string, used for every task),
2. environment variables of the site process: ``ADPFL_DATA_ROOT`` (a parent folder:
   the task's data is ``$ADPFL_DATA_ROOT/<task>``) and ``ADPFL_LEDGER_DIR``,
3. the job's own argument (``data_root`` of the executor: the task's folder),
4. built-in defaults: data under ``~/.cache/adpfl/data/<task>``, the ledger under
   ``<site workspace>/adpfl_privacy`` -- except in ``nvflare simulator``, which deletes its
   whole workspace (site folders included) at every start but keeps the workspace's top-level
   ``local/`` folder: there the ledgers live in ``<simulator workspace>/local/adpfl_privacy``,
   so re-running or resuming a simulation in the same workspace continues every site's
   ledger instead of silently resetting it.

The same file holds the site's privacy decisions for record-level DP-SGD jobs, which win
over any job: ``max_epsilon`` (a cap on the record-level budget) and ``public_num_records``
(the training-record count the site declares public, e.g. its published cohort size; the
sample rate and step count then come from it rather than from the true count).

A real site (startup kit) therefore points the bundle at its data without editing jobs.
"""

from __future__ import annotations

import os

from adpfl._io import read_json

SITE_CONFIG_NAME = "adpfl_site.json"
_KNOWN_KEYS = {"data_root", "ledger_dir", "max_epsilon", "public_num_records"}


def read_site_config(workspace_root: str | None) -> dict:
    if not workspace_root:
        return {}
    path = os.path.join(workspace_root, "local", SITE_CONFIG_NAME)
    if not os.path.exists(path):
        return {}
    try:
        cfg = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"site config {path} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"site config {path} must hold a JSON object")
    unknown = set(cfg) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"site config {path} has unknown keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
    return cfg


def resolve_data_root(task: str, job_value: str, workspace_root: str | None) -> str:
    cfg = read_site_config(workspace_root)
    site_value = cfg.get("data_root")
    if isinstance(site_value, dict):
        site_value = site_value.get(task)
    env_value = os.environ.get("ADPFL_DATA_ROOT")
    for value in (site_value, os.path.join(env_value, task) if env_value else None, job_value):
        if value:
            return os.path.abspath(os.path.expanduser(value))
    return os.path.join(os.path.expanduser("~"), ".cache", "adpfl", "data", task)


def resolve_ledger_dir(job_value: str, workspace_root: str | None, simulate: bool = False) -> str:
    cfg = read_site_config(workspace_root)
    for value in (cfg.get("ledger_dir"), os.environ.get("ADPFL_LEDGER_DIR"), job_value):
        if value:
            return os.path.abspath(os.path.expanduser(value))
    if not workspace_root:
        raise ValueError("no ledger_dir configured and no site workspace known")
    if simulate:
        # the simulator's site workspace is <simulator workspace>/<site>, wiped at every start
        return os.path.join(os.path.dirname(os.path.abspath(workspace_root)), "local", "adpfl_privacy")
    return os.path.join(workspace_root, "adpfl_privacy")


def is_simulation(fl_ctx) -> bool:
    """Whether this FLARE context belongs to an ``nvflare simulator`` run."""
    from nvflare.apis.fl_constant import FLContextKey

    return bool(fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False))
