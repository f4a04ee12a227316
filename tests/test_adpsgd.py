"""ADP-SGD (record-level adaptivity) and the DP-training options: unit tests on tiny data.

Unit of every epsilon here: one training record (image), delta 1e-5, Opacus RDP (enforced)
and PRV (reported).
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample import GradSampleModule

from adpfl.data import ensure_site_data, load_site_datalist
from adpfl.privacy.config import DPSGDConfig
from adpfl.privacy.errors import PrivacyConfigError
from adpfl.privacy.metadata import check_record_meta
from adpfl.privacy.record_adaptive import (
    QuantileClip,
    effective_noise_multiplier,
    gradient_noise_multiplier,
)
from adpfl.tasks.base import get_task
from adpfl.training.dp_noise import RecordDPOptimizer
from adpfl.training.dpsgd import DPSGDTrainer
from adpfl.training.loop import TrainConfig
from adpfl.training.site import SiteConfig, SiteSession

DELTA = 1e-5


def test_effective_noise_composition_and_its_inverse():
    z_g = gradient_noise_multiplier(1.2, 10.0)
    assert z_g > 1.2
    assert math.isclose(effective_noise_multiplier(z_g, 10.0), 1.2, rel_tol=1e-12)
    with pytest.raises(PrivacyConfigError, match="clip_count_noise"):
        gradient_noise_multiplier(3.0, 1.0)  # 2 * sigma_b must exceed z


def test_quantile_clip_moves_towards_the_target_quantile_with_a_public_normaliser():
    clip = QuantileClip(1.0, target_quantile=0.5, learning_rate=0.2, expected_batch_size=8)
    # all 8 records unclipped: centred count +4 -> fraction 1 > 0.5 -> the clip shrinks
    assert clip.update(4.0) < 1.0
    # none unclipped: fraction 0 -> it grows
    c = clip.clip
    assert clip.update(-4.0) > c
    # noise-free run on fixed norms converges near their median
    norms = torch.linspace(0.1, 3.0, 64)
    q = QuantileClip(0.2, 0.5, 0.2, expected_batch_size=64)
    for _ in range(300):
        q.update(float((norms <= q.clip).sum()) - 32)
    assert abs(q.clip - float(norms.median())) < 0.1


def _grad_rows(model, x, y):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    loss = torch.nn.functional.mse_loss(gsm(x), y)
    loss.backward()
    return gsm


def test_augmult_clips_one_averaged_gradient_per_record():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    base = torch.optim.SGD(model.parameters(), lr=0.0)
    k, clip = 4, 0.05
    x = torch.randn(3 * k, 6) * 50  # 3 records x K copies, large gradients: every row is clipped
    y = torch.randn(3 * k, 1) * 50
    gsm = _grad_rows(model, x, y)
    raw = [p.grad_sample.clone() for p in model.parameters()]
    opt = RecordDPOptimizer(base, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=3, augmult=k)
    opt.clip_and_accumulate()
    # one row per record, the mean of its K copies' gradients
    for p, r in zip(model.parameters(), raw):
        assert p.grad_sample.shape[0] == 3
        assert torch.allclose(p.grad_sample, r.reshape(3, k, *r.shape[1:]).mean(1), atol=1e-6)
    # the clipped sum of one record has norm <= C (records 2, 3 removed: the contribution of record 1)
    gsm._close()
    model.zero_grad()
    for p in model.parameters():
        p.summed_grad = None
    _grad_rows(model, x[:k], y[:k])
    opt = RecordDPOptimizer(base, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=3, augmult=k)
    opt.clip_and_accumulate()
    total = math.sqrt(sum(float(p.summed_grad.pow(2).sum()) for p in model.parameters()))
    assert total <= clip * (1 + 1e-5)


def test_data_independent_mask_keeps_noise_and_gradient_off_masked_coordinates():
    from adpfl.training.dp_extras import random_mask

    torch.manual_seed(0)
    model = torch.nn.Linear(50, 40)
    mask = random_mask(model, 0.3, torch.Generator().manual_seed(3))
    kept = sum(float(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert 0.2 < kept < 0.4
    _grad_rows(model, torch.randn(5, 50), torch.randn(5, 40))
    opt = RecordDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=5, mask=mask, generator=torch.Generator().manual_seed(4))
    opt.step()
    for p in model.parameters():
        assert torch.all(p.grad[mask[p] == 0] == 0) and torch.all(p.grad[mask[p] == 1] != 0)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adpsgd")
    for site, n in (("site-1", 8), ("n2", 2), ("n3", 3)):
        ensure_site_data("skin2d", str(root), site, num_train=n, num_val=2, size=32, seed=0)
    return root


@pytest.mark.parametrize("site", ["n2", "n3", "site-1"])
def test_noisy_sum_is_normalised_by_a_public_constant_not_n(tiny_root, site):
    """Opacus issue #819: at tiny n (here n < batch_size, q = 1) a normaliser taken from the
    data (the realised n, or q * n) would change with n; ours is the configured batch size."""
    cfg = TrainConfig(local_epochs=1, batch_size=4, image_size=32, device="cpu")
    trainer = DPSGDTrainer(get_task("skin2d"), load_site_datalist(str(tiny_root), site, task="skin2d"), cfg,
                           DPSGDConfig(noise_multiplier=2.0, max_grad_norm=0.5))
    assert trainer.expected_batch_size == 4
    p = torch.nn.Parameter(torch.zeros(20000))
    model = torch.nn.Module()
    model.p = p
    opt = trainer.make_optimizer(model, torch.Generator().manual_seed(1))
    assert opt.expected_batch_size == 4
    p.grad_sample = torch.zeros((0, 20000))  # an empty Poisson batch: pure noise
    opt.step()
    assert abs(float(p.grad.std()) / (2.0 * 0.5 / 4) - 1) < 0.03


def test_adpsgd_rounds_account_every_step_and_are_reproduced_independently(tiny_root, tmp_path):
    dp = DPSGDConfig(target_epsilon=4.0, planned_rounds=2, adaptive=True, augmult=2, ema_decay=0.5,
                     physical_batch_size=2)
    s = SiteSession("site-1", SiteConfig(task="skin2d", num_train=8, num_val=2, dpsgd=True, hd95=False),
                    TrainConfig(local_epochs=1, batch_size=4, image_size=32, device="cpu", learning_rate=1e-3), dp)
    s.setup(str(tiny_root), ledger_folder=str(tmp_path))
    w = {k: v.detach().numpy().copy() for k, v in s.model.state_dict().items()}
    metas = []
    for r in range(2):
        s.load_global(w)
        res = s.train_round(w, r, job_id="t")
        assert res.steps == s.trainer.steps_per_round  # logical steps, virtual batches not counted
        metas.append(res.record_meta)
        w = {k: w[k] + res.diff[k] for k in w}
    meta = metas[-1]
    assert meta["mechanism"] == "adpsgd" and meta["clip_count_noise"] == 10.0
    hist = meta["history"]
    assert len(hist) == 2 and hist[0][0] != hist[1][0]  # heterogeneous (z, q, steps)
    # the server's check recomputes it; an independent Opacus RDP accountant fed step by step agrees
    assert check_record_meta(meta, DELTA)["epsilon_recomputed"] == pytest.approx(meta["epsilon_rdp"], rel=1e-9)
    acc = RDPAccountant()
    for z, q, n in hist:
        for _ in range(int(n)):
            acc.step(noise_multiplier=z, sample_rate=q)
    assert acc.get_epsilon(DELTA) == pytest.approx(meta["epsilon_rdp"], rel=0.01)
    # the schedule spends the planned budget: within 1 % below the target, never above
    assert 0.99 * 4.0 <= meta["epsilon_rdp"] <= 4.0
    assert hist[0][0] > hist[1][0]  # more noise while the model still changes fast
    prv = PRVAccountant()
    prv.history = [tuple(h) for h in hist]
    assert 0 < prv.get_epsilon(DELTA) <= meta["epsilon_rdp"]  # PRV: the tighter figure
    # a site that misstates how its noise splits is refused
    bad = dict(meta, gradient_noise_multiplier=meta["gradient_noise_multiplier"] * 0.9)
    with pytest.raises(ValueError, match="contradicts its gradient noise"):
        check_record_meta(bad, DELTA)


def test_adpsgd_job_and_settings():
    from adpfl.flare.jobs import _widget_args, job_settings

    s = job_settings("skin2d", "adpsgd")
    assert s["privacy"] is None and s["executor"]["dpsgd"] and s["executor"]["dpsgd_adaptive"]
    assert _widget_args(s["privacy"], s["executor"])["record_level"]
    with pytest.raises(PrivacyConfigError, match="augmult"):
        DPSGDConfig(noise_multiplier=1.0, augmult=0).validate()
    with pytest.raises(PrivacyConfigError, match="adaptive"):
        DPSGDConfig(noise_multiplier=1.0, adaptive=True).validate()


@pytest.mark.integration
def test_skin2d_adpsgd_simulator_run_is_reproduced_by_independent_accountants(tmp_path):
    """One tiny `skin2d_adpsgd` simulator run: each site's record-level epsilon (one training
    image, delta 1e-5), enforced by its ledger and recomputed by the server, is reproduced
    within 1 % by a fresh Opacus RDP accountant stepped through the recorded (z, q) history
    step by step; PRV (reported) is the smaller figure."""
    from flare_helpers import load_json, run_dir, run_simulator, tiny_job

    job = tiny_job(tmp_path, "skin2d", "adpsgd", num_rounds=2)
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = load_json(run_dir(ws) / "privacy_report.json")
    rec = report["record_level"]
    assert rec["delta"] == DELTA and report["rejected_contributions"] == []
    assert set(rec["sites"]) == {"site-1", "site-2", "site-3"}
    for site, info in rec["sites"].items():
        assert info["mechanism"] == "adpsgd" and info["rounds"] == [0, 1]
        hist = info["history"]
        assert len(hist) == 2 and hist[0][0] != hist[1][0]
        acc = RDPAccountant()
        for z, q, n in hist:
            for _ in range(int(n)):
                acc.step(noise_multiplier=z, sample_rate=q)
        assert acc.get_epsilon(DELTA) == pytest.approx(info["epsilon_rdp"], rel=0.01)
        ledger = load_json(ws / "local" / "adpfl_privacy" / site / "dpsgd_skin2d.json")
        assert ledger["entries"][-1]["epsilon_rdp"] == pytest.approx(info["epsilon_rdp"], rel=1e-9)
        assert 0 < info["epsilon_prv"] <= info["epsilon_rdp"] <= rec["target_epsilon"]


def test_a_declared_public_record_count_hides_the_true_one(tmp_path):
    """With ``public_num_records`` nothing the site releases depends on its true n: sites
    with 39 and 40 training images declaring 100 report the same q, steps, z and epsilon
    (the noisy sum's normaliser is the public batch size: the test above)."""
    metas = []
    for n in (39, 40):
        root = tmp_path / f"n{n}"
        ensure_site_data("skin2d", str(root), "site-1", num_train=n, num_val=1, size=(32, 32), seed=0)
        dp = DPSGDConfig(target_epsilon=8.0, planned_rounds=2, max_grad_norm=1.0)
        s = SiteSession("site-1", SiteConfig(task="skin2d", num_train=n, num_val=1, dpsgd=True, hd95=False),
                        TrainConfig(local_epochs=1, batch_size=10, image_size=32, device="cpu"), dp)
        lines = s.setup(str(root), ledger_folder=str(root / "ledgers"), public_num_records=100)
        assert "declared public record count 100" in lines[-1]
        t = s.trainer
        assert t.sample_rate == pytest.approx(0.1) and t.steps_per_round == 10 and t.expected_batch_size == 10
        # what a round would report (sample_rate, steps_per_round, noise_multiplier, epsilon)
        metas.append((t.sample_rate, t.steps_per_round, t.noise_multiplier, t.projected_epsilon()))
    assert metas[0] == metas[1]
    # without a declaration q is batch / true n (and reveals it)
    t = DPSGDTrainer(get_task("skin2d"), load_site_datalist(str(tmp_path / "n40"), "site-1", task="skin2d"),
                     TrainConfig(batch_size=10, image_size=32, device="cpu"), DPSGDConfig(noise_multiplier=1.0))
    assert t.sample_rate == pytest.approx(10 / 40)
    with pytest.raises(PrivacyConfigError, match="public_num_records"):
        DPSGDConfig(noise_multiplier=1.0, public_num_records=0).validate()


def test_augmult_views_of_a_3d_crop_are_one_row_each():
    """The 3D tasks' training transforms return a one-patch list per draw (MONAI's random crop);
    with augmentation multiplicity each view is that patch, so a record's K views collate to K
    contiguous rows (they used to collate to a list, and DP-SGD training stopped with a TypeError)."""
    from monai.data import list_data_collate

    from adpfl.training.dp_extras import AugmentedCopies

    class Crops(torch.utils.data.Dataset):
        def __init__(self, per_draw=1):
            self.per_draw = per_draw

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return [{"image": torch.full((1, 4, 4, 4), float(i)), "label": torch.zeros(1, 4, 4, 4)}
                    for _ in range(self.per_draw)]

    ds = AugmentedCopies(Crops(), 2)
    batch = list_data_collate([ds[0], ds[2]])
    assert isinstance(batch, dict) and tuple(batch["image"].shape) == (4, 1, 4, 4, 4)
    assert [float(v) for v in batch["image"][:, 0, 0, 0, 0]] == [0.0, 0.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="dpsgd_augmult needs one training sample per draw"):
        AugmentedCopies(Crops(per_draw=2), 2)[0]
