import json

import pytest
import torch

from adpfl.privacy import (
    BudgetExhausted,
    PrivacyConfig,
    PrivacyConfigError,
    PrivacyError,
    PrivacyLedger,
    PrivacyPipeline,
    epsilon_rdp,
)
from adpfl.privacy.mechanisms import seeded_generators

D = 1e-5


def adpfl(**kw):
    base = dict(mode="adpfl", keep_fraction=0.1, clip_norm=1.0, clip_learning_rate=0.2, clip_indicator_noise=30.0,
                target_epsilon=8.0, delta=D, planned_rounds=20, track_prv=False)
    base.update(kw)
    return PrivacyConfig(**base)


def dpfl(**kw):
    base = dict(mode="dpfl", clip_norm=0.5, noise_multiplier=1.5, delta=D, track_prv=False)
    base.update(kw)
    return PrivacyConfig(**base)


def update(n=100_000, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(n - 10, generator=g) * scale, "conv.bias": torch.randn(10, generator=g) * scale}


def test_dpfl_noise_std_matches_metadata():
    pipe = PrivacyPipeline(dpfl(), PrivacyLedger(delta=D))
    zero = {"w": torch.zeros(200_000)}
    out, meta = pipe.release(zero, 0)
    assert meta["noise_std"] == pytest.approx(1.5 * 2 * 0.5)
    assert meta["sensitivity"] == pytest.approx(1.0)
    assert float(out["w"].std()) == pytest.approx(meta["noise_std"], rel=0.01)
    assert abs(float(out["w"].mean())) < 0.01
    assert meta["epsilon_rdp"] == pytest.approx(epsilon_rdp([1.5], D))
    assert meta["seeded"] is False and meta["mask_covered"] is True and meta["keep_fraction"] == 1.0
    assert meta["sensitivity_convention"] == "replace-one, sensitivity = 2 * clip_norm"


def test_adpfl_release_shape_sparsity_and_metadata():
    ledger = PrivacyLedger(delta=D)
    pipe = PrivacyPipeline(adpfl(track_prv=True), ledger)
    upd = update()
    out, meta = pipe.release(upd, 0, global_change=0.3, job_id="job")
    assert list(out) == list(upd) and all(out[k].shape == upd[k].shape for k in upd)
    assert out["conv.weight"].dtype == torch.float32
    flat = torch.cat([out[k].reshape(-1) for k in out])
    assert int((flat != 0).sum()) == 10_000 == pipe.last_indices.numel() == meta["kept_coordinates"]
    z_eff, z_u = meta["noise_multiplier"], meta["update_noise_multiplier"]
    assert 1 / z_eff**2 == pytest.approx(1 / z_u**2 + 1 / 30.0**2)
    assert meta["noise_std"] == pytest.approx(z_u * 2 * meta["clip_norm"])
    assert meta["epsilon_prv"] is not None and meta["epsilon_prv"] <= meta["epsilon_rdp"]
    assert ledger.entries[0]["noise_multiplier"] == z_eff and ledger.entries[0]["job_id"] == "job"
    forbidden = {"pre_clip_norm", "norm", "indicator", "update_norm"}
    assert not forbidden & set(meta)
    json.dumps(meta)  # plain values only


def test_clip_applies_to_kept_coordinates():
    # tiny noise: check the clipped signal through the release
    cfg = dpfl(noise_multiplier=1e-6, clip_norm=2.0)
    upd = update(scale=5.0)
    out, _ = PrivacyPipeline(cfg, PrivacyLedger(delta=D), generator_factory=seeded_generators(1)).release(upd, 0)
    flat = torch.cat([out[k].reshape(-1) for k in out])
    assert float(flat.norm()) <= 2.0 + 1e-3
    small = {k: v / 1e4 for k, v in update().items()}
    out, _ = PrivacyPipeline(cfg, PrivacyLedger(delta=D), generator_factory=seeded_generators(1)).release(small, 0)
    for k in small:
        assert torch.allclose(out[k], small[k], atol=1e-4)


def _seeded(cfg, seed=3):
    return PrivacyPipeline(cfg, PrivacyLedger(delta=D), generator_factory=seeded_generators(seed))


def test_unseeded_releases_differ_seeded_reproducible():
    upd = update(10_000)
    a, _ = PrivacyPipeline(adpfl(), PrivacyLedger(delta=D)).release(upd, 0)
    b, _ = PrivacyPipeline(adpfl(), PrivacyLedger(delta=D)).release(upd, 0)
    assert not torch.equal(a["conv.weight"], b["conv.weight"])
    # fixed noise is no setting: the config refuses a seed
    with pytest.raises(PrivacyConfigError, match="test_seed"):
        PrivacyConfig.from_dict({"mode": "dpfl", "noise_multiplier": 1.0, "test_seed": 3})
    p1, p2 = _seeded(adpfl()), _seeded(adpfl())
    (c, mc), (d, _) = p1.release(upd, 0), p2.release(upd, 0)
    assert mc["seeded"] is True
    assert all(torch.equal(c[k], d[k]) for k in c)
    # the random mask does not depend on the update values
    p3 = _seeded(adpfl())
    p3.release(update(10_000, scale=1e3, seed=9), 0)
    assert torch.equal(p1.last_indices, p3.last_indices)


def test_mask_policies_in_pipeline():
    upd = update(1000)
    pipe = PrivacyPipeline(adpfl(mask_policy="topk_private"), PrivacyLedger(delta=D))
    _, meta = pipe.release(upd, 0)
    assert meta["mask_covered"] is False and meta["mask_policy"] == "topk_private"
    assert pipe.ledger.entries[0]["mask_covered"] is False
    pipe = PrivacyPipeline(adpfl(mask_policy="topk_public"), PrivacyLedger(delta=D))
    with pytest.raises(PrivacyConfigError, match="public_scores"):
        pipe.release(upd, 0)
    assert pipe.ledger.entries == []
    scores = {k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) for k, v in upd.items()}
    _, meta = pipe.release(upd, 0, public_scores=scores)
    assert meta["mask_covered"] is True
    assert pipe.last_indices.tolist() == list(range(890, 990))  # largest public scores of conv.weight


def test_budget_refusal_leaves_ledger_unchanged(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(delta=D)
    pipe = PrivacyPipeline(dpfl(noise_multiplier=2.0, target_epsilon=12.5), ledger, ledger_path=path)
    upd = update(1000)
    for r in range(20):
        pipe.release(upd, r)
    assert PrivacyLedger.load(path).to_dict() == ledger.to_dict()
    before = json.dumps(ledger.to_dict())
    with pytest.raises(BudgetExhausted):
        pipe.release(upd, 20)
    assert json.dumps(ledger.to_dict()) == before
    assert json.dumps(PrivacyLedger.load(path).to_dict()) == before


def test_adpfl_run_stays_within_budget():
    ledger = PrivacyLedger(delta=D)
    pipe = PrivacyPipeline(adpfl(), ledger)
    upd = update(2000)
    for r in range(20):
        _, meta = pipe.release(upd, r, global_change=1.0 / (1 + r))
    assert 7.2 <= ledger.epsilon() <= 8.0
    with pytest.raises(BudgetExhausted):
        pipe.release(upd, 20, global_change=0.01)
    assert len(ledger.entries) == 20


def test_refuses_repeat_nonfinite_and_integer():
    pipe = PrivacyPipeline(dpfl(), PrivacyLedger(delta=D))
    upd = update(100)
    pipe.release(upd, 0, job_id="j")
    with pytest.raises(PrivacyError, match="already"):
        pipe.release(upd, 0, job_id="j")
    bad = dict(upd)
    bad["conv.bias"] = bad["conv.bias"].clone()
    bad["conv.bias"][3] = float("nan")
    with pytest.raises(PrivacyError, match="conv.bias"):
        pipe.release(bad, 1, job_id="j")
    with pytest.raises(ValueError, match="num_batches_tracked"):
        pipe.release({**upd, "bn.num_batches_tracked": torch.tensor(3)}, 1, job_id="j")
    assert len(pipe.ledger.entries) == 1


def test_adaptive_clip_moves_and_state_roundtrip():
    pipe = PrivacyPipeline(adpfl(clip_indicator_noise=30.0, clip_learning_rate=0.2), PrivacyLedger(delta=D))
    c0 = pipe.clip_norm
    pipe.release(update(1000), 0)
    assert pipe.clip_norm != c0
    pipe2 = PrivacyPipeline(adpfl(), PrivacyLedger(delta=D))
    pipe2.load_state_dict(json.loads(json.dumps(pipe.state_dict())))
    assert pipe2.clip_norm == pipe.clip_norm


def test_laplace_dpfl():
    pipe = PrivacyPipeline(dpfl(noise_type="laplace", noise_multiplier=None, target_epsilon=10.0, planned_rounds=20),
                           PrivacyLedger(delta=D))
    out, meta = pipe.release({"w": torch.zeros(100_000)}, 0)
    assert meta["mechanism"] == "laplace" and meta["epsilon_round"] == pytest.approx(0.5)
    assert meta["noise_scale"] == pytest.approx(2.0 * 2 * 0.5)
    assert float(out["w"].abs().mean()) == pytest.approx(meta["noise_scale"], rel=0.02)


def test_laplace_adpfl_noise_follows_the_adaptive_clip_and_accounts_the_indicator():
    """The ADP-FL paper's noise: Laplace scaled to the percentile clip threshold. The clip's
    Laplace indicator (scale 20, epsilon 1/20 a round) and the update's Laplace noise add up
    to the effective multiplier the ledger accounts (epsilon_round = 1 / z_eff)."""
    from adpfl.privacy.metadata import check_privacy_meta

    cfg = adpfl(noise_type="laplace", clip_indicator_noise=20.0, target_epsilon=40.0, planned_rounds=4,
                clip_learning_rate=1.0, clip_percentile=0.5)
    ledger = PrivacyLedger(delta=D)
    pipe = PrivacyPipeline(cfg, ledger, generator_factory=seeded_generators(0))
    clips = []
    for r in range(4):
        clips.append(pipe.clip_norm)
        out, meta = pipe.release(update(scale=0.1, seed=r), r)
        check_privacy_meta(dict(meta), D)  # the server accepts it
        z_eff, z_u = meta["noise_multiplier"], meta["update_noise_multiplier"]
        assert z_eff == pytest.approx(4 / 40.0)  # planned_rounds / target_epsilon: even pure-DP spend
        assert 1 / z_u + 1 / 20.0 == pytest.approx(1 / z_eff)
        assert meta["noise_scale"] == pytest.approx(z_u * 2 * meta["clip_norm"])
        assert meta["epsilon_round"] == pytest.approx(10.0)
    assert ledger.epsilon() == pytest.approx(40.0)  # pure epsilon-DP, basic composition
    assert len(set(clips)) == 4 and all(cfg.clip_min <= c <= cfg.clip_max for c in clips)  # C moves each round
    with pytest.raises(BudgetExhausted):
        pipe.release(update(seed=9), 4)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(keep_fraction=1.5), "keep_fraction must be in (0, 1], got 1.5"),
        (dict(mode="x"), "mode"),
        (dict(mask_policy="top"), "mask_policy"),
        (dict(clip_percentile=1.0), "clip_percentile"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(delta=2.0), "delta"),
        (dict(target_epsilon=0.01), "target_epsilon=0.01 is unreachable in planned_rounds=20 at delta=1e-05"),
        (dict(noise_type="uniform"), "noise_type"),
        (dict(planned_rounds=0), "planned_rounds"),
        (dict(clip_min=2.0), "clip_min"),
    ],
)
def test_config_validation_names_setting(kw, needle):
    with pytest.raises(PrivacyConfigError) as err:
        adpfl(**kw).validate()
    assert needle in str(err.value)


def test_config_dpfl_rules_and_calibration():
    with pytest.raises(PrivacyConfigError, match="keep_fraction"):
        dpfl(keep_fraction=0.5).validate()
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        dpfl(noise_multiplier=None).validate()
    cfg = dpfl(noise_multiplier=None, target_epsilon=8.0, planned_rounds=20)
    assert cfg.validate().resolved_noise_multiplier() == pytest.approx(2.85, abs=0.01)
    with pytest.raises(PrivacyConfigError, match="clip_indicator_noise"):
        PrivacyPipeline(adpfl(clip_indicator_noise=3.0), PrivacyLedger(delta=D))
    with pytest.raises(PrivacyConfigError, match="unknown"):
        PrivacyConfig.from_dict({"keep_fractoin": 0.1})
