"""Gradient inversion: leaks a single image from a clear gradient, not from a DP release.

Thresholds: the no-information baseline is the constant image of the mean colour. On
these low-contrast synthetic skin images it already scores SSIM ~0.46 / PSNR ~24.5 dB,
so a reconstruction "leaks" only if it beats it: we require SSIM >= baseline + 0.1
(relative leakage >= +20 %; measured +51 %, SSIM 0.70, PSNR 28.7 dB > baseline) for the
clear gradient, and relative leakage < 0 (measured about -1) and PSNR below the baseline
for DP-FL at z = 1 (one release: update-level epsilon 4.73 at delta 1e-5).
"""


import numpy as np
import pytest
import torch

from adpfl.data.synthetic_skin import make_skin_case, skin_domain_shift
from adpfl.evaluation.attack import AttackConfig, attack_release, image_metrics, small_attack_net
from adpfl.privacy.config import PrivacyConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def case():
    img, mask = make_skin_case(np.random.default_rng(0), (32, 32), skin_domain_shift(0))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    y = torch.from_numpy(mask > 127)[None, None].float()
    return x, y, x.mean(dim=(2, 3), keepdim=True)


def _net():
    torch.manual_seed(0)
    return small_attack_net()


def test_clear_gradient_leaks_the_image(case):
    x, y, base = case
    r = attack_release(_net(), x, y, "npfl", None, attack=AttackConfig(iterations=400), baseline=base)
    m = r.metrics
    assert m["ssim"] >= m["ssim_baseline"] + 0.1
    assert m["relative_leakage"] >= 0.2
    assert m["psnr"] > m["psnr_baseline"]


def test_dp_release_defeats_the_attack(case):
    x, y, base = case
    cfg = PrivacyConfig(mode="dpfl", noise_multiplier=1.0, clip_norm=1.0, track_prv=False)
    r = attack_release(_net(), x, y, "dpfl", cfg, attack=AttackConfig(iterations=200), baseline=base, noise_seed=3)
    m = r.metrics
    assert r.privacy["epsilon"] == pytest.approx(4.7285, rel=1e-3)
    assert m["relative_leakage"] < 0.0
    assert m["psnr"] < m["psnr_baseline"]


def test_metrics_identity(case):
    x, _, base = case
    m = image_metrics(x, x, base)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-4) and m["relative_leakage"] > 0
