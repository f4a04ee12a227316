"""Empirical privacy audit of the update-level Gaussian release."""

import math

import pytest
import torch

from adpfl.evaluation.audit import (
    audit_gaussian_release,
    clopper_pearson,
    pipeline_projection_std,
    trial_cap,
)

torch.set_num_threads(1)
TRIALS = 200_000  # per side; half held out -> cap log(1e5 / 3.7) ~ 10.2


@pytest.mark.parametrize("z", [1.0, 2.0])
def test_lower_bound_below_accounted_epsilon(z):
    r = audit_gaussian_release(z, trials=TRIALS)
    assert 0.0 < r.epsilon_lb < r.epsilon_accounted
    assert not r.violation


def test_four_times_under_noised_mechanism_is_caught():
    # ledger claims z=2 (eps 2.17 at delta 1e-5); actual std is 4x smaller (z=0.5)
    r = audit_gaussian_release(2.0, trials=TRIALS, under_noise=4.0)
    assert r.epsilon_lb > r.epsilon_accounted
    assert r.violation
    assert r.epsilon_lb <= r.epsilon_cap


def test_cap_and_clopper_pearson():
    lo, hi = clopper_pearson(0, 100, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100))
    assert trial_cap(100_000) == pytest.approx(math.log(1 / clopper_pearson(0, 100_000, 0.05)[1]))
    assert trial_cap(10**6) > trial_cap(10**4)


def test_audit_std_is_the_pipelines():
    r = pipeline_projection_std(2.0, releases=150, dim=200)
    assert r["reported_noise_std"] == pytest.approx(r["formula_std"])
    assert 0.75 * r["formula_std"] < r["empirical_std"] < 1.25 * r["formula_std"]
