"""Setting ``trainable``: which parameters local training updates (NP-FL and DP-SGD)."""

import warnings

import pytest
import torch

from adpfl.data import ensure_site_data, load_site_datalist
from adpfl.privacy.config import DPSGDConfig
from adpfl.tasks.base import NETWORKS, TASK_NAMES, get_task
from adpfl.tasks.network import TRAINABLE, TaskNetwork, set_trainable, unet_parts
from adpfl.training.dpsgd import DPSGDTrainer
from adpfl.training.loop import LocalTrainer, TrainConfig

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("network", NETWORKS)
def test_unet_parts_partition_the_network_and_the_head_makes_the_classes(task, network):
    t = get_task(task)
    model = TaskNetwork(task, network)
    parts = unet_parts(model)
    ids = [id(p) for part in parts.values() for block in part for p in block.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one part
    assert len(parts["encoder"]) == len(parts["decoder"]) == len(t.unet_strides)
    head_convs = [m for m in parts["decoder"][0].modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d,
                                                                                torch.nn.ConvTranspose2d,
                                                                                torch.nn.ConvTranspose3d))]
    assert head_convs[-1].out_channels == t.num_classes
    first = [m for m in parts["encoder"][0].modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert first[0].in_channels == t.in_channels
    counts = {w: set_trainable(model, w) for w in TRAINABLE}
    total = sum(p.numel() for p in model.parameters())
    assert counts["all"] == (total, total)
    assert counts["head"][0] < counts["decoder"][0] < total
    assert counts["head"][0] == sum(p.numel() for p in parts["decoder"][0].parameters())


def test_bad_trainable_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="encoder").validate()
    with pytest.raises(ValueError, match="trainable"):
        set_trainable(TaskNetwork("skin2d"), "bias")
    with pytest.raises(ValueError, match="no MONAI UNet"):
        set_trainable(torch.nn.Linear(2, 2), "head")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainable")
    ensure_site_data("skin2d", root, "site-1", num_train=8, num_val=2, size=32, seed=0)
    return load_site_datalist(root, "site-1", task="skin2d")


def _split(model, trainable):
    parts = unet_parts(model)
    blocks = parts["decoder"] if trainable == "decoder" else parts["decoder"][:1]
    train_ids = {id(p) for b in blocks for p in b.parameters()}
    return ([n for n, p in model.named_parameters() if id(p) in train_ids],
            [n for n, p in model.named_parameters() if id(p) not in train_ids])


def _changed(before, model):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("trainable", ["decoder", "head"])
def test_local_training_updates_only_the_trainable_part(site, trainable):
    torch.manual_seed(0)
    cfg = TrainConfig(local_epochs=1, batch_size=4, image_size=32, device="cpu", learning_rate=1e-2,
                      trainable=trainable, seed=0)
    tr = LocalTrainer(get_task("skin2d"), site, cfg)
    model = TaskNetwork("skin2d")
    trained, frozen = _split(model, trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr.train(model)
    changed = _changed(before, model)
    assert changed and changed <= set(trained)
    assert not changed & set(frozen)
    opt_params = [p for g in tr.optimizer_for(model).param_groups for p in g["params"]]
    assert len(opt_params) == len(trained)


def test_dpsgd_adds_noise_only_to_the_trainable_part_and_accounts_the_same(site):
    """With a huge noise multiplier a frozen parameter would move if it got any noise; it does
    not. The accounting is per step (z, q), independent of how many parameters train."""
    task = get_task("skin2d")
    eps = {}
    for trainable in ("all", "head"):
        cfg = TrainConfig(local_epochs=1, batch_size=4, image_size=32, device="cpu", learning_rate=1.0,
                          trainable=trainable)
        dp = DPSGDConfig(target_epsilon=None, delta=1e-5, planned_rounds=1, max_grad_norm=1.0,
                         noise_multiplier=100.0, optimizer="sgd")
        tr = DPSGDTrainer(task, site, cfg, dp)
        model = TaskNetwork("skin2d")
        trained, frozen = _split(model, "head")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = tr.train(model)
        assert out["steps"] == 2
        changed = _changed(before, model)
        if trainable == "head":
            assert changed == set(trained)  # every head parameter got its noise
            assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        else:
            assert set(frozen) <= changed
        eps[trainable] = out["epsilon"]
    assert eps["head"] == pytest.approx(eps["all"], rel=1e-12)


@pytest.mark.parametrize("trainable", ["all", "head"])
def test_per_record_gradient_norms_match_one_record_at_a_time(site, trainable):
    from adpfl.training.dpsgd import per_record_gradient_norms

    cfg = TrainConfig(image_size=32, device="cpu", batch_size=4)
    tr = LocalTrainer(get_task("skin2d"), site, cfg)
    torch.manual_seed(1)
    model = TaskNetwork("skin2d")
    norms = per_record_gradient_norms(model, tr, trainable, chunk=3)  # chunks of 3, 3, 2 records
    assert norms.shape == (len(tr.train_ds),)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == set_trainable(model, trainable)[0]
    for i in range(len(tr.train_ds)):
        d = tr.train_ds[i]
        x, y = torch.as_tensor(d["image"])[None], torch.as_tensor(d["label"])[None]
        grads = torch.autograd.grad(tr.loss_fn(model(x), y), params)
        expected = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        assert float(norms[i]) == pytest.approx(float(expected), rel=1e-4)
