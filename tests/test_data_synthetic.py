"""Synthetic site generation: shapes, dtypes, labels, domain shift, repeatability, speed."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from adpfl.data import (
    DataError,
    ensure_site_data,
    generate_site,
    load_site_datalist,
    site_index,
    validate_site,
)
from adpfl.data.synthetic import domain_shift

pytestmark = pytest.mark.filterwarnings("ignore::adpfl.data.errors.DataWarning")


def _files(site_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(site_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(site_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for task, size, n in (("skin2d", None, 6), ("kidney3d", 32, 3), ("brain3d", 32, 3)):
        for site in ("site-1", "site-3"):
            out[task, site] = generate_site(task, root / task, site, num_train=n, num_val=2,
                                            size=size, seed=0)
    return out


def test_site_index():
    assert site_index("site-1") == 0
    assert site_index("site-2") == 1
    assert site_index("site-12") == 11
    h = site_index("hospital-a")
    assert h == site_index("hospital-a") and h >= 1000
    assert site_index("hospital-b") != h
    assert site_index("site-0") >= 1000


def test_skin_shapes_dtypes_labels(sites):
    dl = load_site_datalist(Path(sites["skin2d", "site-1"]).parent.parent, "site-1", "skin2d")
    assert len(dl["training"]) == 6 and len(dl["validation"]) == 2
    for e in dl["training"] + dl["validation"]:
        img = np.asarray(Image.open(e["image"]))
        lab = np.asarray(Image.open(e["label"]))
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert lab.shape == (128, 128) and lab.dtype == np.uint8
        assert set(np.unique(lab)) == {0, 255}
        frac = (lab > 0).mean()
        assert 0.01 < frac < 0.7
        # lesion darker than skin on average, but not separable by a single red threshold
        inside, outside = img[lab > 0].mean(0), img[lab == 0].mean(0)
        assert inside.sum() < outside.sum()
    summary = validate_site(dl)
    assert summary["label_counts"] == {0: 8, 255: 8}


def test_skin_nonrectangular_size(tmp_path):
    p = generate_site("skin2d", tmp_path, "site-2", num_train=2, num_val=0, size=(96, 80))
    dl = load_site_datalist(tmp_path, "site-2")
    assert np.asarray(Image.open(dl["training"][0]["image"])).shape == (96, 80, 3)
    assert json.loads(p.read_text())["meta"]["size"] == [96, 80]


def test_kidney_shapes_dtypes_labels(sites):
    root = Path(sites["kidney3d", "site-1"]).parent.parent
    dl = load_site_datalist(root, "site-1", "kidney3d")
    seen = set()
    for e in dl["training"] + dl["validation"]:
        img, lab = nib.load(e["image"]), nib.load(e["label"])
        assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.int16
        assert lab.shape == (32, 32, 32) and lab.get_data_dtype() == np.uint8
        ct, seg = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        vals = set(np.unique(seg).tolist())
        assert vals <= {0, 1, 2, 3} and 1 in vals
        seen |= vals
        assert ct.min() <= -900  # air
        assert 20 < np.median(ct[seg == 1]) < 300  # enhanced kidney
    assert {0, 1} <= seen
    validate_site(dl)


def test_brain_shapes_dtypes_labels(sites):
    root = Path(sites["brain3d", "site-1"]).parent.parent
    dl = load_site_datalist(root, "site-1", "brain3d")
    for e in dl["training"]:
        assert isinstance(e["image"], list) and len(e["image"]) == 4
        assert [Path(p).name.split("_")[-1] for p in e["image"]] == [
            "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
        chans = [np.asarray(nib.load(p).dataobj) for p in e["image"]]
        seg = np.asarray(nib.load(e["label"]).dataobj)
        assert all(c.shape == (32, 32, 32) and c.dtype == np.int16 for c in chans)
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        assert {2, 3} <= set(np.unique(seg).tolist())
        # skull-stripped: corners are exactly 0
        assert all(c[0, 0, 0] == 0 and c[-1, -1, -1] == 0 for c in chans)
        t1c, flair = chans[1].astype(float), chans[3].astype(float)
        brain = chans[0] > 0
        wm_like = brain & (seg == 0)
        assert t1c[seg == 3].mean() > t1c[wm_like].mean()  # bright enhancing rim
        assert flair[seg == 2].mean() > flair[wm_like].mean()  # bright oedema
    validate_site(dl)


def _mean_intensity(dl, task):
    vals = []
    for e in dl["training"]:
        if task == "skin2d":
            vals.append(np.asarray(Image.open(e["image"]), dtype=float).reshape(-1, 3).mean(0))
        elif task == "kidney3d":
            ct = np.asarray(nib.load(e["image"]).dataobj, dtype=float)
            vals.append([ct[ct > -500].std()])
        else:
            vals.append([np.asarray(nib.load(p).dataobj, dtype=float).mean() for p in e["image"]])
    return np.mean(vals, axis=0)


@pytest.mark.parametrize("task,threshold", [("skin2d", 10.0), ("kidney3d", 3.0),
                                            ("brain3d", 10.0)])
def test_domain_shift_differs_between_sites(sites, task, threshold):
    root = Path(sites[task, "site-1"]).parent.parent
    a = _mean_intensity(load_site_datalist(root, "site-1"), task)
    b = _mean_intensity(load_site_datalist(root, "site-3"), task)
    assert np.abs(a - b).max() > threshold, (a, b)
    assert domain_shift(task, "site-1") != domain_shift(task, "site-3")
    meta = json.loads(Path(sites[task, "site-3"]).read_text())["meta"]
    assert meta["domain_shift"] == domain_shift(task, "site-3")
    assert meta["site_index"] == 2


def test_domain_shift_for_unlisted_sites_is_stable():
    for task in ("skin2d", "kidney3d", "brain3d"):
        assert domain_shift(task, "site-9") == domain_shift(task, "site-9")
        assert domain_shift(task, "clinic-x") == domain_shift(task, "clinic-x")
        assert domain_shift(task, "site-9") != domain_shift(task, "site-10")


@pytest.mark.parametrize("task,size", [("skin2d", 64), ("kidney3d", 24), ("brain3d", 24)])
def test_seed_repeatability(tmp_path, task, size):
    kw = dict(num_train=2, num_val=1, size=size)
    generate_site(task, tmp_path / "a", "site-2", seed=5, **kw)
    generate_site(task, tmp_path / "b", "site-2", seed=5, **kw)
    generate_site(task, tmp_path / "c", "site-2", seed=6, **kw)
    fa, fb, fc = (_files(tmp_path / x / "site-2") for x in "abc")
    assert fa == fb  # byte-identical, including datalist.json
    assert set(fa) == set(fc)
    images = [k for k in fa if k not in ("datalist.json", ".adpfl_synthetic")]
    differing = [k for k in images if fa[k] != fc[k]]
    assert differing == images  # every image and label differs with another seed


def test_generate_refuses_existing_without_overwrite(tmp_path):
    generate_site("skin2d", tmp_path, "site-1", num_train=1, num_val=0, size=32)
    with pytest.raises(DataError, match="already exists"):
        generate_site("skin2d", tmp_path, "site-1", num_train=1, num_val=0, size=32)
    generate_site("skin2d", tmp_path, "site-1", num_train=2, num_val=0, size=32, overwrite=True)
    assert len(load_site_datalist(tmp_path, "site-1")["training"]) == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("bad", [dict(task="ct"), dict(size=8), dict(num_train=0),
                                 dict(size=(64, 64, 64))])
def test_generate_bad_arguments(tmp_path, bad):
    kw = dict(task="skin2d", data_root=tmp_path, site_name="site-1", num_train=1, num_val=0)
    kw.update(bad)
    with pytest.raises(DataError):
        generate_site(**kw)


def test_skin_generation_speed(tmp_path):
    t0 = time.perf_counter()
    for s in (1, 2, 3):
        generate_site("skin2d", tmp_path, f"site-{s}", num_train=40, num_val=20, seed=0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20.0, f"3 sites x 60 skin images took {elapsed:.1f} s"


def test_ensure_site_data_skips_and_regenerates(tmp_path):
    kw = dict(num_train=2, num_val=1, size=24, seed=1)
    p = ensure_site_data("kidney3d", tmp_path, "site-1", **kw)
    m1 = p.stat().st_mtime_ns
    img = tmp_path / "site-1" / "images" / "site-1_0000.nii.gz"
    img_m = img.stat().st_mtime_ns
    # same request: nothing rewritten
    assert ensure_site_data("kidney3d", tmp_path, "site-1", **kw) == p
    assert p.stat().st_mtime_ns == m1 and img.stat().st_mtime_ns == img_m
    # different seed / counts / size: regenerated
    ensure_site_data("kidney3d", tmp_path, "site-1", **{**kw, "seed": 2})
    assert json.loads(p.read_text())["meta"]["seed"] == 2
    ensure_site_data("kidney3d", tmp_path, "site-1", **{**kw, "seed": 2, "num_train": 3})
    assert len(json.loads(p.read_text())["training"]) == 3
    # a deleted file or corrupt datalist triggers regeneration
    img.unlink()
    ensure_site_data("kidney3d", tmp_path, "site-1", **{**kw, "seed": 2, "num_train": 3})
    assert img.is_file()
    p.write_text("{not json")
    ensure_site_data("kidney3d", tmp_path, "site-1", **{**kw, "seed": 2, "num_train": 3})
    assert json.loads(p.read_text())["meta"]["num_train"] == 3
    # task change
    ensure_site_data("skin2d", tmp_path, "site-1", num_train=1, num_val=0, size=32)
    assert load_site_datalist(tmp_path, "site-1")["task"] == "skin2d"


def _ensure_worker(args):
    root, site = args
    return str(ensure_site_data("brain3d", root, site, num_train=2, num_val=1, size=24))


def test_ensure_site_data_concurrent_sites(tmp_path):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    jobs = [(str(tmp_path), "site-1"), (str(tmp_path), "site-2"), (str(tmp_path), "site-1")]
    with ctx.Pool(2) as pool:
        paths = pool.map(_ensure_worker, jobs)
    assert paths[0] == paths[2]
    for site in ("site-1", "site-2"):
        validate_site(load_site_datalist(tmp_path, site, "brain3d"))
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers


def test_cli_generate_and_validate(tmp_path, capsys):
    from adpfl.cli import main

    assert main(["data", "generate", "--task", "kidney3d", "--data-root", str(tmp_path), "--sites", "2",
                 "--num-train", "1", "--num-val", "1", "--size", "16"]) == 0
    assert (tmp_path / "site-2" / "datalist.json").is_file()
    assert main(["data", "validate", "--data-root", str(tmp_path), "--site", "site-1"]) == 0
    assert main(["data", "validate", "--data-root", str(tmp_path / "missing"), "--site", "site-1"]) == 2
    assert "data_root" in capsys.readouterr().err


def test_ensure_site_data_never_replaces_real_data(tmp_path):
    from adpfl.data.errors import DataError
    from adpfl.data.synthetic import ensure_site_data

    site = tmp_path / "site-1"
    site.mkdir()
    real = {"task": "skin2d", "training": [{"image": "ISIC_0000000.jpg", "label": "ISIC_0000000_segmentation.png"}]}
    (site / "datalist.json").write_text(json.dumps(real))
    with pytest.raises(DataError, match="refusing to replace"):
        ensure_site_data("skin2d", tmp_path, "site-1", num_train=2, num_val=1, size=32)
    assert json.loads((site / "datalist.json").read_text()) == real
