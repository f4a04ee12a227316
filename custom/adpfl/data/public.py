"""Adapters for the public datasets: read their own folder layouts, split the cases into N
federated sites and write one MONAI-style datalist per site.  Images are never copied: the
datalists point at the original files (relative to the datalist folder when possible, else
absolute).

Supported layouts
-----------------
* ``skin2d`` — ISIC 2018 Task 1 / HAM10000: a folder of ``ISIC_<digits>.jpg`` images (e.g.
  ``ISIC2018_Task1-2_Training_Input/`` or ``HAM10000_images_part_1/`` + ``..._part_2/``) and
  a folder of ``ISIC_<digits>_segmentation.png`` masks (e.g.
  ``ISIC2018_Task1_Training_GroundTruth/``).  Pass ``images_dir``/``masks_dir`` or let them be
  found (up to 3 levels) under ``source_root``.  Optional ``HAM10000_metadata.csv`` (columns
  lesion_id, image_id, dx, dx_type, age, sex, localization, dataset) enables column splits,
  e.g. by ``dataset`` (acquisition source) or ``localization``; auto-detected under the root.
* ``kidney3d`` — KiTS23: ``<root>/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``
  (``<root>/dataset/`` of the kits23 repository is also found).
* ``brain3d`` — BraTS 2024 GLI: ``<root>/BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-{t1n,t1c,t2w,
  t2f,seg}.nii.gz`` (case folders may also sit one level below ``<root>``).  Labels must use
  BraTS 2024 GLI numbering (1 NETC, 2 SNFH, 3 ET, 4 RC = resection cavity); other values are
  rejected when ``validate=True``.

Split schemes (``split_sites``)
-------------------------------
* ``iid``: shuffle (seeded) and deal the cases round-robin.
* ``column``: group cases by a metadata column; whole groups go to sites, largest group first
  to the currently smallest site (needs at least ``num_sites`` distinct values).
* ``skewed``: with ``column``, a Dirichlet(``alpha``) share of each group goes to each site
  (label/attribute skew); without, site sizes follow Dirichlet(``alpha``) (quantity skew).
  Every site keeps at least one case (two when ``val_fraction`` > 0 and cases allow).

Each site's cases are split into training/validation with ``val_fraction`` (at least one
validation case when ``val_fraction`` > 0 and the site has >= 2 cases, at least one training
case always).
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from adpfl._io import write_json_atomic

from .common import BRAIN_MODALITIES, check_task, rel_or_abs, site_index
from .errors import DataError, DataWarning

_ISIC_IMG = re.compile(r"^(ISIC_\d+)\.(jpe?g|png)$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d+)_segmentation\.png$", re.IGNORECASE)
_KITS_CASE = re.compile(r"^case_\d{5}$")
_BRATS_CASE = re.compile(r"^BraTS-[A-Z]+-\d{5}-\d{3}$")
_OLD_BRATS = re.compile(r"^BraTS(20)?\d{2}_")
SOURCE_NAMES = {"skin2d": "isic2018", "kidney3d": "kits23", "brain3d": "brats2024"}


def _roots(source_root) -> list[Path]:
    if source_root is None:
        return []
    items = source_root if isinstance(source_root, (list, tuple)) else [source_root]
    out = []
    for r in items:
        p = Path(r).expanduser()
        if not p.is_dir():
            raise DataError(f"source_root does not exist or is not a folder: {p}")
        out.append(p)
    return out


def _walk_dirs(root: Path, max_depth: int = 3) -> Iterable[Path]:
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        yield d
        if depth < max_depth:
            try:
                subs = sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")),
                              reverse=True)
            except OSError:
                continue
            stack.extend((s, depth + 1) for s in subs)


def _add_case(cases: dict, cid: str, case: dict, where: str) -> None:
    if cid in cases:
        raise DataError(f"duplicate case id {cid!r}: found in {cases[cid]['_where']} and {where}")
    case["_where"] = where
    cases[cid] = case


# --------------------------------------------------------------------------------------------
# ISIC 2018 / HAM10000
# --------------------------------------------------------------------------------------------
def _dirs_arg(d) -> list[Path]:
    if d is None:
        return []
    items = d if isinstance(d, (list, tuple)) else [d]
    out = []
    for x in items:
        p = Path(x).expanduser()
        if not p.is_dir():
            raise DataError(f"folder does not exist: {p}")
        out.append(p)
    return out


def find_isic_cases(source_root=None, images_dir=None, masks_dir=None,
                    metadata_csv=None) -> list[dict]:
    """Cases ``{"id", "image", "label", "meta"}`` of an ISIC 2018 Task 1 / HAM10000 layout."""
    roots = _roots(source_root)
    img_dirs, mask_dirs = _dirs_arg(images_dir), _dirs_arg(masks_dir)
    if not img_dirs or not mask_dirs:
        if not roots:
            raise DataError("skin2d: give source_root or both images_dir and masks_dir")
        found_img, found_mask = [], []
        for r in roots:
            for d in _walk_dirs(r):
                names = os.listdir(d)
                if any(_ISIC_IMG.match(n) for n in names):
                    found_img.append(d)
                if any(_ISIC_MASK.match(n) for n in names):
                    found_mask.append(d)
        img_dirs = img_dirs or found_img
        mask_dirs = mask_dirs or found_mask
    where = ", ".join(str(r) for r in roots) or ", ".join(str(d) for d in img_dirs + mask_dirs)
    if not img_dirs:
        raise DataError(f"skin2d: no images named ISIC_<digits>.jpg found under {where}; expected "
                        f"the ISIC 2018 layout ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg "
                        f"(or HAM10000_images_part_*/)")
    if not mask_dirs:
        raise DataError(f"skin2d: no masks named ISIC_<digits>_segmentation.png found under "
                        f"{where}; expected ISIC2018_Task1_Training_GroundTruth/"
                        f"ISIC_0000000_segmentation.png")
    images: dict[str, Path] = {}
    for d in img_dirs:
        for n in sorted(os.listdir(d)):
            m = _ISIC_IMG.match(n)
            if m:
                if m.group(1) in images:
                    raise DataError(f"duplicate case id {m.group(1)!r}: {images[m.group(1)]} and "
                                    f"{d / n}")
                images[m.group(1)] = d / n
    masks: dict[str, Path] = {}
    for d in mask_dirs:
        for n in sorted(os.listdir(d)):
            m = _ISIC_MASK.match(n)
            if m:
                if m.group(1) in masks:
                    raise DataError(f"duplicate mask for case {m.group(1)!r}: "
                                    f"{masks[m.group(1)]} and {d / n}")
                masks[m.group(1)] = d / n
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DataError(f"case {no_mask[0]}: missing segmentation {no_mask[0]}_segmentation.png "
                        f"in {', '.join(map(str, mask_dirs))}"
                        + (f" ({len(no_mask)} images without mask)" if len(no_mask) > 1 else ""))
    no_img = sorted(set(masks) - set(images))
    if no_img:
        raise DataError(f"case {no_img[0]}: mask {masks[no_img[0]]} has no image "
                        f"{no_img[0]}.jpg in {', '.join(map(str, img_dirs))}"
                        + (f" ({len(no_img)} masks without image)" if len(no_img) > 1 else ""))
    meta = {}
    if metadata_csv is None:
        for r in roots:
            cand = sorted(r.rglob("HAM10000_metadata.csv"))
            if cand:
                metadata_csv = cand[0]
                break
    if metadata_csv is not None:
        meta = read_metadata_csv(metadata_csv, id_column="image_id")
    return [{"id": cid, "image": str(images[cid]), "label": str(masks[cid]),
             "meta": meta.get(cid, {})} for cid in sorted(images)]


def read_metadata_csv(path, id_column: str = "image_id") -> dict[str, dict]:
    """Read a metadata CSV (e.g. HAM10000_metadata.csv) into ``{id: row}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metadata CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or id_column not in reader.fieldnames:
                raise DataError(f"metadata CSV {path} has no {id_column!r} column "
                                f"(columns: {reader.fieldnames})")
            rows = {}
            for row in reader:
                rid = row[id_column]
                if rid in rows:
                    raise DataError(f"metadata CSV {path}: duplicate {id_column} {rid!r}")
                rows[rid] = dict(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read metadata CSV {path}: {exc}") from exc
    return rows


# --------------------------------------------------------------------------------------------
# KiTS23
# --------------------------------------------------------------------------------------------
def _case_dirs(root: Path, pattern: re.Pattern) -> list[Path]:
    dirs = [p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)]
    if not dirs:  # one level down (e.g. kits23/dataset/, BraTS .../training_data/)
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            dirs.extend(p for p in sub.iterdir() if p.is_dir() and pattern.match(p.name))
    return sorted(dirs, key=lambda p: p.name)


def find_kits_cases(source_root) -> list[dict]:
    """Cases of a KiTS23 layout ``<root>/case_XXXXX/{imaging,segmentation}.nii.gz``."""
    cases: dict[str, dict] = {}
    roots = _roots(source_root)
    if not roots:
        raise DataError("kidney3d: source_root is not set")
    for r in roots:
        for d in _case_dirs(r, _KITS_CASE):
            img, seg = d / "imaging.nii.gz", d / "segmentation.nii.gz"
            for f in (img, seg):
                if not f.is_file():
                    raise DataError(f"case {d.name}: missing {f.name} (expected {f})")
            _add_case(cases, d.name, {"id": d.name, "image": str(img), "label": str(seg),
                                      "meta": {}}, str(d))
    if not cases:
        raise DataError(f"kidney3d: no KiTS23 case folders found under "
                        f"{', '.join(map(str, roots))}; expected <root>/case_00000/imaging.nii.gz "
                        f"and segmentation.nii.gz")
    return [_strip(c) for c in cases.values()]


# --------------------------------------------------------------------------------------------
# BraTS 2024 GLI
# --------------------------------------------------------------------------------------------
def find_brats_cases(source_root) -> list[dict]:
    """Cases of a BraTS 2024 layout ``<root>/BraTS-GLI-XXXXX-XXX/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz``;
    ``image`` is the list [t1n, t1c, t2w, t2f]."""
    cases: dict[str, dict] = {}
    roots = _roots(source_root)
    if not roots:
        raise DataError("brain3d: source_root is not set")
    for r in roots:
        for d in _case_dirs(r, _BRATS_CASE):
            files = {m: d / f"{d.name}-{m}.nii.gz" for m in (*BRAIN_MODALITIES, "seg")}
            missing = [f.name for f in files.values() if not f.is_file()]
            if missing:
                raise DataError(f"case {d.name}: missing {', '.join(missing)} in {d}")
            _add_case(cases, d.name, {
                "id": d.name,
                "image": [str(files[m]) for m in BRAIN_MODALITIES],
                "label": str(files["seg"]),
                "meta": {"cohort": d.name.split("-")[1]},
            }, str(d))
    if not cases:
        old = [p.name for r in roots for p in r.iterdir() if _OLD_BRATS.match(p.name)]
        hint = (f"; found older BraTS folders such as {old[0]!r} (pre-2023 releases, whose label 4 "
                f"is enhancing tumour, not the 2024 resection cavity): this adapter reads the "
                f"BraTS 2024 GLI release"
                if old else "")
        raise DataError(f"brain3d: no BraTS 2024 case folders found under "
                        f"{', '.join(map(str, roots))}; expected <root>/BraTS-GLI-00000-000/"
                        f"BraTS-GLI-00000-000-{{t1n,t1c,t2w,t2f,seg}}.nii.gz{hint}")
    return [_strip(c) for c in cases.values()]


def _strip(case: dict) -> dict:
    return {k: v for k, v in case.items() if not k.startswith("_")}


def find_cases(task: str, source_root=None, **kw) -> list[dict]:
    check_task(task)
    if task == "skin2d":
        return find_isic_cases(source_root, kw.get("images_dir"), kw.get("masks_dir"),
                               kw.get("metadata_csv"))
    if task == "kidney3d":
        return find_kits_cases(source_root)
    return find_brats_cases(source_root)


# --------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------
def _group_of(case: dict, column: str, metadata) -> str:
    row = metadata.get(case["id"]) if metadata is not None else case.get("meta")
    if not row or column not in row or row[column] in (None, ""):
        return "unknown"
    return str(row[column])


def _rebalance_min(assign: list[list], min_size: int) -> None:
    """Move cases from the largest site to any site smaller than ``min_size``."""
    for s in range(len(assign)):
        while len(assign[s]) < min_size:
            donor = max(range(len(assign)), key=lambda i: len(assign[i]))
            if len(assign[donor]) <= min_size:
                return
            assign[s].append(assign[donor].pop())


def split_sites(
    cases: Sequence[dict],
    num_sites: int,
    scheme: str = "iid",
    seed: int = 0,
    val_fraction: float = 0.2,
    column: str | None = None,
    metadata: dict | None = None,
    alpha: float = 0.5,
) -> list[dict]:
    """Split ``cases`` (dicts with a unique ``"id"``) into ``num_sites`` sites.

    Returns one dict per site: ``{"training": [...], "validation": [...], "groups": {value:
    count}}`` (``groups`` only filled when a column is used).  ``metadata`` maps id -> row
    (dict); when None each case's own ``"meta"`` dict is used.  Cases lacking the column go to
    group ``"unknown"`` (with a warning).
    """
    cases = list(cases)
    if not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise DataError(f"num_sites must be a positive integer (got {num_sites!r})")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in [0, 1) (got {val_fraction!r})")
    if scheme not in ("iid", "column", "skewed"):
        raise DataError(f"unknown split scheme {scheme!r}; use 'iid', 'column' or 'skewed'")
    ids = [c["id"] for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"duplicate case ids: {dup[:5]}")
    if num_sites > len(cases):
        raise DataError(f"num_sites={num_sites} is larger than the number of cases "
                        f"({len(cases)}); every site needs at least one case")
    rng = np.random.default_rng(seed)
    cases.sort(key=lambda c: c["id"])
    min_size = 2 if val_fraction > 0 and len(cases) >= 2 * num_sites else 1
    groups = None
    if scheme in ("column",) or (scheme == "skewed" and column):
        if not column:
            raise DataError("scheme 'column' needs column=<metadata column name>")
        groups = {}
        for c in cases:
            groups.setdefault(_group_of(c, column, metadata), []).append(c)
        if "unknown" in groups:
            warnings.warn(f"{len(groups['unknown'])} case(s) have no value for column {column!r}"
                          f" (e.g. {groups['unknown'][0]['id']}); grouped as 'unknown'",
                          DataWarning, stacklevel=2)
        if len(groups) == 1 and "unknown" in groups:
            raise DataError(f"column {column!r} not found in the metadata of any case")

    assign: list[list] = [[] for _ in range(num_sites)]
    if scheme == "iid":
        order = rng.permutation(len(cases))
        for k, i in enumerate(order):
            assign[k % num_sites].append(cases[i])
    elif scheme == "column":
        if len(groups) < num_sites:
            raise DataError(f"column {column!r} has only {len(groups)} distinct value(s) "
                            f"({sorted(groups)}) for {num_sites} sites; use fewer sites or "
                            f"scheme='skewed'")
        for value in sorted(groups, key=lambda g: (-len(groups[g]), g)):
            s = min(range(num_sites), key=lambda i: (len(assign[i]), i))
            assign[s].extend(groups[value])
    else:  # skewed
        if groups is not None:
            for value in sorted(groups):
                members = [groups[value][i] for i in rng.permutation(len(groups[value]))]
                p = rng.dirichlet(np.full(num_sites, alpha))
                cuts = np.round(np.cumsum(p) * len(members)).astype(int)
                start = 0
                for s, end in enumerate(cuts):
                    assign[s].extend(members[start:end])
                    start = end
        else:
            order = [cases[i] for i in rng.permutation(len(cases))]
            p = rng.dirichlet(np.full(num_sites, alpha))
            spare = len(cases) - min_size * num_sites
            sizes = min_size + np.floor(p * spare).astype(int)
            sizes[np.argmax(p)] += len(cases) - int(sizes.sum())
            start = 0
            for s, n in enumerate(sizes):
                assign[s] = order[start:start + int(n)]
                start += int(n)
        _rebalance_min(assign, min_size)

    out = []
    for members in assign:
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, n - 1)
        val = sorted(members[:n_val], key=lambda c: c["id"])
        train = sorted(members[n_val:], key=lambda c: c["id"])
        g = {}
        if column:
            for c in members:
                v = _group_of(c, column, metadata)
                g[v] = g.get(v, 0) + 1
        out.append({"training": train, "validation": val, "groups": dict(sorted(g.items()))})
    return out


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------
def _validate_cases(task: str, cases: list[dict]) -> None:
    from .datalist import check_pair

    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for c in cases:
            try:
                check_pair(c["image"], c["label"], task=task)
            except DataError as exc:
                errors.append(f"case {c['id']}: {exc}")
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} invalid case(s):\n  " + "\n  ".join(errors[:10]) + more)


def prepare_public_dataset(
    task: str,
    source_root,
    out_root,
    num_sites: int,
    scheme: str = "iid",
    seed: int = 0,
    val_fraction: float = 0.2,
    column: str | None = None,
    metadata_csv=None,
    images_dir=None,
    masks_dir=None,
    site_names: Sequence[str] | None = None,
    validate: bool = True,
    alpha: float = 0.5,
) -> list[Path]:
    """Find the cases of a public dataset, split them and write
    ``<out_root>/<site>/datalist.json`` per site (sites ``site-1..site-N`` unless
    ``site_names``).  Returns the datalist paths.

    ``validate=True`` runs :func:`adpfl.data.datalist.check_pair` on every case first (reads
    every label fully: minutes for the full KiTS23/BraTS; pass False to skip, the sites then
    validate at start-up).
    """
    check_task(task)
    cases = find_cases(task, source_root, images_dir=images_dir, masks_dir=masks_dir,
                       metadata_csv=metadata_csv)
    if site_names is None:
        site_names = [f"site-{i + 1}" for i in range(num_sites)]
    elif len(site_names) != num_sites or len(set(site_names)) != num_sites:
        raise DataError(f"site_names must be {num_sites} distinct names, got {list(site_names)}")
    if num_sites > len(cases):
        raise DataError(f"num_sites={num_sites} is larger than the number of cases found "
                        f"({len(cases)}) under {source_root}")
    if validate:
        _validate_cases(task, cases)
    splits = split_sites(cases, num_sites, scheme=scheme, seed=seed, val_fraction=val_fraction,
                         column=column, alpha=alpha)
    out_root = Path(out_root).expanduser()
    paths = []
    for name, split in zip(site_names, splits):
        site_dir = out_root / name
        site_dir.mkdir(parents=True, exist_ok=True)

        def entry(c, base=site_dir):
            img = c["image"]
            img = [rel_or_abs(p, base) for p in img] if isinstance(img, list) else rel_or_abs(img, base)
            return {"id": c["id"], "image": img, "label": rel_or_abs(c["label"], base)}

        datalist = {
            "task": task,
            "site": name,
            "training": [entry(c) for c in split["training"]],
            "validation": [entry(c) for c in split["validation"]],
            "meta": {
                "source": SOURCE_NAMES[task],
                "source_root": [str(Path(r).expanduser().resolve()) for r in
                                (source_root if isinstance(source_root, (list, tuple))
                                 else [source_root])] if source_root is not None else None,
                "scheme": scheme,
                "column": column,
                "alpha": alpha if scheme == "skewed" else None,
                "seed": int(seed),
                "val_fraction": float(val_fraction),
                "num_sites": int(num_sites),
                "site_index": site_index(name),
                "num_cases": len(split["training"]) + len(split["validation"]),
                "groups": split["groups"],
            },
        }
        path = site_dir / "datalist.json"
        write_json_atomic(path, datalist)
        paths.append(path)
    return paths
