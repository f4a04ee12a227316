"""Datalist loading and per-case validation: every error names the file / setting / site."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from adpfl.data import DataError, DataWarning, check_pair, generate_site, load_site_datalist, validate_site


def _nii(path: Path, arr: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return str(path)


def _png(path: Path, arr: np.ndarray) -> str:
    Image.fromarray(arr).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def skin_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl_skin")
    generate_site("skin2d", root, "site-1", num_train=3, num_val=1, size=32)
    return root


@pytest.fixture
def site(skin_root, tmp_path):
    """A private copy of a small skin site (so tests may break it)."""
    shutil.copytree(skin_root / "site-1", tmp_path / "site-1")
    return tmp_path


def _edit(root: Path, fn):
    p = root / "site-1" / "datalist.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))
    return p


def test_load_returns_absolute_paths(site):
    dl = load_site_datalist(site, "site-1", task="skin2d")
    assert dl["task"] == "skin2d" and dl["site"] == "site-1"
    assert len(dl["training"]) == 3 and len(dl["validation"]) == 1
    for e in dl["training"] + dl["validation"]:
        assert Path(e["image"]).is_absolute() and Path(e["image"]).is_file()
        assert Path(e["label"]).is_absolute() and Path(e["label"]).is_file()
    assert Path(dl["datalist_path"]).is_file()
    assert dl["meta"]["num_train"] == 3


def test_monai_can_read_datalist(site):
    from monai.data import load_decathlon_datalist

    p = site / "site-1" / "datalist.json"
    items = load_decathlon_datalist(str(p), data_list_key="training", base_dir=str(p.parent))
    assert len(items) == 3 and Path(items[0]["image"]).is_file()


@pytest.mark.parametrize("root", [None, ""])
def test_unset_data_root(root):
    with pytest.raises(DataError, match="data_root"):
        load_site_datalist(root, "site-1")


def test_missing_data_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as ei:
        load_site_datalist(missing, "site-1")
    assert "data_root" in str(ei.value) and str(missing) in str(ei.value)


def test_missing_datalist(tmp_path):
    with pytest.raises(DataError) as ei:
        load_site_datalist(tmp_path, "site-7")
    assert "site-7" in str(ei.value) and "datalist.json" in str(ei.value)


def test_corrupt_json(site):
    p = site / "site-1" / "datalist.json"
    p.write_text('{"task": "skin2d", "training": [')
    with pytest.raises(DataError) as ei:
        load_site_datalist(site, "site-1")
    assert str(p) in str(ei.value) and "JSON" in str(ei.value)


def test_json_not_object(site):
    (site / "site-1" / "datalist.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        load_site_datalist(site, "site-1")


def test_entry_points_at_missing_file(site):
    gone = site / "site-1" / "images" / "site-1_0001.png"
    gone.unlink()
    with pytest.raises(DataError) as ei:
        load_site_datalist(site, "site-1")
    msg = str(ei.value)
    assert str(gone) in msg and "datalist.json" in msg and "training[1]" in msg


def test_entry_missing_keys(site):
    _edit(site, lambda d: d["training"][0].pop("label"))
    with pytest.raises(DataError, match="'image' and 'label'"):
        load_site_datalist(site, "site-1")


def test_empty_training_list(site):
    _edit(site, lambda d: d.update(training=[]))
    with pytest.raises(DataError) as ei:
        load_site_datalist(site, "site-1")
    assert "site-1" in str(ei.value) and "no training cases" in str(ei.value)


def test_wrong_task(site):
    with pytest.raises(DataError) as ei:
        load_site_datalist(site, "site-1", task="kidney3d")
    assert "skin2d" in str(ei.value) and "kidney3d" in str(ei.value)
    with pytest.raises(DataError, match="unknown task"):
        load_site_datalist(site, "site-1", task="lung")
    _edit(site, lambda d: d.update(task="lung"))
    with pytest.raises(DataError, match="unknown task 'lung'"):
        load_site_datalist(site, "site-1")


def test_no_validation_warns(site):
    _edit(site, lambda d: d.update(validation=[]))
    with pytest.warns(DataWarning, match="no validation"):
        load_site_datalist(site, "site-1")


def test_brain_entry_needs_four_images(tmp_path):
    generate_site("brain3d", tmp_path, "site-1", num_train=1, num_val=0, size=16)
    _edit(tmp_path, lambda d: d["training"][0].update(image=d["training"][0]["image"][:3]))
    with pytest.raises(DataError, match="list of 4 paths"):
        load_site_datalist(tmp_path, "site-1")


# ---------------------------------------------------------------------------------------------
# check_pair
# ---------------------------------------------------------------------------------------------
def test_check_pair_ok_2d(tmp_path):
    img = _png(tmp_path / "i.png", np.zeros((20, 30, 3), np.uint8))
    lab = np.zeros((20, 30), np.uint8)
    lab[5:9, 5:9] = 255
    info = check_pair(img, _png(tmp_path / "m.png", lab))
    assert info == {"shape": (20, 30), "channels": 3, "labels": [0, 255], "empty": False}
    lab01 = _png(tmp_path / "m01.png", (lab > 0).astype(np.uint8))
    assert check_pair(img, lab01, task="skin2d")["labels"] == [0, 1]


def test_check_pair_shape_mismatch_2d(tmp_path):
    img = _png(tmp_path / "i.png", np.zeros((20, 30, 3), np.uint8))
    lab = _png(tmp_path / "m.png", np.zeros((20, 31), np.uint8))
    with pytest.raises(DataError) as ei:
        check_pair(img, lab)
    assert img in str(ei.value) and lab in str(ei.value) and "shape" in str(ei.value)


def test_check_pair_wrong_channels_2d(tmp_path):
    grey = _png(tmp_path / "g.png", np.zeros((8, 8), np.uint8))
    lab = _png(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="RGB") as ei:
        check_pair(grey, lab, task="skin2d")
    assert grey in str(ei.value)
    rgb = _png(tmp_path / "i.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="single-channel"):
        check_pair(rgb, rgb, task="skin2d")


def test_check_pair_unknown_label_values_2d(tmp_path):
    img = _png(tmp_path / "i.png", np.zeros((8, 8, 3), np.uint8))
    lab = np.zeros((8, 8), np.uint8)
    lab[0, 0], lab[1, 1] = 255, 128
    lab = _png(tmp_path / "m.png", lab)
    with pytest.raises(DataError) as ei:
        check_pair(img, lab)
    assert lab in str(ei.value) and "[128]" in str(ei.value)


def test_check_pair_corrupt_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    lab = _png(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError) as ei:
        check_pair(str(bad), lab, task="skin2d")
    assert str(bad) in str(ei.value)
    badnii = tmp_path / "bad.nii.gz"
    badnii.write_bytes(b"garbage")
    good = _nii(tmp_path / "g.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError) as ei:
        check_pair(str(badnii), good, task="kidney3d")
    assert str(badnii) in str(ei.value)
    with pytest.raises(DataError) as ei:
        check_pair(good, str(badnii), task="kidney3d")
    assert str(badnii) in str(ei.value)


def test_check_pair_truncated_nifti_label(tmp_path):
    img = _nii(tmp_path / "i.nii.gz", np.zeros((16, 16, 16), np.int16))
    lab = tmp_path / "l.nii.gz"
    _nii(lab, np.ones((16, 16, 16), np.uint8))
    lab.write_bytes(lab.read_bytes()[:-40])
    with pytest.raises(DataError) as ei:
        check_pair(img, str(lab), task="kidney3d")
    assert str(lab) in str(ei.value)


def test_check_pair_3d(tmp_path):
    img = _nii(tmp_path / "i.nii.gz", np.zeros((6, 7, 8), np.int16))
    seg = np.zeros((6, 7, 8), np.uint8)
    seg[1:3, 1:3, 1:3] = 1
    lab = _nii(tmp_path / "l.nii.gz", seg)
    assert check_pair(img, lab, task="kidney3d")["shape"] == (6, 7, 8)
    # shape mismatch names both files
    lab2 = _nii(tmp_path / "l2.nii.gz", np.zeros((6, 7, 9), np.uint8))
    with pytest.raises(DataError) as ei:
        check_pair(img, lab2, task="kidney3d")
    assert img in str(ei.value) and lab2 in str(ei.value)
    # unknown values named
    seg[0, 0, 0] = 7
    lab3 = _nii(tmp_path / "l3.nii.gz", seg)
    with pytest.raises(DataError) as ei:
        check_pair(img, lab3, task="kidney3d")
    assert lab3 in str(ei.value) and "[7]" in str(ei.value)
    # a 2-channel CT is rejected
    img2 = _nii(tmp_path / "i2.nii.gz", np.zeros((6, 7, 8, 2), np.int16))
    with pytest.raises(DataError, match="channels"):
        check_pair(img2, lab, task="kidney3d")


def test_check_pair_brain(tmp_path):
    chans = [_nii(tmp_path / f"c{i}.nii.gz", np.zeros((6, 6, 6), np.int16)) for i in range(4)]
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[2, 2, 2] = 3
    lab = _nii(tmp_path / "seg.nii.gz", seg)
    assert check_pair(chans, lab)["channels"] == 4
    with pytest.raises(DataError, match="expects 4 image"):
        check_pair(chans[:3], lab, task="brain3d")
    odd = _nii(tmp_path / "odd.nii.gz", np.zeros((6, 6, 5), np.int16))
    with pytest.raises(DataError) as ei:
        check_pair(chans[:3] + [odd], lab, task="brain3d")
    assert odd in str(ei.value)
    seg[3, 3, 3] = 4  # BraTS 2024 GLI resection cavity: a valid label
    rc = _nii(tmp_path / "rc.nii.gz", seg)
    assert check_pair(chans, rc, task="brain3d")["labels"] == [0, 3, 4]
    seg[4, 4, 4] = 5  # genuinely unknown
    bad = _nii(tmp_path / "bad.nii.gz", seg)
    with pytest.raises(DataError, match=r"unknown values \[5\].*4 RC") as ei:
        check_pair(chans, bad, task="brain3d")
    assert bad in str(ei.value) and "remap" not in str(ei.value)
    old = np.zeros((6, 6, 6), np.uint8)
    old[1, 1, 1], old[2, 2, 2] = 2, 4  # pre-2023 numbering: 4 = enhancing tumour, no 3
    old_lab = _nii(tmp_path / "old.nii.gz", old)
    with pytest.warns(DataWarning, match="pre-2023 BraTS numbering"):
        check_pair(chans, old_lab, task="brain3d")


def test_empty_mask_warns_and_all_empty_site_fails(tmp_path):
    img = _nii(tmp_path / "i.nii.gz", np.zeros((6, 6, 6), np.int16))
    lab = _nii(tmp_path / "l.nii.gz", np.zeros((6, 6, 6), np.uint8))
    with pytest.warns(DataWarning, match="empty"):
        info = check_pair(img, lab, task="kidney3d")
    assert info["empty"] is True
    dl = {"task": "kidney3d", "site": "site-9", "datalist_path": "x",
          "training": [{"image": img, "label": lab}], "validation": []}
    with pytest.raises(DataError, match="all 1 training masks are empty"):
        validate_site(dl)


def test_no_tumour_case_is_silent(tmp_path):
    img = _nii(tmp_path / "i.nii.gz", np.zeros((6, 6, 6), np.int16))
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[1, 1, 1] = 1
    lab = _nii(tmp_path / "l.nii.gz", seg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_pair(img, lab, task="kidney3d")["labels"] == [0, 1]


def test_validate_site_collects_errors(site):
    dl = load_site_datalist(site, "site-1")
    # replace one mask with a wrong-size one and another with unknown values
    bad1 = dl["training"][0]["label"]
    _png(Path(bad1), np.zeros((31, 32), np.uint8))
    bad2 = dl["validation"][0]["label"]
    _png(Path(bad2), np.full((32, 32), 3, np.uint8))
    with pytest.raises(DataError) as ei:
        validate_site(dl)
    msg = str(ei.value)
    assert "2 invalid case(s)" in msg and bad1 in msg and bad2 in msg and "site-1" in msg


def test_validate_site_speed(tmp_path):
    import time

    generate_site("skin2d", tmp_path, "site-1", num_train=40, num_val=20, size=64)
    dl = load_site_datalist(tmp_path, "site-1")
    t0 = time.perf_counter()
    summary = validate_site(dl)
    assert time.perf_counter() - t0 < 5.0
    assert summary["num_training"] == 40 and summary["shapes"] == [(64, 64)]
