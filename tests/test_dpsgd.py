"""Record-level DP-SGD trainer (Opacus) on tiny synthetic skin2d data."""

import math
import warnings

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from adpfl.data import ensure_site_data, load_site_datalist
from adpfl.privacy.config import DPSGDConfig
from adpfl.privacy.record import PRIVACY_UNIT
from adpfl.tasks.base import get_task
from adpfl.training.dpsgd import DPSGDTrainer, dpsgd_network
from adpfl.training.loop import TrainConfig

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpsgd")
    ensure_site_data("skin2d", root, "site-1", num_train=8, num_val=2, size=32, seed=0)
    return load_site_datalist(root, "site-1", task="skin2d")


def _trainer(site, **dp):
    cfg = TrainConfig(local_epochs=1, batch_size=4, image_size=32, device="cpu", learning_rate=1e-3)
    dp = {"target_epsilon": 8.0, "delta": 1e-5, "planned_rounds": 3, "max_grad_norm": 1.0, **dp}
    return DPSGDTrainer(get_task("skin2d"), site, cfg, DPSGDConfig(**dp))


def test_trains_composes_and_matches_independent_opacus_rdp(site):
    torch.manual_seed(0)
    tr = _trainer(site, noise_multiplier=1.0)  # calibration is tested below; fixed z keeps this fast
    model = dpsgd_network(get_task("skin2d"))
    keys = list(model.state_dict())
    r1 = tr.train(model)
    assert math.isfinite(r1["loss"]) and r1["steps"] == 2 and not r1["aborted"]
    assert r1["privacy_unit"] == PRIVACY_UNIT
    # independent Opacus RDP for the same (z, q, steps) history
    acc = RDPAccountant()
    acc.history = [(r1["noise_multiplier"], 0.5, 2)]
    assert r1["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    # the caller's model is a plain module again, and is reloaded with "global" weights
    assert list(model.state_dict()) == keys
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    r2 = tr.train(model)
    assert r2["epsilon"] > r1["epsilon"]
    acc.history = [(r1["noise_multiplier"], 0.5, 4)]
    assert r2["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert "dice_mean" in tr.evaluate(model, with_hd95=False)


def test_calibration_hits_target_over_planned_rounds(site):
    tr = _trainer(site, target_epsilon=4.0, planned_rounds=5)
    # same calibration computed independently: 5 rounds * 1 epoch * int(1/q)=2 steps, q = 4/8
    z = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.5, steps=10)
    assert tr.noise_multiplier == pytest.approx(z)
    acc = RDPAccountant()
    acc.history = [(tr.noise_multiplier, 0.5, 10)]
    eps = acc.get_epsilon(delta=1e-5)
    assert 4.0 * 0.97 <= eps <= 4.0
    # projected epsilon of the whole plan equals the target within tolerance
    assert tr.projected_epsilon(10) == pytest.approx(eps, rel=1e-9)


def test_refuses_past_budget(site):
    from adpfl.privacy.errors import BudgetExhausted

    # z = 0.8: one round (2 steps at q = 0.5) spends 7.36, a second would reach 10.27 > 8
    tr = _trainer(site, target_epsilon=8.0, planned_rounds=1, noise_multiplier=0.8)
    model = dpsgd_network(get_task("skin2d"))
    tr.train(model)
    hist = tr.history
    with pytest.raises(BudgetExhausted):
        tr.train(model)
    assert tr.history == hist


@pytest.mark.parametrize("network", ["standard", "dp"])
def test_per_sample_grads_of_3d_unet_match_microbatches(network):
    """Both 3D network variants work with Opacus: the MONAI UNet (PReLU, InstanceNorm,
    ConvTranspose3d) and the `dp` variant, with the grad samplers the trainer's module registers
    (adpfl.training.grad_samplers, imported above with adpfl.training.dpsgd)."""
    from monai.networks.nets import UNet
    from opacus import GradSampleModule

    from adpfl.tasks.dp_unet import DPUNet

    torch.manual_seed(0)
    net = {"standard": UNet, "dp": DPUNet}[network](3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2)
    gsm = GradSampleModule(net, loss_reduction="sum")
    x = torch.randn(2, 1, 16, 16, 16)
    (gsm(x) ** 2).sum().backward()
    saved = {n: p.grad_sample.clone() for n, p in net.named_parameters()}
    gsm._close()
    net.zero_grad()
    (net(x[1:2]) ** 2).sum().backward()
    num = sum(float((saved[n][1] - p.grad).norm() ** 2) for n, p in net.named_parameters())
    den = sum(float(p.grad.norm() ** 2) for p in net.parameters())
    assert math.sqrt(num / den) < 1e-4


# ---------------------------------------------------------------- record-level ledger
def test_calibration_with_prior_spend_meets_the_remaining_budget():
    from adpfl.privacy.record import calibrate_with_prior, opacus_rdp_epsilon

    z0 = calibrate_with_prior([], 8.0, 1e-5, 0.25, 40)
    assert z0 == pytest.approx(get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.25,
                                                    steps=40), rel=1e-6)
    # half the plan spent at a larger z: the rest may use a smaller one, still within the target
    prior = [(2 * z0, 0.25, 20)]
    z1 = calibrate_with_prior(prior, 8.0, 1e-5, 0.25, 20)
    total = opacus_rdp_epsilon(prior + [(z1, 0.25, 20)], 1e-5)
    assert z1 < z0 and 8.0 - 0.01 <= total <= 8.0


def test_calibration_refuses_when_prior_spend_reaches_the_target():
    from adpfl.privacy.errors import BudgetExhausted
    from adpfl.privacy.record import calibrate_with_prior

    with pytest.raises(BudgetExhausted, match="already spent"):
        calibrate_with_prior([(0.5, 0.5, 50)], 2.0, 1e-5, 0.5, 10)


def test_record_ledger_persists_composes_and_names_a_corrupt_file(tmp_path):
    from adpfl.privacy.errors import PrivacyConfigError, PrivacyError
    from adpfl.privacy.record import RecordLedger, opacus_rdp_epsilon

    path = str(tmp_path / "site-1" / "dpsgd_skin2d.json")
    led = RecordLedger.load_or_create(path, delta=1e-5)
    led.record(job_id="a", round=0, noise_multiplier=1.0, sample_rate=0.5, steps=2)
    led.record(job_id="b", round=3, noise_multiplier=1.2, sample_rate=0.5, steps=2)
    led.save()
    again = RecordLedger.load_or_create(path, delta=1e-5)
    assert again.history() == [(1.0, 0.5, 2), (1.2, 0.5, 2)]
    assert again.epsilon() == pytest.approx(opacus_rdp_epsilon([(1.0, 0.5, 2), (1.2, 0.5, 2)], 1e-5))
    with pytest.raises(PrivacyConfigError, match="delta"):
        RecordLedger.load_or_create(path, delta=1e-6)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PrivacyError, match="bad.json"):
        RecordLedger.load_or_create(str(tmp_path / "bad.json"), delta=1e-5)


def test_trainer_continues_from_prior_history(site):
    tr = _trainer(site, target_epsilon=8.0, planned_rounds=2)
    prior = [(tr.noise_multiplier, tr.sample_rate, tr.steps_per_round)]
    cfg = TrainConfig(local_epochs=1, batch_size=4, image_size=32, device="cpu", learning_rate=1e-3)
    resumed = DPSGDTrainer(get_task("skin2d"), site, cfg,
                           DPSGDConfig(target_epsilon=8.0, delta=1e-5, planned_rounds=1), prior_history=prior)
    # one of the two planned rounds already spent: the same z finishes the plan
    assert resumed.noise_multiplier == pytest.approx(tr.noise_multiplier, rel=2e-3)
    assert resumed.epsilon() > 0
    model = dpsgd_network(get_task("skin2d"))
    out = resumed.train(model)
    assert out["epsilon"] <= 8.0
    assert resumed.history[0] == prior[0]


# ---------------------------------------------------------------- server-side check
def _record_meta(**over):
    meta = {"unit": "record", "mechanism": "dpsgd", "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.5,
            "max_grad_norm": 1.0, "steps_per_round": 2, "round": 0, "history": [[1.0, 0.5, 2]],
            "epsilon_rdp": 1.0}
    meta.update(over)
    return meta


def test_record_meta_is_recomputed_not_trusted():
    from adpfl.privacy.metadata import check_record_meta
    from adpfl.privacy.record import opacus_rdp_epsilon

    true_eps = opacus_rdp_epsilon([(1.0, 0.5, 2)], 1e-5)
    out = check_record_meta(_record_meta(epsilon_rdp=true_eps), 1e-5)
    assert out["epsilon_recomputed"] == pytest.approx(true_eps) and true_eps > 1.0
    # a claim that contradicts the site's own history is refused, not averaged or trusted
    with pytest.raises(ValueError, match="contradicts its own history"):
        check_record_meta(_record_meta(epsilon_rdp=0.001), 1e-5)


@pytest.mark.parametrize("meta,match", [
    (None, "no record-level"),
    (_record_meta(history=[]), "history is empty"),
    (_record_meta(history=[[0.0, 0.5, 2]]), "invalid"),
    (_record_meta(delta=1e-3), "delta"),
    (_record_meta(noise_multiplier=float("nan")), "noise_multiplier"),
    ({k: v for k, v in _record_meta().items() if k != "history"}, "lacks"),
    (_record_meta(noise_scale=1.0), "unknown fields"),
    (_record_meta(noise_multiplier=2.0), "contradicts its history"),
    (_record_meta(sample_rate=0.25), "contradicts its history"),
])
def test_record_meta_rejections(meta, match):
    from adpfl.privacy.metadata import check_record_meta

    with pytest.raises(ValueError, match=match):
        check_record_meta(meta, 1e-5)


def test_dpsgd_job_settings():
    from adpfl.flare.jobs import _widget_args, job_settings

    s = job_settings("skin2d", "dpsgd", num_rounds=3)
    assert s["privacy"] is None  # no update-level filter
    ex = s["executor"]
    assert ex["dpsgd"] is True and ex["dpsgd_planned_rounds"] == 3 and ex["dpsgd_target_epsilon"] == 8.0
    w = _widget_args(s["privacy"], ex)
    assert w["update_level"] is False and w["record_level"] is True and w["record_target_epsilon"] == 8.0
    # the standard UNet (fast per-sample gradients, full NP-FL utility); an override wins
    assert ex["network"] == "standard" and job_settings("kidney3d", "adpsgd")["executor"]["network"] == "standard"
    assert job_settings("brain3d", "dpsgd", executor={"network": "dp"})["executor"]["network"] == "dp"
    # an update-level job's widget does not require record-level metadata
    s2 = job_settings("skin2d", "adpfl")
    assert "record_level" not in _widget_args(s2["privacy"], s2["executor"])


def test_refuses_any_excess_over_the_target(site):
    """A fixed z whose plan overshoots the target by 0.2% (like 8.018 for 8) trains while it
    fits and is refused at the round that would cross; the old 1.01 x tolerance let it through."""
    from adpfl.privacy.errors import BudgetExhausted
    from adpfl.training.dpsgd import opacus_rdp_epsilon

    eps2 = opacus_rdp_epsilon([(1.0, 0.5, 4)], 1e-5)  # two rounds of 2 steps at q = 4/8
    tr = _trainer(site, target_epsilon=eps2 / 1.002, planned_rounds=2, noise_multiplier=1.0)
    model = dpsgd_network(get_task("skin2d"))
    tr.train(model)
    assert tr.projected_epsilon() > tr.dp.target_epsilon
    with pytest.raises(BudgetExhausted):
        tr.train(model)
    assert tr.epsilon() <= tr.dp.target_epsilon


def test_calibration_lands_on_the_safe_side():
    from adpfl.training.dpsgd import calibrate_with_prior, opacus_rdp_epsilon

    # q = 1 keeps Opacus' RDP closed-form (fast); both branches (no prior: Opacus; prior: bisection)
    for prior, q, steps in [([], 1.0, 6), ([(1.3, 0.5, 4)], 1.0, 6)]:
        z = calibrate_with_prior(prior, 8.0, 1e-5, q, steps)
        eps = opacus_rdp_epsilon(list(prior) + [(z, q, steps)], 1e-5)
        assert 8.0 - 0.011 <= eps <= 8.0 * (1 - 1e-9)


def test_trainer_adds_noise_in_float64(site, monkeypatch):
    """Opacus' optimizer in the trainer is the float64-noise subclass: every step's noise
    goes through it, with Opacus' own std (z * max_grad_norm)."""
    import adpfl.training.dp_noise as dp_noise

    calls = []
    real = dp_noise.gaussian_noised

    def spy(values, std, generator, out_dtype):
        calls.append((std, values.dtype, out_dtype))
        return real(values, std, generator, out_dtype)

    monkeypatch.setattr(dp_noise, "gaussian_noised", spy)
    tr = _trainer(site, noise_multiplier=1.5, max_grad_norm=0.7)
    model = dpsgd_network(get_task("skin2d"))
    tr.train(model)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(calls) == 2 * n_params  # 2 steps, every parameter
    assert all(std == pytest.approx(1.5 * 0.7) and out == torch.float32 for std, _, out in calls)


def test_cosine_learning_rate_schedule_spans_the_planned_rounds(site):
    from adpfl.privacy.errors import PrivacyConfigError
    from adpfl.training.dp_extras import lr_factor

    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("cosine", 0, 5, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 2, 5, 0.1) == pytest.approx(0.55)  # half-way: mean of 1 and the final factor
    assert lr_factor("cosine", 4, 5, 0.1) == pytest.approx(0.1) == lr_factor("cosine", 9, 5, 0.1)
    with pytest.raises(PrivacyConfigError, match="lr_schedule"):
        DPSGDConfig(target_epsilon=8.0, planned_rounds=2, lr_schedule="linear").validate()
    with pytest.raises(PrivacyConfigError, match="lr_schedule 'cosine' needs planned_rounds"):
        DPSGDConfig(noise_multiplier=1.0, lr_schedule="cosine").validate()
    with pytest.raises(PrivacyConfigError, match="lr_final_factor"):
        DPSGDConfig(target_epsilon=8.0, planned_rounds=2, lr_final_factor=1.5).validate()
    # the trainer steps the schedule across rounds: 2 rounds x 2 steps, the last one at 0.1 x lr
    tr = _trainer(site, noise_multiplier=1.0, planned_rounds=2, lr_schedule="cosine", lr_final_factor=0.1)
    model = dpsgd_network(get_task("skin2d"))
    tr.train(model)
    opt = tr.optimizer_for(model)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor("cosine", 1, 4, 0.1))
    tr.train(model)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_ema_warmup_follows_min_decay_schedule():
    from adpfl.privacy.errors import PrivacyConfigError
    from adpfl.training.dp_extras import ema_tracker

    model = torch.nn.Linear(1, 1, bias=False)
    values = [1.0, 3.0, 2.0, 5.0]
    for warmup, decay in ((True, 0.999), (False, 0.5)):
        ema = ema_tracker(model, decay, warmup=warmup)
        expected = None
        for t, v in enumerate(values):
            with torch.no_grad():
                model.weight.fill_(v)
            ema.update_parameters(model)
            if expected is None:
                expected = v  # the first update copies the weights
            else:
                d = min(decay, (1 + t) / (10 + t)) if warmup else decay
                expected = d * expected + (1 - d) * v
        assert float(ema.module.weight) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(PrivacyConfigError, match="ema_warmup"):
        DPSGDConfig(target_epsilon=8.0, planned_rounds=2, ema_warmup="yes").validate()
