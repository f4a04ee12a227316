"""Empirical privacy audits of the release paths as shipped, intact and deliberately broken.

(a) ``ADPFilter.process`` with a FLContext and its ledger on disk (canary updates over many
releases, held-out Clopper-Pearson); (b) ``DPSGDTrainer.train`` (DP-SGD and ADP-SGD) with
Dirac-gradient canary records that the trainer's own Poisson sampler draws (q < 1, 20
rounds), clipped and noised by the real Opacus optimizer, every round in a record ledger
(one-run auditing, Steinke et al. 2023; claim: the ledger's epsilon for the whole run).
Each intact path must bound epsilon below its claim; each breakage from
``tests/audit_breakage.py`` (noise / 4 behind the accountant, clipping skipped) must be
caught (bound above the claim). Filter claims: z = 2 -> 2.166 at delta 1e-5 (Opacus RDP,
one release; ADP-FL: the smallest z its schedule reported). The noise is seeded (the
filter's generator factory, the trainer's generators) so the tests are deterministic: with
OS noise, simulation of the same game gives a false "not caught" in about 6 % of DP-FL
filter runs at 600 releases per side, about 14 % of ADP-FL runs at 500 (z near 2) and about
10 % of single-run DP-SGD noise / 4 audits; the benches (bench/privacy_audit.py) use OS noise.
"""

import math

import numpy as np
import pytest
import torch

from adpfl.evaluation.audit import clopper_pearson, trial_cap
from adpfl.evaluation.dpsgd_audit import audit_dpsgd_trainer, mixture_log_ratio, one_run_epsilon_lower_bound
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


# Subsampled runs as shipped (q about 0.11 from the declared public count 40 + 100, 20 rounds of
# one step, the record ledger's whole-run claim at target 2); one run of 200 canaries, top 40
# guessed: all 40 correct gives 2.53 > the claim (about 2.0), seeded noise and sampling.
AUDIT = dict(runs=1, canaries_per_run=200, rounds=20, guesses_in=40, guesses_out=0)


@pytest.mark.parametrize("adaptive", [False, True], ids=["dpsgd", "adpsgd"])
def test_dpsgd_audit_intact(records, adaptive):
    r = audit_dpsgd_trainer(records, adaptive=adaptive, noise_seed=1, **AUDIT)
    assert r["n_real"] == 40 and r["sample_rate"] == pytest.approx(16 / 140)
    assert r["steps"] == 20 and r["ledger_entries"] == 20
    assert 1.9 < r["epsilon_claimed"] <= 2.0
    if adaptive:  # the schedule moved z and the adaptive clip moved C
        assert r["noise_multiplier_max"] > r["noise_multiplier_min"] and r["clip_end"][0] != 1.0
    assert r["epsilon_lb"] <= r["epsilon_claimed"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["dpsgd", "adpsgd"])
def test_dpsgd_audit_catches_quarter_noise(records, adaptive):
    # one run of 200 canaries is a quarter of the bench's: the statistic here is the likelihood
    # ratio at a quarter of the claimed noise (the breakage's own), which catches in 90 % of
    # simulated single-run audits (numpy game as in `bench/privacy_audit.py --simulate-dpsgd`;
    # 75 % with the bench's factor 0.5, which missed here once with this seed for ADP-SGD)
    with dpsgd_noise_scaled(0.25):
        r = audit_dpsgd_trainer(records, adaptive=adaptive, noise_seed=2, statistic_noise_factor=0.25, **AUDIT)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["dpsgd", "adpsgd"])
def test_dpsgd_audit_catches_skipped_clip(records, adaptive):
    with dpsgd_clip_skipped():
        r = audit_dpsgd_trainer(records, adaptive=adaptive, noise_seed=3, **AUDIT)
    assert r["epsilon_lb"] > r["epsilon_claimed"]


def test_mixture_log_ratio():
    # out-law mean of exp(LLR) is 1 (a likelihood ratio) and the LLR grows with u
    rng = np.random.default_rng(0)
    u = rng.normal(0.0, 1.5, 200_000)
    assert np.exp(mixture_log_ratio(u, 3, 0.2, 1.5**2)).mean() == pytest.approx(1.0, abs=0.02)
    v = mixture_log_ratio(np.linspace(-3, 5, 9), 3, 0.2, 1.0)
    assert np.all(np.diff(v) > 0)
