import random

import pytest

from adpfl.privacy import AdaptiveNoiseSchedule, BudgetExhausted, FixedNoise, PrivacyLedger

D = 1e-5


def run(pattern, target=8.0, rounds=20):
    sched = AdaptiveNoiseSchedule(target, D, rounds)
    ledger = PrivacyLedger(delta=D, target_epsilon=target, track_prv=False)
    rng = random.Random(0)
    zs = []
    for r in range(rounds):
        g = {
            "constant": 0.1,
            "decay": 1.0 / (1 + r),
            "increase": 0.01 * (1 + r),
            "noisy": rng.uniform(0.01, 1.0),
            "none": None,
        }[pattern]
        z = sched.next_noise_multiplier(ledger, r, g)
        assert z <= sched.z_max + 1e-12
        # feasibility: the rest of the plan at z_max still fits
        assert ledger.projected_epsilon(z) <= target
        ledger.record(round=r, noise_multiplier=z, clip_norm=1.0)
        zs.append(z)
    return ledger.epsilon(), zs, sched


@pytest.mark.parametrize("pattern", ["constant", "decay", "increase", "noisy", "none"])
def test_schedule_spends_budget_within_target(pattern):
    eps, zs, sched = run(pattern)
    assert 0.9 * 8.0 <= eps <= 8.0
    assert "z_even" in sched.describe()


def test_schedule_reacts_to_global_change():
    ledger = PrivacyLedger(delta=D, track_prv=False)
    s = AdaptiveNoiseSchedule(8.0, D, 20)
    s.next_noise_multiplier(ledger, 0, 1.0)
    z_fast = s.next_noise_multiplier(ledger, 1, 1.0)
    s2 = AdaptiveNoiseSchedule(8.0, D, 20)
    s2.next_noise_multiplier(ledger, 0, 1.0)
    z_settled = s2.next_noise_multiplier(ledger, 1, 0.05)
    assert z_fast > z_settled * 1.1
    _, zs, _ = run("decay")
    assert zs[0] > zs[10]  # more noise early while the model changes fast


def test_schedule_raises_when_exhausted():
    ledger = PrivacyLedger(delta=D, track_prv=False)
    for r in range(5):
        ledger.record(round=r, noise_multiplier=0.8, clip_norm=1.0)
    s = AdaptiveNoiseSchedule(8.0, D, 20)
    with pytest.raises(BudgetExhausted):
        s.next_noise_multiplier(ledger, 5, 0.1)


def test_fixed_noise():
    f = FixedNoise(1.3)
    assert f.next_noise_multiplier(PrivacyLedger(delta=D), 0, 0.5) == 1.3 and "1.3" in f.describe()
