"""Loading and validating a site's MONAI-style datalist.

``load_site_datalist`` reads ``<data_root>/<site_name>/datalist.json`` and returns it with
absolute paths; every problem raises :class:`DataError` naming the setting, file or site.

``check_pair`` inspects one (image, label) case cheaply: image files are opened for their
header only (NIfTI header / PNG-JPEG header), the label is read in full because its values
must be checked.  ``deep=True`` also decodes the image data (catches truncated files).

Empty masks (all background) are allowed: they emit a :class:`DataWarning` and are reported
with ``"empty": True``.  This is normal for e.g. healthy 3D cases, but ``validate_site``
raises if *every* training mask of a site is empty (nothing to learn).  A kidney3d case
without tumour (labels {0, 1} only) or a brain3d case without NETC is not even a warning.

Allowed label values: skin2d {0, 255} (a {0, 1} mask is also accepted), kidney3d {0, 1, 2, 3},
brain3d {0, 1, 2, 3, 4} (BraTS 2024 GLI: 4 is the resection cavity).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from adpfl.tasks.base import TASK_NAMES

from .common import check_task, task_facts
from .errors import DataError, DataWarning

_NIFTI_EXT = (".nii", ".nii.gz")


def _allowed_text(task: str) -> str:
    sets = task_facts(task).mask_value_sets
    return " or ".join(str(sorted(s)) for s in sets) if sets else str(list(task_facts(task).label_values))


def _is_nifti(path: str) -> bool:
    return str(path).lower().endswith(_NIFTI_EXT)


def _as_list(image) -> list[str]:
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


# --------------------------------------------------------------------------------------------
# datalist loading
# --------------------------------------------------------------------------------------------
def datalist_path(data_root, site_name: str) -> Path:
    return Path(data_root).expanduser() / site_name / "datalist.json"


def load_site_datalist(data_root, site_name: str, task: str | None = None) -> dict:
    """Load ``<data_root>/<site_name>/datalist.json``; return it with absolute paths.

    Returned dict: ``task``, ``site``, ``training``, ``validation`` (lists of entries whose
    ``image`` (str, or list of 4 str for brain3d) and ``label`` are absolute), ``meta``,
    ``datalist_path`` and ``base_dir``.  Raises :class:`DataError` for: missing/unset data
    root, missing datalist, corrupt JSON, wrong structure, wrong task, entries pointing at
    missing files, an empty training list.
    """
    if data_root is None or str(data_root).strip() == "":
        raise DataError("setting data_root is not set (empty); point it at the folder holding "
                        "one sub-folder per site")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data_root does not exist or is not a folder: {root} "
                        f"(check the data_root setting)")
    if task is not None:
        check_task(task)
    path = root / site_name / "datalist.json"
    if not path.is_file():
        hint = "" if (root / site_name).is_dir() else f" (no folder for site {site_name!r} either)"
        raise DataError(f"datalist missing for site {site_name!r}: {path}{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"datalist {path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read datalist {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"datalist {path} must contain a JSON object, got {type(raw).__name__}")

    dl_task = raw.get("task", task)
    if dl_task is None:
        raise DataError(f"datalist {path} has no 'task' and no task was given")
    if dl_task not in TASK_NAMES:
        raise DataError(f"datalist {path} has unknown task {dl_task!r}; expected one of "
                        f"{', '.join(TASK_NAMES)}")
    if task is not None and dl_task != task:
        raise DataError(f"datalist {path} is for task {dl_task!r} but task {task!r} was "
                        f"requested for site {site_name!r}")
    base = path.parent.resolve()
    out = {
        "task": dl_task,
        "site": raw.get("site", site_name),
        "meta": raw.get("meta", {}),
        "datalist_path": str(path.resolve()),
        "base_dir": str(base),
    }
    for key in ("training", "validation"):
        items = raw.get(key, [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise DataError(f"datalist {path}: '{key}' must be a list of entries")
        out[key] = [_resolve_entry(e, i, key, dl_task, base, path) for i, e in enumerate(items)]
    if not out["training"]:
        raise DataError(f"site {site_name!r} has no training cases (empty 'training' list in "
                        f"{path}); a zero-size site cannot take part")
    if not out["validation"]:
        warnings.warn(f"site {site_name!r}: no validation cases in {path}", DataWarning,
                      stacklevel=2)
    return out


def _resolve_entry(entry, i: int, key: str, task: str, base: Path, path: Path) -> dict:
    where = f"datalist {path}, {key}[{i}]"
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DataError(f"{where}: each entry needs 'image' and 'label' keys, got {entry!r}")
    image = entry["image"]
    n_files = task_facts(task).num_image_files
    if n_files == 1:
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if not isinstance(image, str):
            raise DataError(f"{where}: task {task!r} expects one image path, got {image!r}")
    else:
        if not isinstance(image, list) or len(image) != n_files or \
                not all(isinstance(p, str) for p in image):
            raise DataError(f"{where}: task {task!r} expects 'image' to be a list of {n_files} "
                            f"paths (T1n, T1c, T2w, T2-FLAIR), got {image!r}")
    if not isinstance(entry["label"], str):
        raise DataError(f"{where}: 'label' must be a path string, got {entry['label']!r}")
    res = dict(entry)
    imgs = [str((base / p).resolve()) if not os.path.isabs(p) else p for p in _as_list(image)]
    lab = entry["label"]
    lab = str((base / lab).resolve()) if not os.path.isabs(lab) else lab
    for p in [*imgs, lab]:
        if not os.path.isfile(p):
            raise DataError(f"file {p} listed in {where} does not exist")
    res["image"] = imgs if n_files > 1 else imgs[0]
    res["label"] = lab
    return res


# --------------------------------------------------------------------------------------------
# per-case checks
# --------------------------------------------------------------------------------------------
def _nifti_header(path: str):
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, ...)
        raise DataError(f"cannot read NIfTI file {path}: {exc}") from exc
    return img, shape


def _nifti_spatial(path: str, shape: tuple, role: str) -> tuple[tuple, int]:
    """Return (spatial shape, channels) of a NIfTI image; trailing singleton dims are dropped."""
    s = list(shape)
    while len(s) > 3 and s[-1] == 1:
        s.pop()
    if len(s) == 3:
        return tuple(s), 1
    if len(s) == 4:
        return tuple(s[:3]), s[3]
    raise DataError(f"{role} {path} has shape {shape}; expected a 3D volume")


def _read_label(path: str, task: str) -> tuple[np.ndarray, tuple]:
    if _is_nifti(path):
        img, shape = _nifti_header(path)
        try:
            data = np.asanyarray(img.dataobj)
        except Exception as exc:
            raise DataError(f"cannot read data of label file {path}: {exc}") from exc
        sp, ch = _nifti_spatial(path, shape, "label")
        if ch != 1:
            raise DataError(f"label {path} has {ch} channels (shape {shape}); expected a "
                            f"single-channel mask")
        return data.reshape(sp), sp
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            data = np.asarray(im)
    except Exception as exc:
        raise DataError(f"cannot read label image {path}: {exc}") from exc
    if data.ndim != 2:
        raise DataError(f"label {path} has mode {mode} with {data.shape[-1]} channels; "
                        f"expected a single-channel (grey) mask")
    return data, tuple(data.shape)


def _image_2d_header(path: str) -> tuple[tuple, int, object]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            bands = len(im.getbands())
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return (size[1], size[0]), bands, mode


def check_pair(image, label, task: str | None = None, deep: bool = False) -> dict:
    """Check one case: readable files, channel count, matching spatial shapes, label values.

    ``image``: a path, or a list of 4 paths for brain3d.  ``task`` is inferred when None
    (4 images -> brain3d, NIfTI -> kidney3d, else skin2d).  Returns ``{"shape", "channels",
    "labels" (sorted values), "empty"}``; raises :class:`DataError` naming the file(s).
    """
    images = _as_list(image)
    label = str(label)
    if task is None:
        task = "brain3d" if len(images) == 4 else ("kidney3d" if _is_nifti(images[0]) else "skin2d")
    check_task(task)
    for p in [*images, label]:
        if not os.path.isfile(p):
            raise DataError(f"file {p} does not exist")
    n_files = task_facts(task).num_image_files
    if len(images) != n_files:
        raise DataError(f"task {task!r} expects {n_files} image file(s) per case, got "
                        f"{len(images)}: {images}")

    if task == "skin2d":
        shape, channels, mode = _image_2d_header(images[0])
        if channels != 3 or mode not in ("RGB", "YCbCr"):
            raise DataError(f"image {images[0]} has mode {mode} ({channels} channels); skin2d "
                            f"expects an RGB image")
        if deep:
            _decode_2d(images[0])
    else:
        shape, channels = None, 0
        for p in images:
            if not _is_nifti(p):
                raise DataError(f"image {p} is not a NIfTI file (.nii/.nii.gz)")
            img, full = _nifti_header(p)
            sp, ch = _nifti_spatial(p, full, "image")
            if task == "brain3d" and ch != 1:
                raise DataError(f"image {p} has {ch} channels (shape {full}); brain3d expects one "
                                f"single-channel file per modality")
            if shape is not None and sp != shape:
                raise DataError(f"modalities of one case differ in shape: {images[0]} has "
                                f"{shape}, {p} has {sp}")
            shape = sp
            channels += ch
            if deep:
                try:
                    np.asanyarray(img.dataobj)
                except Exception as exc:
                    raise DataError(f"cannot read data of image {p}: {exc}") from exc
        if channels != (4 if task == "brain3d" else 1):
            raise DataError(f"image {images[0]} has {channels} channels; {task} expects "
                            f"{4 if task == 'brain3d' else 1}")

    data, lshape = _read_label(label, task)
    if tuple(lshape) != tuple(shape):
        raise DataError(f"shape mismatch: image {images[0]} has spatial shape {tuple(shape)} "
                        f"but label {label} has {tuple(lshape)}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise DataError(f"label {label} contains non-integer values; expected class indices")
    values = np.unique(data)
    bad = task_facts(task).check_mask_values(values)
    if bad:
        msg = (f"label {label} contains unknown values {bad} for task {task!r} "
               f"(allowed: {_allowed_text(task)})")
        if task == "brain3d":
            msg += "; brain3d expects BraTS 2024 GLI numbering (1 NETC, 2 SNFH, 3 ET, 4 RC)"
        if task == "skin2d":
            msg += "; masks must be binary 0/255 PNG (lossless, not JPEG)"
        raise DataError(msg)
    if task == "brain3d" and 4 in values and 3 not in values:
        warnings.warn(f"label {label} has value 4 (BraTS 2024: resection cavity) but no 3 (enhancing tumour): "
                      "if it uses the pre-2023 BraTS numbering (4 = enhancing tumour), remap 4 -> 3, or ET is "
                      "scored empty and RC is trained on tumour", DataWarning, stacklevel=2)
    empty = bool(values.size == 1 and int(values[0]) == 0)
    if empty:
        warnings.warn(f"label {label} is empty (background only)", DataWarning, stacklevel=2)
    return {"shape": tuple(shape), "channels": channels, "labels": [int(v) for v in values],
            "empty": empty}


def _decode_2d(path: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def validate_site(datalist: dict, deep: bool = False, max_errors: int = 20) -> dict:
    """Run :func:`check_pair` over all entries of a loaded datalist (from
    :func:`load_site_datalist`).  Collects every problem and raises one :class:`DataError`
    listing them (up to ``max_errors``); also raises when all training masks are empty.

    Returns a summary ``{"site", "task", "num_training", "num_validation", "shapes",
    "label_counts" (cases containing each value), "empty_masks"}``.
    """
    task = datalist["task"]
    site = datalist.get("site", "?")
    errors, shapes, counts, empty = [], set(), {}, []
    empty_train = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for key in ("training", "validation"):
            for e in datalist.get(key, []):
                try:
                    info = check_pair(e["image"], e["label"], task=task, deep=deep)
                except DataError as exc:
                    errors.append(str(exc))
                    continue
                shapes.add(info["shape"])
                for v in info["labels"]:
                    counts[v] = counts.get(v, 0) + 1
                if info["empty"]:
                    empty.append(e["label"])
                    empty_train += key == "training"
    if errors:
        shown = "\n  ".join(errors[:max_errors])
        more = f"\n  ... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise DataError(f"site {site!r} ({datalist.get('datalist_path', '')}): "
                        f"{len(errors)} invalid case(s):\n  {shown}{more}")
    n_train = len(datalist.get("training", []))
    if n_train and empty_train == n_train:
        raise DataError(f"site {site!r}: all {n_train} training masks are empty (background "
                        f"only) in {datalist.get('datalist_path', '')}")
    if empty:
        warnings.warn(f"site {site!r}: {len(empty)} empty mask(s), e.g. {empty[0]}",
                      DataWarning, stacklevel=2)
    return {
        "site": site,
        "task": task,
        "num_training": n_train,
        "num_validation": len(datalist.get("validation", [])),
        "shapes": sorted(shapes),
        "label_counts": dict(sorted(counts.items())),
        "empty_masks": empty,
    }
