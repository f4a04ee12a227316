"""Empirical privacy audits of the release paths as shipped, intact and deliberately broken.

(a) ``ADPFilter.process`` with a FLContext and its ledger on disk (canary updates over many
releases, held-out Clopper-Pearson); (b) ``DPSGDTrainer.train`` with Dirac-gradient canary
records clipped and noised by the real Opacus optimizer (one-run auditing, Steinke et al.
2023). Each intact path must bound epsilon below its claim; each breakage from
``tests/audit_breakage.py`` (noise / 4 behind the accountant, clipping skipped) must be
caught (bound above the claim). Claims: z = 2 -> 2.166 at delta 1e-5 (Opacus RDP, one
release / one step at q = 1; ADP-FL: the smallest z its schedule reported). The noise is
seeded (the filter's generator factory, the trainer's generators) so the tests are
deterministic: with OS noise, simulation of the same game gives a false "not caught" in
about 6 % of DP-FL filter runs at 600 releases per side, about 14 % of ADP-FL runs at 500
(z near 2) and 1 % of DP-SGD runs at 800 canaries; the benches (bench/privacy_audit.py) use
OS noise.
"""

import math

import pytest
import torch

from adpfl.evaluation.audit import clopper_pearson, trial_cap
from adpfl.evaluation.dpsgd_audit import audit_dpsgd_trainer, one_run_epsilon_lower_bound
from adpfl.evaluation.filter_audit import audit_filter
from adpfl.privacy.analysis import epsilon_rdp
from audit_breakage import dpsgd_clip_skipped, dpsgd_noise_scaled, update_clip_skipped, update_noise_scaled

torch.set_num_threads(1)
DPFL = dict(mode="dpfl", noise_multiplier=2.0, clip_norm=1.0, clip_learning_rate=0.0, delta=1e-5)
# ADP-FL: random mask keeping half, fixed clip, adaptive schedule over 40 planned rounds per
# filter (each filter makes 20 releases), noise_max_factor 1 so z stays near 2 (the bench
# audits the default 1.5, whose z runs 3.0 -> 2.14 and needs 2000 releases per side)
ADPFL = dict(mode="adpfl", keep_fraction=0.5, mask_policy="random", clip_norm=1.0, clip_learning_rate=0.0,
             noise_max_factor=1.0, target_epsilon=epsilon_rdp([2.0] * 40, 1e-5), planned_rounds=40, delta=1e-5)


def test_cap_and_clopper_pearson():
    lo, hi = clopper_pearson(0, 100, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100))
    assert trial_cap(100_000) == pytest.approx(math.log(1 / clopper_pearson(0, 100_000, 0.05)[1]))
    assert trial_cap(10**6) > trial_cap(10**4)


def test_one_run_bound():
    assert one_run_epsilon_lower_bound(50, 100, 200, 1e-5) == 0.0  # chance level proves nothing
    full = one_run_epsilon_lower_bound(100, 100, 200, 1e-5)
    p = 1 / (1 + math.exp(-full))
    assert p**100 == pytest.approx(0.05 - 2 * 200 * 1e-5, rel=1e-3)  # all correct: tail = p^k
    assert one_run_epsilon_lower_bound(95, 100, 200, 1e-5) < full
    assert one_run_epsilon_lower_bound(100, 100, 10_000, 1e-5) == 0.0  # 2 m delta eats alpha


@pytest.fixture
def fast_disk(monkeypatch):
    """The ledger and state files are still written and renamed at every release; only the
    fsync (about 7 ms per call on the CI VM, durability is not what is audited) is skipped."""
    import adpfl._io

    monkeypatch.setattr(adpfl._io.os, "fsync", lambda fd: None)


def test_filter_audit_intact(fast_disk, tmp_path):
    r = audit_filter(DPFL, releases_per_side=150, ledger_dir=str(tmp_path), noise_seed=2)
    assert r["epsilon_claimed"] == pytest.approx(2.1657, rel=1e-3)
    assert r["epsilon_lb"] <= r["epsilon_claimed"]
    assert r["ledger_entries"] == 300  # every release was accounted on disk


def test_filter_audit_catches_quarter_noise(fast_disk):
    with update_noise_scaled(0.25):
        r = audit_filter(DPFL, releases_per_side=600, noise_seed=1)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


def test_filter_audit_catches_skipped_clip(fast_disk):
    with update_clip_skipped():
        r = audit_filter(DPFL, releases_per_side=100, noise_seed=3)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


def test_adpfl_filter_audit_intact(fast_disk):
    r = audit_filter(ADPFL, releases_per_side=100, releases_per_filter=20, noise_seed=4)
    assert r["noise_multiplier_min"] > 1.99 and r["epsilon_claimed"] < 2.17  # z about 2 (calibrated)
    assert r["epsilon_lb"] <= r["epsilon_claimed"]
    assert r["ledger_entries"] == 200
    assert 0.6 < r["kept_canary_norm_mean"] < 0.8  # the random mask kept about half the canary


def test_adpfl_filter_audit_catches_quarter_noise(fast_disk):
    """The likelihood-ratio statistic on the kept part of the canary catches noise / 4 behind
    the ADP-FL filter's accountant (sparsify + schedule + clip + noise + ledger)."""
    with update_noise_scaled(0.25):
        r = audit_filter(ADPFL, releases_per_side=500, releases_per_filter=20, noise_seed=5)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


def test_adpfl_filter_audit_catches_skipped_clip(fast_disk):
    with update_clip_skipped():
        r = audit_filter(ADPFL, releases_per_side=100, releases_per_filter=20, noise_seed=6)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data

    root = tmp_path_factory.mktemp("audit_data")
    ensure_site_data("skin2d", root, "site-1", num_train=40, num_val=2, seed=0, size=16)
    return load_site_datalist(root, "site-1", task="skin2d")


def test_dpsgd_audit_intact(records):
    r = audit_dpsgd_trainer(records, runs=1, canaries_per_run=200, guesses=50, noise_seed=1)
    assert r["n_train"] == 40 and r["sample_rate"] == 1.0
    assert r["epsilon_claimed"] == pytest.approx(2.1657, rel=1e-3)
    assert r["epsilon_lb"] <= r["epsilon_claimed"]


def test_dpsgd_audit_catches_quarter_noise(records):
    with dpsgd_noise_scaled(0.25):
        r = audit_dpsgd_trainer(records, runs=2, canaries_per_run=400, guesses=100, noise_seed=2)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


def test_dpsgd_audit_catches_skipped_clip(records):
    with dpsgd_clip_skipped():
        r = audit_dpsgd_trainer(records, runs=1, canaries_per_run=200, guesses=50, noise_seed=3)
    assert r["epsilon_lb"] > r["epsilon_claimed"]
