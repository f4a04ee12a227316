"""Shared helpers of the data layer (task check, site index, sizes, paths).

Tasks
-----
The facts of each task (channels, image files per case, label values of its mask files,
spatial dimensions, default size) live in the task registry, :mod:`adpfl.tasks`; the data
layer reads them from there (``get_task(name)``, which imports neither torch nor MONAI).

=========  ==========================================  =============================
task       image                                       mask values
=========  ==========================================  =============================
skin2d     RGB PNG/JPEG (ISIC 2018 style)              {0, 255}  (also {0, 1})
kidney3d   1-channel CT NIfTI (HU)                     0 bg, 1 kidney, 2 tumor, 3 cyst
brain3d    4 NIfTI files: T1n, T1c, T2w, T2-FLAIR      0 bg, 1 NETC, 2 SNFH, 3 ET, 4 RC (BraTS 2024 GLI)
=========  ==========================================  =============================

Site index
----------
``site_index("site-N") == N - 1`` for N >= 1.  Any other name maps to a stable index
``1000 + int(sha256(name)[:8 hex digits], 16) % 100000`` which never collides with the
``site-N`` range used in practice (N <= 1000) and is identical across processes/machines
(unlike Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from adpfl.tasks.base import TASK_NAMES, SegTask, get_task

from .errors import DataError

#: file-name suffixes of a brain3d case's four NIfTI files (BraTS 2024), in channel order
BRAIN_MODALITIES = get_task("brain3d").image_files

_SITE_RE = re.compile(r"^site-(\d+)$")


def check_task(task: str) -> str:
    if task not in TASK_NAMES:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASK_NAMES)}")
    return task


def task_facts(task: str) -> SegTask:
    """The registry entry of ``task`` (a :class:`DataError` for an unknown name)."""
    return get_task(check_task(task))


def site_index(site_name: str) -> int:
    """``"site-1" -> 0``, ``"site-2" -> 1``...; other names -> stable sha256-based index >= 1000."""
    m = _SITE_RE.match(str(site_name))
    if m and int(m.group(1)) >= 1:
        return int(m.group(1)) - 1
    digest = hashlib.sha256(str(site_name).encode("utf-8")).hexdigest()
    return 1000 + int(digest[:8], 16) % 100000


def normalize_size(task: str, size) -> tuple[int, ...]:
    """Normalise ``size`` (None, int or tuple) to a spatial shape tuple for ``task``."""
    facts = task_facts(task)
    nd = facts.spatial_dims
    if size is None:
        size = facts.default_size
    if isinstance(size, (int, np.integer)):
        shape = (int(size),) * nd
    else:
        shape = tuple(int(s) for s in size)
    if len(shape) != nd or min(shape) < 16:
        raise DataError(
            f"size={size!r} is invalid for task {task!r}: expected an int or {nd} ints, each >= 16"
        )
    return shape


def rel_or_abs(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """Path relative to ``start`` when possible (same drive), else absolute; '/' separators."""
    path = os.path.abspath(path)
    try:
        rel = os.path.relpath(path, os.path.abspath(start))
    except ValueError:  # different drives on Windows
        return Path(path).as_posix()
    return Path(rel).as_posix()
