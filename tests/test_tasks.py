"""Segmentation tasks: registry, evaluation regions, transforms, network shapes, one local epoch."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from adpfl.data import ensure_site_data, load_site_datalist
from adpfl.tasks.base import NETWORKS, SMALL_CHANNEL_DIVISOR, TASK_NAMES, SegTask, get_task, labels_to_regions
from adpfl.tasks.network import TaskNetwork
from adpfl.training.loop import LocalTrainer, TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::adpfl.data.errors.DataWarning")

TASKS_3D = ("kidney3d", "brain3d")
SIZE = 32  # tiny synthetic volumes keep the whole module fast on CPU


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def datalists(tmp_path_factory):
    out = {}
    for name in TASKS_3D:
        root = tmp_path_factory.mktemp(name)  # one data root per task (same site name)
        ensure_site_data(name, root, "site-1", num_train=2, num_val=1, size=SIZE, seed=0)
        out[name] = load_site_datalist(root, "site-1", task=name)
    return out


# -- registry ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, dims, channels, classes, key",
    [
        ("skin2d", 2, 3, 2, "lesion"),
        ("kidney3d", 3, 1, 4, "kidney_tumor_cyst"),
        ("brain3d", 3, 4, 5, "WT"),
    ],
)
def test_get_task(name, dims, channels, classes, key):
    task = get_task(name)
    assert isinstance(task, SegTask)
    assert task.name == name
    assert task.spatial_dims == dims
    assert task.in_channels == channels
    assert task.num_classes == classes
    assert task.label_values == tuple(range(classes))
    assert task.key_region == key and key in task.regions
    assert len(task.default_size) == dims
    assert len(task.unet_strides) == len(task.unet_channels) - 1
    for values in task.regions.values():
        assert values and set(values) <= set(task.label_values) - {0}
    if task.patch_size is not None:
        assert len(task.patch_size) == dims
        assert all(p <= s for p, s in zip(task.patch_size, task.default_size))
    assert callable(task.make_train_transforms) and callable(task.make_val_transforms)


def test_all_task_names_resolve():
    assert {get_task(n).name for n in TASK_NAMES} == set(TASK_NAMES)


@pytest.mark.parametrize("bad", ["liver3d", "base", "network", "kidney-3d", "", None, 3])
def test_unknown_task_names_the_allowed_ones(bad):
    with pytest.raises(ValueError) as exc:
        get_task(bad)
    msg = str(exc.value)
    for name in TASK_NAMES:
        assert name in msg


def test_3d_settings():
    kid, brain = get_task("kidney3d"), get_task("brain3d")
    assert kid.channel_names == ("CT",)
    assert kid.label_names == {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
    assert brain.channel_names == ("T1n", "T1c", "T2w", "FLAIR")
    assert brain.label_names == {0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}
    for t in (kid, brain):
        assert t.default_size == (64, 64, 64)
        # the UNet must reduce the default size and the patch evenly
        factor = math.prod(t.unet_strides)
        assert all(s % factor == 0 for s in (*t.default_size, *t.patch_size))


# -- evaluation regions --------------------------------------------------------------------
def _label_map(values):
    # (B=1, 1, 1, 1, N): one voxel per value
    return torch.tensor(values, dtype=torch.long).view(1, 1, 1, 1, -1)


def test_kits_hierarchical_regions():
    task = get_task("kidney3d")
    assert task.regions == {"kidney_tumor_cyst": (1, 2, 3), "tumor_cyst": (2, 3), "tumor": (2,)}
    reg = labels_to_regions(_label_map([0, 1, 2, 3, 1, 0]), task)
    assert reg.shape == (1, 3, 1, 1, 6)
    assert reg.dtype == torch.float32
    expected = torch.tensor(
        [
            [0, 1, 1, 1, 1, 0],  # kidney + tumour + cyst
            [0, 0, 1, 1, 0, 0],  # tumour + cyst
            [0, 0, 1, 0, 0, 0],  # tumour
        ],
        dtype=torch.float32,
    )
    assert torch.equal(reg[0, :, 0, 0], expected)


def test_brats2024_regions():
    task = get_task("brain3d")
    assert list(task.regions) == ["ET", "NETC", "SNFH", "RC", "TC", "WT"]
    reg = labels_to_regions(_label_map([0, 1, 2, 3, 4, 0]), task)
    assert reg.shape == (1, 6, 1, 1, 6)
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 0, 0],  # ET
            [0, 1, 0, 0, 0, 0],  # NETC
            [0, 0, 1, 0, 0, 0],  # SNFH
            [0, 0, 0, 0, 1, 0],  # RC (label 4): its own region, in neither TC nor WT
            [0, 1, 0, 1, 0, 0],  # TC = NETC + ET
            [0, 1, 1, 1, 0, 0],  # WT = NETC + SNFH + ET
        ],
        dtype=torch.float32,
    )
    assert torch.equal(reg[0, :, 0, 0], expected)


def test_regions_are_nested_as_hierarchies():
    kid, brain = get_task("kidney3d").regions, get_task("brain3d").regions
    assert set(kid["tumor"]) < set(kid["tumor_cyst"]) < set(kid["kidney_tumor_cyst"])
    assert set(brain["ET"]) < set(brain["TC"]) < set(brain["WT"])
    assert set(brain["NETC"]) < set(brain["TC"])
    assert set(brain["SNFH"]) | set(brain["TC"]) == set(brain["WT"])
    assert not set(brain["RC"]) & set(brain["WT"])  # BraTS 2024 GLI: RC outside the tumour regions


def test_labels_to_regions_rejects_multichannel():
    with pytest.raises(ValueError):
        labels_to_regions(torch.zeros(1, 2, 4, 4, 4), get_task("kidney3d"))


# -- transforms ----------------------------------------------------------------------------
def _single(out):
    # patch sampling returns a list of samples (num_samples); a plain dict otherwise
    if isinstance(out, list):
        assert len(out) >= 1
        return out[0]
    return out


@pytest.mark.parametrize("name", TASKS_3D)
def test_val_transforms(name, datalists):
    task = get_task(name)
    entry = datalists[name]["validation"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = task.val_transforms(SIZE)(entry)
    img, lab = d["image"], d["label"]
    assert isinstance(img, torch.Tensor) and isinstance(lab, torch.Tensor)
    assert tuple(img.shape) == (task.in_channels, SIZE, SIZE, SIZE)
    assert tuple(lab.shape) == (1, SIZE, SIZE, SIZE)
    assert img.dtype == torch.float32
    assert not lab.dtype.is_floating_point
    assert torch.isfinite(img).all()
    assert set(lab.unique().tolist()) <= set(task.label_values)
    assert (lab > 0).any()
    if name == "kidney3d":
        # CT window clipped to [0, 1], air at 0
        assert float(img.min()) == 0.0 and float(img.max()) <= 1.0
    else:
        # per-channel z-score over brain voxels, background kept at 0
        brain = (img != 0).any(0)
        assert brain.float().mean() > 0.2 and not brain.all()
        vox = img[:, brain]
        assert torch.allclose(vox.mean(1), torch.zeros(4), atol=0.05)
        assert torch.allclose(vox.std(1), torch.ones(4), atol=0.05)


@pytest.mark.parametrize("name", TASKS_3D)
def test_train_transforms(name, datalists):
    task = get_task(name)
    entry = datalists[name]["training"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = _single(task.train_transforms(SIZE)(entry))
        # a patch smaller than the image is cropped to the patch
        small = dataclasses.replace(task, patch_size=(16, 16, 16))
        p = _single(small.train_transforms(SIZE)(entry))
    # the default patch is larger than this tiny image: the crop keeps the whole image
    assert tuple(d["image"].shape) == (task.in_channels, SIZE, SIZE, SIZE)
    assert tuple(d["label"].shape) == (1, SIZE, SIZE, SIZE)
    assert tuple(p["image"].shape) == (task.in_channels, 16, 16, 16)
    assert tuple(p["label"].shape) == (1, 16, 16, 16)
    for out in (d, p):
        assert out["image"].dtype == torch.float32
        assert not out["label"].dtype.is_floating_point
        assert set(out["label"].unique().tolist()) <= set(task.label_values)


def test_brain_channels_follow_the_datalist_order(datalists):
    """The four modality files become channels 0..3 in datalist order (T1n, T1c, T2w, FLAIR)."""
    import nibabel as nib
    import numpy as np
    from monai import transforms as mt

    entry = datalists["brain3d"]["validation"][0]
    assert [p.rsplit("_", 1)[1] for p in entry["image"]] == [
        "t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
    d = mt.Compose([mt.LoadImaged(keys="image", image_only=True), mt.EnsureChannelFirstd(keys="image")])(entry)
    assert d["image"].shape[0] == 4
    for c, path in enumerate(entry["image"]):
        assert np.array_equal(np.asarray(d["image"][c]), nib.load(path).get_fdata())


# -- network ---------------------------------------------------------------------------------
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("name, spatial", [("skin2d", (32, 32)), ("kidney3d", (32,) * 3), ("brain3d", (32,) * 3)])
def test_task_network_forward(name, spatial, network):
    task = get_task(name)
    net = TaskNetwork(name, network).eval()
    with torch.no_grad():
        out = net(torch.randn(2, task.in_channels, *spatial))
    assert tuple(out.shape) == (2, task.num_classes, *spatial)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_both_networks_have_only_registered_per_sample_gradients(name):
    """Every parametrised layer of both variants has an Opacus grad sampler once the DP-SGD trainer's
    module has registered the hand-written ones (no functorch fallback), Opacus' validator accepts
    them, and the `dp` variant is as large as the standard UNet (the same channels; only the
    up-sampling convolutions' shapes differ)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    import adpfl.training.dpsgd  # noqa: F401  (registers adpfl.training.grad_samplers)

    dp, std, ws = TaskNetwork(name, "dp"), TaskNetwork(name), TaskNetwork(name, "dp_ws")
    for net in (dp, std, ws):
        layers = {type(m) for m in net.modules() if any(True for _ in m.parameters(recurse=False))}
        assert layers and layers <= set(GradSampleModule.GRAD_SAMPLERS), layers
        assert ModuleValidator.validate(net, strict=True) == []
    assert not {torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d} & {type(m) for m in dp.modules()}
    n_dp, n_std = (sum(p.numel() for p in m.parameters()) for m in (dp, std))
    assert abs(n_dp - n_std) / n_std < 0.01
    # dp_ws: dp's parameters and state-dict keys; weight-standardised convolutions exactly where a
    # normalisation follows, never the output convolution
    from monai.networks.blocks import Convolution

    from adpfl.tasks.dp_unet import WSConv2d, WSConv3d

    assert list(ws.state_dict()) == list(dp.state_dict())
    ws_convs = [m for m in ws.modules() if isinstance(m, (WSConv2d, WSConv3d))]
    normed = [b for b in ws.modules() if isinstance(b, Convolution) and getattr(b, "adn", None) is not None
              and "N" in b.adn._modules]
    assert ws_convs and len(ws_convs) == len(normed)
    assert not isinstance(list(ws.modules())[-1], (WSConv2d, WSConv3d))
    assert not [m for m in dp.modules() if isinstance(m, (WSConv2d, WSConv3d))]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_small_variants_are_the_same_unet_narrower(name):
    """`small` / `dp_small`: the same UNet (and the same up-sampling of their full-width variant)
    with every level's channels divided by SMALL_CHANNEL_DIVISOR and one residual unit a level,
    so several times fewer parameters (DP-SGD's noise norm grows with the square root of their
    number); every parametrised layer keeps a registered per-sample gradient."""
    from opacus import GradSampleModule

    import adpfl.training.dpsgd  # noqa: F401  (registers adpfl.training.grad_samplers)

    task = get_task(name)
    for small, full in (("small", "standard"), ("dp_small", "dp")):
        s_net, f_net = TaskNetwork(name, small), TaskNetwork(name, full)
        convs = [m for m in s_net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        assert max(m.out_channels for m in convs) == task.unet_channels[-1] // SMALL_CHANNEL_DIVISOR
        n_small, n_full = (sum(p.numel() for p in m.parameters()) for m in (s_net, f_net))
        assert n_small < n_full / 4, (small, n_small, n_full)
        assert ({type(m) for m in s_net.modules()} - {type(m) for m in f_net.modules()}) == set()
        layers = {type(m) for m in s_net.modules() if any(True for _ in m.parameters(recurse=False))}
        assert layers <= set(GradSampleModule.GRAD_SAMPLERS), layers


def test_network_setting_is_checked():
    from adpfl.training.site import SiteConfig

    with pytest.raises(ValueError, match="network"):
        TaskNetwork("skin2d", "fast")
    with pytest.raises(ValueError, match="network"):
        SiteConfig(network="DP").validate()


# -- one local epoch ------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS_3D)
def test_local_trainer_one_epoch(name, datalists):
    torch.manual_seed(0)
    task = get_task(name)
    cfg = TrainConfig(local_epochs=1, batch_size=2, image_size=SIZE, device="cpu", amp=False)
    trainer = LocalTrainer(task, datalists[name], cfg)
    model = TaskNetwork(name)
    cached = [{k: v.clone() for k, v in it.items() if isinstance(v, torch.Tensor)} for it in trainer.train_ds._cache]
    res = trainer.train(model)
    assert res["steps"] == 1 and res["samples"] == 2 and not res["aborted"]
    # the random transforms never touch the cached items (the cache is not copied per epoch)
    for before, item in zip(cached, trainer.train_ds._cache):
        assert all(torch.equal(v, item[k]) for k, v in before.items())
    batch = next(iter(trainer._loader(True, trainer.train_ds, 2)))
    assert type(batch["image"]) is torch.Tensor and type(batch["label"]) is torch.Tensor  # no MetaTensor overhead
    assert math.isfinite(res["loss"]) and res["loss"] > 0
    metrics = trainer.evaluate(model)
    families = {"kidney3d": ["dice", "hd95", "sdice"], "brain3d": ["dice", "hd95", "lesion_dice", "lesion_hd95"]}[name]
    expected = {f"{f}_{r}" for f in families for r in task.regions} | {f"{f}_mean" for f in families}
    assert set(metrics) == expected
    for r in task.regions:  # the one validation case is scored for every region (no NaN, no skipped case)
        assert 0.0 <= metrics[f"dice_{r}"] <= 1.0
        assert math.isfinite(metrics[f"hd95_{r}"]) and metrics[f"hd95_{r}"] >= 0.0
    assert metrics["dice_mean"] == pytest.approx(sum(metrics[f"dice_{r}"] for r in task.regions) / len(task.regions))


def test_local_trainer_sliding_window_when_image_exceeds_patch(datalists):
    """Patch training at 16^3 and sliding-window evaluation over the 32^3 volume."""
    torch.manual_seed(0)
    task = dataclasses.replace(get_task("kidney3d"), patch_size=(16, 16, 16))
    cfg = TrainConfig(local_epochs=1, batch_size=2, image_size=SIZE, device="cpu", amp=False)
    trainer = LocalTrainer(task, datalists["kidney3d"], cfg)
    model = TaskNetwork("kidney3d")
    assert math.isfinite(trainer.train(model)["loss"])
    with torch.no_grad():
        x = trainer.val_ds[0]["image"][None]
        assert tuple(trainer._predict(model.eval(), x).shape) == (1, task.num_classes, SIZE, SIZE, SIZE)
    metrics = trainer.evaluate(model, with_hd95=False)
    assert set(metrics) == {f"{f}_{r}" for f in ("dice", "sdice") for r in task.regions} | {"dice_mean", "sdice_mean"}
