"""One atomic JSON writer and reader for every file the bundle writes (ledgers, reports,
datalists, progress, state).

A write goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``-d over the target: a crash leaves the old file or the new one, never half
of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_json_atomic", "read_json"]


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2, default=None) -> None:
    """Write ``data`` as JSON to ``path`` atomically (creates the folder if needed)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, default=default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; errors name the file (``ValueError`` for bad JSON, ``OSError`` as raised)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
