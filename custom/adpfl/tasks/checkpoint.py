"""Warm-start checkpoints trained only on declared public data: written with a provenance
record, read back only when that record holds.

A checkpoint is two files: the task network's state dict (``torch.save``, the keys of
:class:`~adpfl.tasks.network.TaskNetwork`) and ``<checkpoint>.provenance.json`` beside it:
the task, the network variant, the image size, the public data it was trained on (generator,
data seed, site names and indices), ``"public": true``, the sha256 of the weights file and
the command that wrote it. :func:`load_public_checkpoint` refuses (a :class:`CheckpointError`
naming the setting and the file) a missing file, a missing or unreadable provenance, one
that does not declare public data, weights whose sha256 differs from the provenance's, and a
task, network or tensor shape that is not the job's. Training on public data spends no
site's privacy budget, which is why only a declared-public checkpoint is accepted.

Written by hand: neither MONAI nor FLARE has a checkpoint format with a provenance check
(FLARE's ``PTFileModelPersistor(source_ckpt_file_full_name=...)`` loads any file as it is).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["CheckpointError", "SETTING", "provenance_path", "sha256_file", "save_public_checkpoint",
           "load_public_checkpoint"]

#: the job setting that names a warm-start checkpoint (errors name it)
SETTING = "initial_checkpoint"


class CheckpointError(ValueError):
    """A warm-start checkpoint that must not be used; the message names the setting and file."""


def provenance_path(path: str | os.PathLike) -> Path:
    """``<checkpoint>.provenance.json``: the provenance record beside the weights."""
    p = Path(path)
    return p.with_name(p.name + ".provenance.json")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_public_checkpoint(state_dict: dict, path: str | os.PathLike, provenance: dict) -> dict:
    """Write the weights and their provenance (``provenance`` plus ``public``, ``sha256``,
    the tensor shapes); returns the provenance written. Both files are written atomically."""
    from adpfl._io import write_json_atomic

    if not provenance.get("task") or not provenance.get("network"):
        raise ValueError("a public checkpoint's provenance needs its task and network")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    record = dict(provenance, public=True, weights_file=path.name, sha256=sha256_file(path),
                  shapes={k: list(v.shape) for k, v in state.items()})
    write_json_atomic(provenance_path(path), record, indent=1)
    return record


def _fail(path, why: str) -> CheckpointError:
    return CheckpointError(f"{SETTING}={path}: {why}")


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance of checkpoint ``path``, checked to declare public data and to match the
    weights file's sha256 (CheckpointError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file (the warm-start checkpoint, e.g. written by `adpfl pretrain-public`)")
    prov_path = provenance_path(path)
    if not prov_path.is_file():
        raise _fail(path, f"its provenance {prov_path} is missing: only a checkpoint that declares it was trained "
                          "on public data (as `adpfl pretrain-public` writes) may start a job")
    try:
        with open(prov_path, encoding="utf-8") as f:
            prov = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"its provenance {prov_path} is not readable JSON: {e}") from None
    if not isinstance(prov, dict):
        raise _fail(path, f"its provenance {prov_path} must hold a JSON object")
    if prov.get("public") is not True:
        raise _fail(path, f"its provenance {prov_path} does not declare public training data (\"public\": true); "
                          "a checkpoint trained on a site's data would carry that data past the site's privacy "
                          "budget")
    digest = sha256_file(path)
    if prov.get("sha256") != digest:
        raise _fail(path, f"the weights' sha256 {digest} is not the one its provenance {prov_path} declares "
                          f"({prov.get('sha256')!r}): the file was changed or replaced after it was written")
    return prov


def load_public_checkpoint(path: str | os.PathLike, task: str, network: str, reference: dict) -> dict:
    """The checked state dict of the warm-start checkpoint ``path`` for ``task`` x ``network``;
    ``reference`` is the freshly built network's state dict (its keys and shapes must match)."""
    prov = read_provenance(path)
    for name, want in (("task", task), ("network", network)):
        if prov.get(name) != want:
            raise _fail(path, f"trained for {name} {prov.get(name)!r}, the job's {name} is {want!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise _fail(path, f"not a readable torch state dict: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _fail(path, "not a state dict of tensors")
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise _fail(path, f"its weights do not fit the {task} {network} network: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    for k, ref in reference.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise _fail(path, f"weight {k} has shape {tuple(state[k].shape)}, the {task} {network} network's is "
                              f"{tuple(ref.shape)}")
    return {k: v.to(reference[k].dtype) for k, v in state.items()}
