"""Public-dataset adapters on tiny fake datasets written in the public folder layouts."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from adpfl.data import DataError, load_site_datalist, prepare_public_dataset, split_sites, validate_site
from adpfl.data.public import find_brats_cases, find_isic_cases, find_kits_cases

pytestmark = pytest.mark.filterwarnings("ignore::adpfl.data.errors.DataWarning")

SOURCES = ["vidir_modern", "vidir_molemax", "rosendahl", "vienna_dias"]


def _nii(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def make_isic(root: Path, n: int = 12, metadata: bool = True) -> Path:
    img_dir = root / "ISIC2018_Task1-2_Training_Input"
    gt_dir = root / "ISIC2018_Task1_Training_GroundTruth"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    (img_dir / "ATTRIBUTION.txt").write_text("x")
    (gt_dir / "LICENSE.txt").write_text("x")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cid = f"ISIC_{i:07d}"
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            img_dir / f"{cid}.jpg")
        m = np.zeros((12, 16), np.uint8)
        m[3:8, 4:10] = 255
        Image.fromarray(m).save(gt_dir / f"{cid}_segmentation.png")
        rows.append({"lesion_id": f"HAM_{i:07d}", "image_id": cid, "dx": "nv", "dx_type": "histo",
                     "age": "45.0", "sex": "male", "localization": ["back", "face"][i % 2],
                     "dataset": SOURCES[i % 4] if i < 10 else "vidir_modern"})
    if metadata:
        with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def make_kits(root: Path, n: int = 6, shape=(8, 9, 10)) -> Path:
    for i in range(n):
        d = root / f"case_{i:05d}"
        seg = np.zeros(shape, np.uint8)
        seg[2:5, 2:5, 2:5] = 1
        seg[3, 3, 3] = 2 if i % 2 else 3
        _nii(d / "imaging.nii.gz", np.full(shape, -100, np.int16))
        _nii(d / "segmentation.nii.gz", seg)
        (d / "instances").mkdir()
    return root


def make_brats(root: Path, n: int = 5, shape=(8, 8, 8)) -> Path:
    for i in range(n):
        cid = f"BraTS-GLI-{i:05d}-000"
        d = root / cid
        for m in ("t1n", "t1c", "t2w", "t2f"):
            _nii(d / f"{cid}-{m}.nii.gz", np.ones(shape, np.int16))
        seg = np.zeros(shape, np.uint8)
        seg[2:6, 2:6, 2:6] = 2
        seg[3:5, 3:5, 3:5] = 3
        seg[4, 4, 4] = 1
        _nii(d / f"{cid}-seg.nii.gz", seg)
    return root


# ---------------------------------------------------------------------------------------------
# split_sites
# ---------------------------------------------------------------------------------------------
def _cases(n, groups=None):
    return [{"id": f"c{i:03d}", "image": "i", "label": "l",
             "meta": {"g": groups[i % len(groups)]} if groups else {}} for i in range(n)]


def _ids(split):
    return [c["id"] for s in split for c in s["training"] + s["validation"]]


def test_split_iid_partition_and_determinism():
    cases = _cases(20)
    a = split_sites(cases, 3, "iid", seed=1, val_fraction=0.25)
    assert sorted(_ids(a)) == sorted(c["id"] for c in cases)  # partition, no duplicates
    sizes = [len(s["training"]) + len(s["validation"]) for s in a]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(s["validation"]) >= 1 and len(s["training"]) >= 1 for s in a)
    assert a == split_sites(cases, 3, "iid", seed=1, val_fraction=0.25)
    assert _ids(a) != _ids(split_sites(cases, 3, "iid", seed=2, val_fraction=0.25))


def test_split_column_keeps_groups_together():
    cases = _cases(24, groups=["a", "b", "b", "c", "d", "d"])
    split = split_sites(cases, 3, "column", column="g", val_fraction=0.2)
    assert sorted(_ids(split)) == sorted(c["id"] for c in cases)
    owners = {}
    for s, site in enumerate(split):
        for g in site["groups"]:
            owners.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in owners.values())
    with pytest.raises(DataError, match="only 4 distinct"):
        split_sites(cases, 5, "column", column="g")
    with pytest.raises(DataError, match="column 'nope'"):
        split_sites(cases, 2, "column", column="nope")


def test_split_skewed():
    cases = _cases(60, groups=["x", "y", "z"])
    q = split_sites(cases, 4, "skewed", seed=0, alpha=0.3)
    sizes = [len(s["training"]) + len(s["validation"]) for s in q]
    assert sum(sizes) == 60 and min(sizes) >= 2 and max(sizes) > 2 * min(sizes)
    lab = split_sites(cases, 3, "skewed", seed=0, column="g", alpha=0.3)
    assert sorted(_ids(lab)) == sorted(c["id"] for c in cases)
    assert all(len(s["training"]) >= 1 for s in lab)


@pytest.mark.parametrize("kw,msg", [
    (dict(num_sites=7), "larger than the number of cases"),
    (dict(num_sites=0), "positive integer"),
    (dict(num_sites=2, scheme="random"), "unknown split scheme"),
    (dict(num_sites=2, val_fraction=1.0), "val_fraction"),
    (dict(num_sites=2, scheme="column"), "needs column"),
])
def test_split_errors(kw, msg):
    with pytest.raises(DataError, match=msg):
        split_sites(_cases(6), **kw)


def test_split_duplicate_ids():
    cases = _cases(4) + _cases(1)
    with pytest.raises(DataError, match="duplicate case ids.*c000"):
        split_sites(cases, 2)


# ---------------------------------------------------------------------------------------------
# ISIC / HAM10000
# ---------------------------------------------------------------------------------------------
def test_isic_iid(tmp_path):
    src = make_isic(tmp_path / "isic")
    out = tmp_path / "fl"
    paths = prepare_public_dataset("skin2d", src, out, num_sites=3, scheme="iid", seed=0,
                                   val_fraction=0.25)
    assert [p.parent.name for p in paths] == ["site-1", "site-2", "site-3"]
    seen = []
    for p in paths:
        raw = json.loads(p.read_text())
        assert raw["task"] == "skin2d" and raw["meta"]["scheme"] == "iid"
        assert not os.path.isabs(raw["training"][0]["image"])  # relative paths
        dl = load_site_datalist(out, p.parent.name, "skin2d")
        validate_site(dl)
        seen += [e["id"] for e in dl["training"] + dl["validation"]]
        assert Path(dl["training"][0]["image"]).resolve().parent == \
            (src / "ISIC2018_Task1-2_Training_Input").resolve()  # not copied
    assert sorted(seen) == [f"ISIC_{i:07d}" for i in range(12)]
    assert not list(out.rglob("*.jpg"))


def test_isic_column_split_by_dataset(tmp_path):
    src = make_isic(tmp_path / "isic")
    paths = prepare_public_dataset("skin2d", src, tmp_path / "fl", num_sites=3, scheme="column",
                                   column="dataset", val_fraction=0.2)
    groups = [json.loads(p.read_text())["meta"]["groups"] for p in paths]
    all_groups = [g for gs in groups for g in gs]
    assert sorted(all_groups) == sorted(SOURCES)  # each source at exactly one site
    assert sum(sum(g.values()) for g in groups) == 12


def test_isic_explicit_dirs_and_metadata(tmp_path):
    src = make_isic(tmp_path / "isic", metadata=False)
    cases = find_isic_cases(images_dir=src / "ISIC2018_Task1-2_Training_Input",
                            masks_dir=src / "ISIC2018_Task1_Training_GroundTruth")
    assert len(cases) == 12 and cases[0]["meta"] == {}
    with pytest.raises(DataError, match="column 'dataset' not found"):
        prepare_public_dataset("skin2d", src, tmp_path / "fl", 2, scheme="column",
                               column="dataset")


def test_isic_missing_mask_names_case(tmp_path):
    src = make_isic(tmp_path / "isic")
    (src / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000003_segmentation.png").unlink()
    with pytest.raises(DataError) as ei:
        prepare_public_dataset("skin2d", src, tmp_path / "fl", 2)
    assert "ISIC_0000003" in str(ei.value) and "segmentation" in str(ei.value)


def test_isic_wrong_layout(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "photo1.jpg")
    with pytest.raises(DataError, match="ISIC_<digits>.jpg"):
        prepare_public_dataset("skin2d", tmp_path, tmp_path / "fl", 1)


def test_isic_duplicate_ids(tmp_path):
    src = make_isic(tmp_path / "isic")
    extra = src / "HAM10000_images_part_2"
    extra.mkdir()
    Image.new("RGB", (16, 12)).save(extra / "ISIC_0000001.jpg")
    with pytest.raises(DataError, match="duplicate case id 'ISIC_0000001'"):
        find_isic_cases(src)


def test_isic_mask_shape_mismatch_and_values(tmp_path):
    src = make_isic(tmp_path / "isic")
    gt = src / "ISIC2018_Task1_Training_GroundTruth"
    Image.fromarray(np.zeros((12, 15), np.uint8)).save(gt / "ISIC_0000004_segmentation.png")
    with pytest.raises(DataError) as ei:
        prepare_public_dataset("skin2d", src, tmp_path / "fl", 2)
    assert "case ISIC_0000004" in str(ei.value) and "shape" in str(ei.value)
    Image.fromarray(np.full((12, 16), 128, np.uint8)).save(gt / "ISIC_0000004_segmentation.png")
    with pytest.raises(DataError, match=r"case ISIC_0000004: .*unknown values \[128\]"):
        prepare_public_dataset("skin2d", src, tmp_path / "fl", 2)


def test_too_many_sites(tmp_path):
    src = make_isic(tmp_path / "isic", n=3)
    with pytest.raises(DataError, match="num_sites=4 is larger than the number of cases"):
        prepare_public_dataset("skin2d", src, tmp_path / "fl", 4)


# ---------------------------------------------------------------------------------------------
# KiTS23
# ---------------------------------------------------------------------------------------------
def test_kits_iid(tmp_path):
    src = make_kits(tmp_path / "kits23" / "dataset")
    paths = prepare_public_dataset("kidney3d", tmp_path / "kits23", tmp_path / "fl", 2, seed=3)
    ids = []
    for p in paths:
        dl = load_site_datalist(tmp_path / "fl", p.parent.name, "kidney3d")
        summary = validate_site(dl)
        assert summary["shapes"] == [(8, 9, 10)]
        ids += [e["id"] for e in dl["training"] + dl["validation"]]
        assert Path(dl["training"][0]["image"]).name == "imaging.nii.gz"
    assert sorted(ids) == [f"case_{i:05d}" for i in range(6)]
    assert len(find_kits_cases(src)) == 6


def test_kits_missing_segmentation(tmp_path):
    src = make_kits(tmp_path / "kits")
    (src / "case_00002" / "segmentation.nii.gz").unlink()
    with pytest.raises(DataError) as ei:
        prepare_public_dataset("kidney3d", src, tmp_path / "fl", 2)
    assert "case_00002" in str(ei.value) and "segmentation.nii.gz" in str(ei.value)


def test_kits_wrong_layout(tmp_path):
    _nii(tmp_path / "src" / "patient1" / "ct.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError, match=r"case_00000/imaging.nii.gz"):
        prepare_public_dataset("kidney3d", tmp_path / "src", tmp_path / "fl", 1)


def test_kits_duplicate_ids_across_roots(tmp_path):
    a, b = make_kits(tmp_path / "a", n=2), make_kits(tmp_path / "b", n=1)
    with pytest.raises(DataError, match="duplicate case id 'case_00000'"):
        find_kits_cases([a, b])


def test_kits_shape_mismatch_and_unknown_label(tmp_path):
    src = make_kits(tmp_path / "kits", n=3)
    _nii(src / "case_00001" / "segmentation.nii.gz", np.zeros((8, 9, 11), np.uint8))
    with pytest.raises(DataError) as ei:
        prepare_public_dataset("kidney3d", src, tmp_path / "fl", 2)
    msg = str(ei.value)
    assert "case case_00001" in msg and "imaging.nii.gz" in msg and "segmentation.nii.gz" in msg
    seg = np.zeros((8, 9, 10), np.uint8)
    seg[0, 0, 0] = 5
    _nii(src / "case_00001" / "segmentation.nii.gz", seg)
    with pytest.raises(DataError, match=r"case case_00001: .*unknown values \[5\]"):
        prepare_public_dataset("kidney3d", src, tmp_path / "fl", 2)
    # validate=False skips the check (sites then catch it at start-up)
    paths = prepare_public_dataset("kidney3d", src, tmp_path / "fl", 1, validate=False)
    with pytest.raises(DataError, match="unknown values"):
        validate_site(load_site_datalist(tmp_path / "fl", paths[0].parent.name))


# ---------------------------------------------------------------------------------------------
# BraTS 2024
# ---------------------------------------------------------------------------------------------
def test_brats_prepare(tmp_path):
    src = make_brats(tmp_path / "brats")
    paths = prepare_public_dataset("brain3d", src, tmp_path / "fl", 2, val_fraction=0.34,
                                   site_names=["hosp-a", "hosp-b"])
    assert [p.parent.name for p in paths] == ["hosp-a", "hosp-b"]
    dl = load_site_datalist(tmp_path / "fl", "hosp-a", "brain3d")
    e = dl["training"][0]
    assert [Path(p).name.rsplit("-", 1)[1] for p in e["image"]] == [
        "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
    assert Path(e["label"]).name.endswith("-seg.nii.gz")
    assert validate_site(dl)["label_counts"].keys() == {0, 1, 2, 3}


def test_brats_missing_modality(tmp_path):
    src = make_brats(tmp_path / "brats")
    (src / "BraTS-GLI-00003-000" / "BraTS-GLI-00003-000-t2f.nii.gz").unlink()
    with pytest.raises(DataError) as ei:
        find_brats_cases(src)
    assert "BraTS-GLI-00003-000" in str(ei.value) and "t2f" in str(ei.value)


def test_brats_2024_label_4_is_resection_cavity(tmp_path):
    """BraTS 2024 GLI label 4 (resection cavity) is accepted; an unknown label still stops."""
    src = make_brats(tmp_path / "brats", n=2)
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2, 2, 2] = 4
    _nii(src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz", seg)
    paths = prepare_public_dataset("brain3d", src, tmp_path / "fl", 1)
    assert 4 in validate_site(load_site_datalist(tmp_path / "fl", paths[0].parent.name))["label_counts"]
    seg[3, 3, 3] = 6
    _nii(src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz", seg)
    with pytest.raises(DataError) as ei:
        prepare_public_dataset("brain3d", src, tmp_path / "fl2", 1)
    msg = str(ei.value)
    assert "BraTS-GLI-00001-000" in msg and "unknown values [6]" in msg and "remap" not in msg


def test_brats_old_layout_hint(tmp_path):
    d = tmp_path / "BraTS2021_00000"
    _nii(d / "BraTS2021_00000_t1.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError, match="BraTS-GLI-00000-000.*BraTS2021_00000.*pre-2023"):
        prepare_public_dataset("brain3d", tmp_path, tmp_path / "fl", 1)


def test_brats_modality_shape_mismatch(tmp_path):
    src = make_brats(tmp_path / "brats", n=2)
    cid = "BraTS-GLI-00000-000"
    _nii(src / cid / f"{cid}-t1c.nii.gz", np.ones((8, 8, 7), np.int16))
    with pytest.raises(DataError) as ei:
        prepare_public_dataset("brain3d", src, tmp_path / "fl", 1)
    assert f"case {cid}" in str(ei.value) and "t1c" in str(ei.value)


def test_brats_2024_case_with_rc_is_scored_on_its_original_grid(tmp_path):
    """A BraTS 2024-layout case with label 4 (RC) and anisotropic spacing loads, trains at the
    validation size and is scored on its own grid, distances in mm from its header."""
    import torch

    from adpfl.metrics import score_case, scoring_for
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training.loop import LocalTrainer, TrainConfig

    shape, spacing = (22, 20, 12), (1.0, 1.2, 2.5)
    affine = np.diag([*spacing, 1.0])
    src = tmp_path / "brats"
    for i in range(3):
        cid = f"BraTS-GLI-{i:05d}-000"
        brain = np.zeros(shape, np.int16)
        brain[2:20, 2:18, 1:11] = 100 + 10 * i  # background 0 outside: the brain crop applies
        seg = np.zeros(shape, np.uint8)
        seg[4:12, 4:12, 3:8] = 2
        seg[6:10, 6:10, 4:7] = 3
        seg[7:9, 7:9, 5] = 1
        seg[14:19, 12:17, 3:9] = 4  # resection cavity
        for m in ("t1n", "t1c", "t2w", "t2f"):
            (src / cid).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(brain + seg * (3 + "t1n t1c t2w t2f".split().index(m)), affine),
                     str(src / cid / f"{cid}-{m}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(src / cid / f"{cid}-seg.nii.gz"))
    paths = prepare_public_dataset("brain3d", src, tmp_path / "fl", 1, val_fraction=0.34)
    dl = load_site_datalist(tmp_path / "fl", paths[0].parent.name, "brain3d")
    assert 4 in validate_site(dl)["label_counts"]
    task = get_task("brain3d")
    trainer = LocalTrainer(task, dl, TrainConfig(local_epochs=1, batch_size=2, image_size=16, device="cpu",
                                                 amp=False))
    d, item = trainer.val_ds[0], trainer.val_items[0]
    assert tuple(d["label"].shape[1:]) == (16, 16, 16)  # the validation grid
    # the resampled ground truth as a "prediction": back on the 22 x 20 x 12 grid it nearly matches
    pred = trainer._grid.prediction(d["label"].as_tensor().long(), d)
    gt, sp = trainer._grid.label(item)
    assert pred.shape == gt.shape == shape and sp == pytest.approx(spacing)
    assert {0, 2, 3, 4} <= set(np.unique(pred).tolist())  # (the 4-voxel NETC may vanish at 16^3)
    s = score_case(pred, gt, task.regions, scoring_for("brain3d"), sp)
    assert s["dice_WT"] > 0.85 and s["dice_RC"] > 0.85 and s["lesion_dice_RC"] > 0.85
    assert 0 <= s["hd95_WT"] <= 2.5  # mm: at most one slice off
    torch.manual_seed(0)
    model = TaskNetwork("brain3d")
    trainer.train(model)
    metrics = trainer.evaluate(model)
    assert {"dice_RC", "hd95_RC", "lesion_dice_RC", "lesion_hd95_RC", "lesion_dice_mean"} <= set(metrics)
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())


def test_isic_case_is_scored_on_its_original_image(tmp_path):
    """skin2d: the 12 x 16 ISIC mask is scored at its own size (pixels), with the ISIC
    thresholded Jaccard beside Dice; a {0, 1} mask reads as lesion, not as empty."""
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training.loop import LocalTrainer, TrainConfig

    src = make_isic(tmp_path / "isic", n=4, metadata=False)
    m01 = np.zeros((12, 16), np.uint8)
    m01[3:8, 4:10] = 1
    Image.fromarray(m01).save(src / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000000_segmentation.png")
    paths = prepare_public_dataset("skin2d", src, tmp_path / "fl", 1, val_fraction=0.5)
    dl = load_site_datalist(tmp_path / "fl", paths[0].parent.name, "skin2d")
    trainer = LocalTrainer(get_task("skin2d"), dl, TrainConfig(local_epochs=1, batch_size=2, image_size=32,
                                                               device="cpu", amp=False))
    for d, item in zip(trainer.val_ds, trainer.val_items):
        pred = trainer._grid.prediction(d["label"].as_tensor().long(), d)
        gt, sp = trainer._grid.label(item)
        assert pred.shape == gt.shape == (16, 12) and sp == (1.0, 1.0)  # MONAI reads PNGs as (W, H)
        assert gt.sum() == 30 and (pred == gt).all()
    metrics = trainer.evaluate(TaskNetwork("skin2d"))
    assert set(metrics) == {"dice_lesion", "hd95_lesion", "tjaccard_lesion", "dice_mean", "hd95_mean",
                            "tjaccard_mean"}
