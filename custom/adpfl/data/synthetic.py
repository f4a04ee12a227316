"""Synthetic federated sites for the three tasks (common entry point).

``generate_site`` writes one site's images, labels and MONAI-style ``datalist.json`` under
``<data_root>/<site_name>/``; ``ensure_site_data`` does so only when needed.  The image
generators and their per-site domain-shift tables live in ``synthetic_skin`` (skin2d),
``synthetic_kidney`` (kidney3d) and ``synthetic_brain`` (brain3d).

Site folder layout::

    <data_root>/<site_name>/datalist.json
    <data_root>/<site_name>/images/<case>.png | <case>.nii.gz | <case>_{t1n,t1c,t2w,t2f}.nii.gz
    <data_root>/<site_name>/labels/<case>.png | <case>.nii.gz

``<case>`` is ``<site_name>_<i:04d>``; training cases come first, then validation cases.
Paths in the datalist are relative to the site folder.

Repeatability: case ``i`` is drawn from ``numpy.random.default_rng([seed, task_code,
site_index, i])``, so the same (task, site, seed, size) gives byte-identical files (PNG and
gzip headers carry no timestamps), independent of how many cases are requested.

Atomicity: a site is written to a hidden temporary folder ``<data_root>/.<site>.tmp-*`` and
renamed into place; the previous folder (if any) is first renamed aside and then deleted.
``ensure_site_data`` additionally holds an exclusive ``fcntl`` lock on
``<data_root>/.<site>.lock`` (where available) so that even two processes asking for the
SAME site do not race; different sites never contend.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from adpfl._io import write_json_atomic

from .common import BRAIN_MODALITIES, check_task, normalize_size, site_index
from .errors import DataError
from .synthetic_brain import brain_domain_shift, make_brain_case
from .synthetic_kidney import kidney_domain_shift, make_kidney_case
from .synthetic_skin import make_skin_case, skin_domain_shift

GENERATOR = "adpfl.data.synthetic"
#: bump when the generators change so that ensure_site_data regenerates stale sites
GENERATOR_VERSION = 1
#: default (num_train, num_val) per task
DEFAULT_COUNTS = {"skin2d": (40, 20), "kidney3d": (8, 4), "brain3d": (8, 4)}
#: field of view in mm used to derive the NIfTI voxel spacing (fov / min(size))
_FOV_MM = {"kidney3d": 320.0, "brain3d": 160.0}
_TASK_CODE = {"skin2d": 1, "kidney3d": 2, "brain3d": 3}


def domain_shift(task: str, site_name: str) -> dict:
    """Per-site acquisition/domain-shift parameters used by the generator of ``task``."""
    idx = site_index(site_name)
    return {"skin2d": skin_domain_shift, "kidney3d": kidney_domain_shift,
            "brain3d": brain_domain_shift}[check_task(task)](idx)


def _counts(task: str, num_train, num_val) -> tuple[int, int]:
    d_train, d_val = DEFAULT_COUNTS[task]
    n_train = d_train if num_train is None else int(num_train)
    n_val = d_val if num_val is None else int(num_val)
    if n_train < 1:
        raise DataError(f"num_train must be >= 1 (got {num_train!r})")
    if n_val < 0:
        raise DataError(f"num_val must be >= 0 (got {num_val!r})")
    return n_train, n_val


def _expected_meta(task, site_name, n_train, n_val, shape, seed) -> dict:
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "task": task,
        "site": site_name,
        "site_index": site_index(site_name),
        "seed": int(seed),
        "size": list(shape),
        "num_train": n_train,
        "num_val": n_val,
    }


def _save_nifti(arr: np.ndarray, path: Path, spacing: float) -> None:
    import nibabel as nib

    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -0.5 * spacing * (np.asarray(arr.shape[:3]) - 1)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(str(path), compress_level=1)


def _write_site(task, folder: Path, site_name, n_train, n_val, shape, seed) -> dict:
    """Generate all cases into ``folder`` (which must exist) and write its datalist."""
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    shift = domain_shift(task, site_name)
    idx = site_index(site_name)
    spacing = _FOV_MM.get(task, 0.0) / min(shape) if task != "skin2d" else None
    entries, case_meta = [], {}
    for i in range(n_train + n_val):
        rng = np.random.default_rng([int(seed), _TASK_CODE[task], idx, i])
        cid = f"{site_name}_{i:04d}"
        if task == "skin2d":
            img, lab = make_skin_case(rng, shape, shift)
            image_rel, label_rel = f"images/{cid}.png", f"labels/{cid}.png"
            _save_png(img, folder / image_rel)
            _save_png(lab, folder / label_rel)
            info = {"lesion_fraction": round(float((lab > 0).mean()), 4)}
        elif task == "kidney3d":
            img, lab, info = make_kidney_case(rng, shape, shift)
            image_rel, label_rel = f"images/{cid}.nii.gz", f"labels/{cid}.nii.gz"
            _save_nifti(img, folder / image_rel, spacing)
            _save_nifti(lab, folder / label_rel, spacing)
        else:
            img, lab, info = make_brain_case(rng, shape, shift)
            image_rel = [f"images/{cid}_{m}.nii.gz" for m in BRAIN_MODALITIES]
            label_rel = f"labels/{cid}.nii.gz"
            for ch, rel in enumerate(image_rel):
                _save_nifti(img[ch], folder / rel, spacing)
            _save_nifti(lab, folder / label_rel, spacing)
        entries.append({"id": cid, "image": image_rel, "label": label_rel})
        case_meta[cid] = info
    meta = _expected_meta(task, site_name, n_train, n_val, shape, seed)
    meta["domain_shift"] = shift
    if spacing is not None:
        meta["spacing_mm"] = [round(spacing, 6)] * 3
    meta["cases"] = case_meta
    datalist = {
        "task": task,
        "site": site_name,
        "training": entries[:n_train],
        "validation": entries[n_train:],
        "meta": meta,
    }
    write_json_atomic(folder / "datalist.json", datalist)
    return datalist


def _install(tmp: Path, target: Path) -> None:
    """Atomically move the freshly generated ``tmp`` folder to ``target``."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generate_site(
    task: str,
    data_root,
    site_name: str,
    num_train: int | None = None,
    num_val: int | None = None,
    size=None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate a synthetic site and return the path of its ``datalist.json``.

    ``size``: int or tuple (H, W) for skin2d (default 128) / (X, Y, Z) for 3D (default 64).
    ``num_train``/``num_val`` default to ``DEFAULT_COUNTS[task]``.  Raises ``DataError`` if
    the site folder already exists and ``overwrite`` is False.
    """
    check_task(task)
    if data_root is None or str(data_root) == "":
        raise DataError("setting data_root is empty: cannot generate synthetic data")
    if not site_name or "/" in site_name or "\\" in site_name or site_name.startswith("."):
        raise DataError(f"invalid site name {site_name!r}")
    shape = normalize_size(task, size)
    n_train, n_val = _counts(task, num_train, num_val)
    root = Path(data_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    target = root / site_name
    if target.exists() and not overwrite:
        raise DataError(
            f"site folder {target} already exists; pass overwrite=True (or use ensure_site_data)"
        )
    tmp = root / f".{site_name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_site(task, tmp, site_name, n_train, n_val, shape, seed)
        (tmp / SYNTHETIC_MARKER).write_text("written by adpfl's synthetic generator; safe to regenerate\n")
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "datalist.json"


@contextmanager
def _site_lock(root: Path, site_name: str):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / f".{site_name}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _site_is_current(datalist_path: Path, expected: dict) -> bool:
    try:
        with open(datalist_path, encoding="utf-8") as f:
            dl = json.load(f)
        meta = dl.get("meta", {})
    except (OSError, ValueError, AttributeError):
        return False
    if any(meta.get(k) != v for k, v in expected.items()):
        return False
    base = datalist_path.parent
    for key in ("training", "validation"):
        for e in dl.get(key, []):
            imgs = e["image"] if isinstance(e["image"], list) else [e["image"]]
            for p in [*imgs, e["label"]]:
                if not (base / p).is_file():
                    return False
    return True


def ensure_site_data(task: str, data_root, site_name: str, **kw) -> Path:
    """Return the datalist path of a synthetic site, (re)generating it only when its datalist
    is missing, unreadable, has a different meta (generator version, task, site, size,
    num_train, num_val, seed) or references missing files.

    Keyword arguments are those of :func:`generate_site` (``overwrite`` is ignored).
    """
    check_task(task)
    kw.pop("overwrite", None)
    if data_root is None or str(data_root) == "":
        raise DataError("setting data_root is empty: cannot generate synthetic data")
    shape = normalize_size(task, kw.get("size"))
    n_train, n_val = _counts(task, kw.get("num_train"), kw.get("num_val"))
    expected = _expected_meta(task, site_name, n_train, n_val, shape, kw.get("seed", 0))
    root = Path(data_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    datalist_path = root / site_name / "datalist.json"
    if _site_is_current(datalist_path, expected):
        return datalist_path
    with _site_lock(root, site_name):
        if _site_is_current(datalist_path, expected):  # another process made it meanwhile
            return datalist_path
        _refuse_to_replace_foreign_site(root / site_name)
        return generate_site(task, root, site_name, overwrite=True, **kw)


SYNTHETIC_MARKER = ".adpfl_synthetic"


def _refuse_to_replace_foreign_site(folder: Path) -> None:
    """Never overwrite a site folder this generator did not write (e.g. prepared real data):
    only folders carrying the generator's marker file are regenerated."""
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not (folder / SYNTHETIC_MARKER).is_file():
        raise DataError(
            f"{folder} holds data that adpfl's synthetic generator did not write (real data?); refusing to "
            "replace it. Set the executor's synthetic=false to train on it, or choose another data_root."
        )
