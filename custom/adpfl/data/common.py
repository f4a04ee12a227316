"""Shared constants and helpers of the data layer (tasks, label sets, site index, I/O).

Tasks
-----
=========  ==========================================  =============================
task       image                                       label values
=========  ==========================================  =============================
skin2d     RGB PNG/JPEG (ISIC 2018 style)              {0, 255}  (also {0, 1})
kidney3d   1-channel CT NIfTI (HU)                     0 bg, 1 kidney, 2 tumour, 3 cyst
brain3d    4 NIfTI files: T1n, T1c, T2w, T2-FLAIR      0 bg, 1 NETC, 2 SNFH, 3 ET, 4 RC
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
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

TASKS = ("skin2d", "kidney3d", "brain3d")

#: number of image channels per task
NUM_CHANNELS = {"skin2d": 3, "kidney3d": 1, "brain3d": 4}
#: number of separate image files per case (brain3d: one NIfTI per modality)
NUM_IMAGE_FILES = {"skin2d": 1, "kidney3d": 1, "brain3d": 4}
#: spatial dimensionality per task
SPATIAL_DIMS = {"skin2d": 2, "kidney3d": 3, "brain3d": 3}
#: allowed label values per task (skin2d also accepts a {0, 1} mask, see ``label_values_ok``)
LABEL_VALUES = {
    "skin2d": frozenset({0, 255}),
    "kidney3d": frozenset({0, 1, 2, 3}),
    "brain3d": frozenset({0, 1, 2, 3, 4}),  # BraTS 2024 GLI: 4 = resection cavity
}
LABEL_NAMES = {
    "skin2d": {0: "background", 255: "lesion"},
    "kidney3d": {0: "background", 1: "kidney", 2: "tumour", 3: "cyst"},
    "brain3d": {0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
}
BRAIN_MODALITIES = ("t1n", "t1c", "t2w", "t2f")

_SITE_RE = re.compile(r"^site-(\d+)$")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def site_index(site_name: str) -> int:
    """``"site-1" -> 0``, ``"site-2" -> 1``...; other names -> stable sha256-based index >= 1000."""
    m = _SITE_RE.match(str(site_name))
    if m and int(m.group(1)) >= 1:
        return int(m.group(1)) - 1
    digest = hashlib.sha256(str(site_name).encode("utf-8")).hexdigest()
    return 1000 + int(digest[:8], 16) % 100000


def label_values_ok(task: str, values) -> tuple[bool, list[int]]:
    """Return (ok, unknown_values) for the set of label values found in a mask."""
    vals = {int(v) for v in values}
    allowed = set(LABEL_VALUES[task])
    if task == "skin2d" and vals <= {0, 1}:
        return True, []
    bad = sorted(vals - allowed)
    return not bad, bad


def normalize_size(task: str, size) -> tuple[int, ...]:
    """Normalise ``size`` (None, int or tuple) to a spatial shape tuple for ``task``."""
    nd = SPATIAL_DIMS[check_task(task)]
    if size is None:
        size = 128 if nd == 2 else 64
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
