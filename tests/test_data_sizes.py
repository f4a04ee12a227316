"""Setting data_size: presets, explicit overrides, the keyed cache of realistic sites and its
reuse and locking (tiny stand-ins: no realistic-size generation here)."""

import multiprocessing as mp
import os
import warnings

import pytest

from adpfl.data import ensure_site_data
from adpfl.data import synthetic as syn
from adpfl.data.sizes import PRESETS, resolve_data_size, synthetic_root
from adpfl.training.loop import TrainConfig
from adpfl.training.site import SiteConfig, SiteSession


def test_presets_and_overrides():
    assert resolve_data_size("skin2d") == (40, 20, None)  # tiny: today's sizes
    assert resolve_data_size("kidney3d", "tiny") == resolve_data_size("brain3d", "tiny") == (8, 4, None)
    assert resolve_data_size("skin2d", "realistic") == (3300, 330, 128)
    assert PRESETS["realistic"]["kidney3d"][0] >= 100 and PRESETS["realistic"]["brain3d"][0] >= 100
    assert resolve_data_size("kidney3d", "realistic", num_val=5, image_size=32) == (130, 5, 32)
    with pytest.raises(ValueError, match="data_size"):
        resolve_data_size("skin2d", "huge")
    with pytest.raises(ValueError, match="data_size"):
        SiteConfig(data_size="Realistic").validate()
    s = SiteSession("site-1", SiteConfig(task="brain3d", data_size="realistic", num_train=3), TrainConfig())
    assert (s.config.num_train, s.config.num_val, s.train_config.image_size) == (3, 20, 48)


def test_cache_folder_is_keyed_by_what_it_holds(tmp_path):
    root = str(tmp_path)
    assert synthetic_root(root, "tiny", 40, 20, (128, 128), 0) == root
    key = synthetic_root(root, "realistic", 3300, 330, (128, 128), 0)
    assert key == os.path.join(root, "realistic-3300-330-128x128-seed0")
    others = {synthetic_root(root, "realistic", *a) for a in
              [(3300, 330, (128, 128), 1), (3300, 330, (64, 64), 0), (3000, 330, (128, 128), 0)]}
    assert key not in others and len(others) == 3


def test_realistic_site_is_generated_once_and_reused(tmp_path):
    cfg = SiteConfig(task="skin2d", data_size="realistic", num_train=2, num_val=1)
    train = TrainConfig(image_size=32, device="cpu", batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SiteSession("site-1", cfg, train).setup(str(tmp_path))
        datalist = tmp_path / "realistic-2-1-32x32-seed0" / "site-1" / "datalist.json"
        stamp = datalist.stat().st_mtime_ns, datalist.stat().st_ino
        # another job with other training settings reuses it; a tiny job does not touch it
        SiteSession("site-1", cfg, TrainConfig(image_size=32, device="cpu", batch_size=1)).setup(str(tmp_path))
        SiteSession("site-1", SiteConfig(num_train=2, num_val=1), train).setup(str(tmp_path))
    assert (datalist.stat().st_mtime_ns, datalist.stat().st_ino) == stamp
    assert (tmp_path / "site-1" / "datalist.json").is_file()


def _ensure_inode(root):
    return ensure_site_data("skin2d", root, "site-1", num_train=3, num_val=1, size=24).stat().st_ino


def test_two_processes_generate_a_site_once(tmp_path):
    root = str(tmp_path / "realistic-3-1-24x24-seed0")
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(2) as pool:
        inodes = pool.map(_ensure_inode, [root, root])
    # the second process waited for the first one's lock and found the site current
    assert inodes[0] == inodes[1]


def test_parallel_generation_is_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(syn, "PARALLEL_MIN_CASES", 4)
    a, b = tmp_path / "a", tmp_path / "b"
    (a).mkdir(), (b).mkdir()
    syn._write_site("skin2d", a, "site-2", 5, 1, (24, 24), 3, workers=1)
    syn._write_site("skin2d", b, "site-2", 5, 1, (24, 24), 3, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 13
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
