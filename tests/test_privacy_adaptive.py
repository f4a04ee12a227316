import math
import random

import pytest

from adpfl.privacy import (
    AdaptiveClipper,
    PrivacyConfigError,
    effective_noise_multiplier,
    make_generator,
    update_noise_multiplier_for,
)


def test_effective_multiplier_formula_and_inverse():
    z = effective_noise_multiplier(2.0, 10.0)
    assert z == pytest.approx((1 / 4 + 1 / 100) ** -0.5)
    assert update_noise_multiplier_for(z, 10.0) == pytest.approx(2.0)
    assert effective_noise_multiplier(2.0, None) == 2.0
    with pytest.raises(PrivacyConfigError, match="clip_indicator_noise"):
        update_noise_multiplier_for(3.0, 2.0)


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_clipper_converges_to_quantile(gamma):
    rng = random.Random(1)
    gen = make_generator("cpu", 5)
    clipper = AdaptiveClipper(
        initial_clip_norm=0.01, target_quantile=gamma, learning_rate=0.05, indicator_noise_std=0.05
    )
    tail = []
    for t in range(3000):
        clipper.update(rng.lognormvariate(0.0, 0.5), gen)  # norms ~ LogNormal(0, 0.5)
        if t >= 2000:
            tail.append(clipper.clip_norm)
    true_q = math.exp(0.5 * {0.5: 0.0, 0.8: 0.8416}[gamma])
    c = sum(tail) / len(tail)
    assert abs(math.log(c / true_q)) < 0.1
    # fraction of fresh norms below C is close to gamma
    frac = sum(rng.lognormvariate(0.0, 0.5) <= c for _ in range(5000)) / 5000
    assert abs(frac - gamma) < 0.06


def test_clipper_clamps_and_state():
    gen = make_generator("cpu", 0)
    c = AdaptiveClipper(1.0, 0.5, learning_rate=5.0, indicator_noise_std=0.01, min_clip_norm=0.5, max_clip_norm=2.0)
    for _ in range(10):
        c.update(100.0, gen)
    assert c.clip_norm == 2.0
    for _ in range(10):
        c.update(0.0, gen)
    assert c.clip_norm == 0.5
    c2 = AdaptiveClipper(1.0, 0.5, learning_rate=5.0, indicator_noise_std=0.01, min_clip_norm=0.5, max_clip_norm=2.0)
    c2.load_state_dict(c.state_dict())
    assert c2.clip_norm == 0.5 and c2.updates == 20
