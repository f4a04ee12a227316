"""The membership-inference scores of bench/mia_eval.py (numpy only, no training): the signs and
the per-example calibration that the AUCs in docs/privacy-evaluation.md section 4 rest on."""

import numpy as np
import pytest

from bench_scripts import load_bench


@pytest.fixture(scope="module")
def mia():
    return load_bench("mia_eval")


def _parse_probe(row: str) -> tuple[float, float]:
    cells = [c.strip() for c in row.strip("|").split("|")]
    au, se = cells[5].replace("(", "").replace(")", "").split()
    return float(au), float(se)


def test_probe_row_scores_low_loss_as_member(mia):
    rng = np.random.default_rng(0)
    member = np.arange(400) < 200
    loss = rng.normal(1.0, 0.2, 400) - 0.2 * member  # members fit better
    au, se = _parse_probe(mia.probe_row("NP-FL", 3, 5, "none", loss, member, 0.9, 10.0))
    assert au > 0.7 and 0.0 < se < 0.05
    au_none, _ = _parse_probe(mia.probe_row("NP-FL", 3, 5, "none", rng.normal(1.0, 0.2, 400), member, 0.9, 10.0))
    assert abs(au_none - 0.5) < 0.1
    assert "| 3 | 15 |" in mia.probe_row("NP-FL", 3, 5, "none", loss, member, 0.9, 10.0)


def test_online_lira_calibrates_per_example_difficulty(mia):
    """Per-candidate difficulty (spread 3) hides a membership shift of 0.5 from the raw score;
    online LiRA, calibrated by IN / OUT shadows on complementary halves, recovers it, and finds
    nothing when the target's membership does not move its score."""
    rng = np.random.default_rng(1)
    n, k = 600, 4
    base = rng.normal(0.0, 3.0, n)
    halves = [rng.permutation(n) < n // 2 for _ in range(k // 2)]
    sin = np.stack([m for h in halves for m in (h, ~h)])
    shadow_phi = base + 0.5 * sin + rng.normal(0.0, 0.2, (k, n))
    member = rng.permutation(n) < n // 2
    phi = base + 0.5 * member + rng.normal(0.0, 0.2, n)
    online, offline = mia.lira_online(phi, shadow_phi, sin)
    assert mia.auc(phi[member], phi[~member]) < 0.62
    assert mia.auc(online[member], online[~member]) > 0.85
    assert mia.auc(offline[member], offline[~member]) > 0.85
    null = base + 0.25 + rng.normal(0.0, 0.2, n)
    assert abs(mia.auc(mia.lira_online(null, shadow_phi, sin)[0][member],
                       mia.lira_online(null, shadow_phi, sin)[0][~member]) - 0.5) < 0.08
    with pytest.raises(ValueError, match="IN and OUT"):
        mia.lira_online(phi, shadow_phi[:1], sin[:1])
