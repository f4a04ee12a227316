import json

import pytest
from opacus.accountants import RDPAccountant

from adpfl.privacy import (
    BudgetExhausted,
    PrivacyConfigError,
    PrivacyError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon_prv,
    epsilon_rdp,
)

D = 1e-5


@pytest.mark.parametrize(
    "zs,rdp,prv",
    [([1.0] * 50, 57.30, 54.39), ([2.0] * 20, 12.30, 11.49), ([2.0] * 10 + [1.0] * 10, 22.02, 20.69)],
)
def test_reference_figures(zs, rdp, prv):
    assert epsilon_rdp(zs, D) == pytest.approx(rdp, abs=0.02)
    assert epsilon_prv(zs, D) == pytest.approx(prv, abs=0.02)


def test_calibration_reference():
    assert calibrate_noise_multiplier(8.0, D, 20) == pytest.approx(2.85, abs=0.01)
    assert calibrate_noise_multiplier(8.0, D, 50) == pytest.approx(4.51, abs=0.01)
    assert epsilon_rdp([calibrate_noise_multiplier(8.0, D, 20)] * 20, D) <= 8.0


def test_calibration_unreachable_names_settings():
    with pytest.raises(ValueError, match=r"target_epsilon=0.01.*rounds=20.*delta=1e-05"):
        calibrate_noise_multiplier(0.01, D, 20)


def test_ledger_matches_opacus_for_varying_z():
    zs = [3.0, 2.5, 2.5, 1.7, 4.0, 1.1, 1.1, 1.1]
    ledger = PrivacyLedger(delta=D, track_prv=False)
    for r, z in enumerate(zs):
        ledger.record(round=r, noise_multiplier=z, clip_norm=1.0)
    acc = RDPAccountant()
    for z in zs:
        acc.step(noise_multiplier=z, sample_rate=1.0)
    assert ledger.epsilon("rdp") == pytest.approx(acc.get_epsilon(D), rel=1e-9)
    assert ledger.entries[-1]["epsilon_rdp"] == pytest.approx(acc.get_epsilon(D), rel=1e-9)
    assert ledger.projected_epsilon(2.0) == pytest.approx(epsilon_rdp(zs + [2.0], D), rel=1e-9)


def test_ledger_prv_and_laplace_mix():
    ledger = PrivacyLedger(delta=D)
    e = ledger.record(round=0, noise_multiplier=2.0, clip_norm=1.0)
    assert e["epsilon_prv"] == pytest.approx(epsilon_prv([2.0], D))
    e = ledger.record(round=1, noise_multiplier=4.0, clip_norm=1.0, mechanism="laplace")
    assert e["epsilon_round"] == pytest.approx(0.25)
    assert ledger.epsilon() == pytest.approx(epsilon_rdp([2.0], D) + 0.25)


def test_ledger_refuses_duplicate_round_and_budget():
    ledger = PrivacyLedger(delta=D, target_epsilon=13.0, track_prv=False)
    for r in range(20):
        ledger.record(round=r, noise_multiplier=2.0, clip_norm=1.0, job_id="j1")
    with pytest.raises(PrivacyError, match="already"):
        ledger.record(round=5, noise_multiplier=2.0, clip_norm=1.0, job_id="j1")
    ledger.record(round=5, noise_multiplier=100.0, clip_norm=1.0, job_id="j2")  # other job: fine
    before = json.dumps(ledger.to_dict())
    with pytest.raises(BudgetExhausted):
        ledger.record(round=21, noise_multiplier=1.0, clip_norm=1.0, job_id="j1")
    assert json.dumps(ledger.to_dict()) == before


def test_ledger_save_load_roundtrip_and_corrupt(tmp_path):
    ledger = PrivacyLedger(delta=D, target_epsilon=10.0, track_prv=False)
    ledger.record(round=0, noise_multiplier=2.0, clip_norm=0.5, keep_fraction=0.1, mask_policy="random", job_id="a")
    path = tmp_path / "sub" / "ledger.json"
    ledger.save(path)
    back = PrivacyLedger.load(path)
    assert back.to_dict() == ledger.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp file left
    path.write_text('{"format": "adpfl-privacy-ledger", "version": 1, "delta": ')
    with pytest.raises(PrivacyError, match=str(path)):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(PrivacyError, match="corrupt"):
        PrivacyLedger.load(path)


def test_exact_gaussian_conversion_matches_reference_and_prv():
    from adpfl.privacy.analysis import epsilon_exact

    # reference figures: z=1 for 50 rounds, exact 54.38 (PRV 54.39, RDP 57.30)
    assert epsilon_exact([1.0] * 50, 1e-5) == pytest.approx(54.38, abs=0.01)
    assert epsilon_exact([2.0] * 20, 1e-5) == pytest.approx(11.49, abs=0.02)
    assert epsilon_exact([2.0] * 10 + [1.0] * 10, 1e-5) == pytest.approx(20.69, abs=0.02)
    # never above RDP (RDP is an upper bound), and defined where PRV is not (z ~ 1e-3)
    for zs in ([0.5] * 3, [0.005] * 5, [1e-3, 2e-3]):
        assert 0 < epsilon_exact(zs, 1e-5) <= epsilon_rdp(zs, 1e-5)


def test_exact_conversion_independent_check_single_release():
    """One Gaussian release at z: delta(eps) from the closed form, evaluated by hand."""
    import math

    from scipy.stats import norm

    from adpfl.privacy.analysis import epsilon_exact

    z, delta = 1.5, 1e-5
    eps = epsilon_exact([z], delta)
    mu = 1.0 / z
    d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert d == pytest.approx(delta, rel=1e-4)


def test_calibrate_never_lands_on_the_unsafe_side():
    from adpfl.privacy.analysis import calibrate

    history = [10.0] * 5  # epsilon 0.9 already spent
    for target in (3.0, 30.0, 300.0):
        for rtol, stop in ((1e-4, 0.0), (0.5, 0.0), (1e-4, 1.0)):
            z = calibrate(lambda z: epsilon_rdp(history + [z] * 10, 1e-5), target, rtol=rtol, stop_within=stop)
            assert epsilon_rdp(history + [z] * 10, 1e-5) <= target  # whatever the tolerance
            if stop == 0.0 and rtol == 1e-4:  # and tight: a bit less noise would overshoot
                assert epsilon_rdp(history + [z * (1 - 2e-4)] * 10, 1e-5) > target
    with pytest.raises(PrivacyConfigError, match="unreachable"):
        calibrate(lambda z: 1.0 / z, 1e-9, upper=1e3)
    # a start point below or above the answer gives the same bracket end
    f = lambda z: 10.0 / z  # noqa: E731
    assert calibrate(f, 2.0, start=0.01) == pytest.approx(5.0, rel=1e-4)
    assert calibrate(f, 2.0, start=900.0) == pytest.approx(5.0, rel=1e-4)
    assert f(calibrate(f, 2.0, start=0.01)) <= 2.0
