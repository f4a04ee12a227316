"""The POC workspace's names and its state file (``<workspace>/adpfl_poc.json``)."""

from __future__ import annotations

import os
from pathlib import Path

from adpfl._io import read_json, write_json_atomic

PROJECT_NAME = "adpfl_poc"
ADMIN_USER = "admin@adpfl.local"
SERVER_NAME = "server"
ORG = "adpfl"
STATE_FILE = "adpfl_poc.json"
DEFAULT_WORKSPACE = os.path.join("workspace", "poc")


class PocError(RuntimeError):
    """A POC step failed; the message says what to do."""


def prod_dir(workspace: str) -> Path:
    return Path(workspace).resolve() / PROJECT_NAME / "prod_00"


def load_state(workspace: str) -> dict:
    path = Path(workspace) / STATE_FILE
    if not path.is_file():
        raise PocError(f"{workspace} is not a workspace prepared by `adpfl poc prepare` or `adpfl kits provision` "
                       f"(no {STATE_FILE})")
    return read_json(path)


def save_state(workspace: str, state: dict) -> None:
    path = Path(workspace) / STATE_FILE
    write_json_atomic(path, state)


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]

