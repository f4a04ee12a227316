"""POC helpers only the tests use (kept out of the shipped ``adpfl.poc`` package)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from adpfl._io import read_json, write_json_atomic
from adpfl.poc import ADPFL_ALLOW_LIST, load_state


def remove_allow_list(participant_dir: str, extra: Iterable[str] = ADPFL_ALLOW_LIST) -> Path | None:
    target = Path(participant_dir) / "local" / "resources.json"
    if not target.is_file():
        return None
    resources = read_json(target)
    resources["class_allow_list"] = [c for c in resources.get("class_allow_list", []) if c not in set(extra)]
    write_json_atomic(target, resources)
    return target


def site_ledger(workspace: str, site: str, task: str) -> Path:
    """The site's own privacy ledger file (default location: the site's workspace)."""
    state = load_state(workspace)
    site_dir = Path(state["prod_dir"]) / site
    from adpfl.flare.site_config import resolve_ledger_dir

    return Path(resolve_ledger_dir("", str(site_dir))) / site / f"{task}.json"

