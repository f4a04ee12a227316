"""Scoring conventions (adpfl.metrics) pinned on small hand-built masks: empty cases, BraTS
lesion-wise matching and penalties, RC, KiTS Surface Dice with anisotropic spacing, ISIC
thresholded Jaccard, "no cases"; and agreement with DeepMind's surface-distance library, the
one the KiTS23 and BraTS 2024 evaluations use."""

from __future__ import annotations

import numpy as np
import pytest

from adpfl.metrics import (
    BRATS_PENALTY_MM,
    ScoreAccumulator,
    dice,
    hd95,
    image_diagonal,
    lesion_wise,
    score_case,
    scoring_for,
    surface_dice,
    thresholded_jaccard,
)
from adpfl.tasks.base import get_task


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


E3 = np.zeros((16, 16, 16), bool)
A3 = cube((16, 16, 16), (4, 4, 4), (10, 10, 10))


# -- voxel-wise empty-case rules -----------------------------------------------------------
def test_empty_rules_dice_hd95():
    assert dice(E3, E3) == 1.0 and hd95(E3, E3, (1, 1, 1), 374) == 0.0  # both empty
    assert dice(A3, E3) == 0.0 and hd95(A3, E3, (1, 1, 1), 374) == 374.0  # false positive on empty GT
    assert dice(E3, A3) == 0.0 and hd95(E3, A3, (1, 1, 1), 374) == 374.0  # total miss
    assert dice(A3, A3) == 1.0 and hd95(A3, A3, (1, 1, 1), 374) == 0.0


def test_hd95_in_mm_with_anisotropic_spacing():
    shifted = np.roll(A3, 2, axis=2)  # 2 voxels along the 3rd axis
    assert hd95(shifted, A3, (1, 1, 1), 374) == pytest.approx(2.0)
    assert hd95(shifted, A3, (0.5, 0.5, 3.0), 374) == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert image_diagonal((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)  # BraTS's 374


def test_kits_penalty_is_the_image_diagonal():
    gt = np.zeros((8, 8, 4), np.int16)
    gt[2:5, 2:5, 1:3] = 1
    pred = gt.copy()
    pred[6, 6, 3] = 2  # tumour predicted, none in the ground truth
    s = score_case(pred, gt, get_task("kidney3d").regions, scoring_for("kidney3d"), spacing=(0.8, 0.8, 2.5))
    assert s["dice_kidney_tumor_cyst"] < 1.0 and s["dice_tumor"] == 0.0 and s["sdice_tumor"] == 0.0
    assert s["hd95_tumor"] == pytest.approx(image_diagonal((8, 8, 4), (0.8, 0.8, 2.5)))


# -- BraTS lesion-wise -----------------------------------------------------------------------
def two_lesions():
    gt = cube((24, 24, 24), (2, 2, 2), (10, 10, 10))  # 512 voxels
    gt |= cube((24, 24, 24), (18, 18, 18), (21, 21, 21))  # 27 voxels, far away
    return gt


def test_missed_small_lesion_lesion_wise_vs_voxel_wise():
    gt = two_lesions()
    pred = cube((24, 24, 24), (2, 2, 2), (10, 10, 10))  # big one exact, small one missed
    vox = dice(pred, gt)
    assert vox == pytest.approx(2 * 512 / (512 + 539))  # 0.974: the miss barely shows voxel-wise
    s = lesion_wise(pred, gt, (1, 1, 1), min_volume=20)
    assert (s.lesions, s.missed, s.false_positives) == (2, 1, 0)
    assert s.dice == pytest.approx(0.5)  # (1 + 0) / 2
    assert s.hd95 == pytest.approx((0 + BRATS_PENALTY_MM) / 2)
    # below the volume threshold the small lesion is not scored at all
    s = lesion_wise(pred, gt, (1, 1, 1), min_volume=27)
    assert (s.lesions, s.small_lesions, s.dice, s.hd95) == (1, 1, 1.0, 0.0)
    # the threshold is a volume in mm^3: the same voxels at 2 mm spacing are 216 mm^3
    s = lesion_wise(pred, gt, (2, 2, 2), min_volume=27)
    assert s.lesions == 2 and s.dice == pytest.approx(0.5)


def test_false_positive_lesion_and_empty_cases():
    gt = cube((24, 24, 24), (2, 2, 2), (10, 10, 10))
    pred = gt | cube((24, 24, 24), (18, 18, 18), (21, 21, 21))  # an extra component far away
    s = lesion_wise(pred, gt, (1, 1, 1))
    assert (s.lesions, s.false_positives) == (1, 1)
    assert s.dice == pytest.approx(0.5) and s.hd95 == pytest.approx(BRATS_PENALTY_MM / 2)
    e = np.zeros_like(gt)
    assert (lesion_wise(e, e, (1, 1, 1)).dice, lesion_wise(e, e, (1, 1, 1)).hd95) == (1.0, 0.0)
    assert (lesion_wise(pred, e, (1, 1, 1)).dice, lesion_wise(pred, e, (1, 1, 1)).hd95) == (0.0, BRATS_PENALTY_MM)
    assert (lesion_wise(e, gt, (1, 1, 1)).dice, lesion_wise(e, gt, (1, 1, 1)).hd95) == (0.0, BRATS_PENALTY_MM)


def test_prediction_near_a_lesion_matches_through_the_dilation():
    gt = cube((24, 24, 24), (2, 2, 2), (10, 10, 10))
    near = cube((24, 24, 24), (12, 4, 4), (13, 6, 6))  # 2 voxels outside: within 3 dilations
    pred = gt | near
    s = lesion_wise(pred, gt, (1, 1, 1))
    assert (s.lesions, s.false_positives) == (1, 0)
    assert s.dice == pytest.approx(dice(pred, gt))
    far = cube((24, 24, 24), (16, 4, 4), (17, 6, 6))  # 6 voxels outside: a false positive
    assert lesion_wise(gt | far, gt, (1, 1, 1)).false_positives == 1


def test_rc_voxel_is_its_own_region():
    task = get_task("brain3d")
    gt = np.zeros((20, 20, 20), np.int16)
    gt[4:10, 4:10, 4:10] = 3  # ET
    gt[12:16, 12:16, 12:16] = 4  # resection cavity
    pred = gt.copy()
    pred[12:16, 12:16, 12:16] = 0  # RC missed entirely
    s = score_case(pred, gt, task.regions, scoring_for("brain3d"), spacing=(1, 1, 1))
    assert s["dice_ET"] == s["dice_TC"] == s["dice_WT"] == 1.0  # RC is in neither TC nor WT
    assert s["dice_RC"] == 0.0 and s["hd95_RC"] == BRATS_PENALTY_MM
    assert s["lesion_dice_RC"] == 0.0 and s["lesion_hd95_RC"] == BRATS_PENALTY_MM
    assert s["dice_NETC"] == 1.0 and s["hd95_NETC"] == 0.0  # absent in both: 1 and 0
    # the old "remap 4 -> 3" would have turned the cavity into enhancing tumour
    remapped = np.where(gt == 4, 3, gt)
    assert score_case(pred, remapped, task.regions, scoring_for("brain3d"))["dice_ET"] < 1.0


# -- KiTS Surface Dice, ISIC thresholded Jaccard ---------------------------------------------------
def test_surface_dice_with_anisotropic_spacing():
    gt = cube((20, 20, 12), (5, 5, 3), (15, 15, 9))
    pred = np.roll(gt, 1, axis=2)  # shifted one slice
    assert surface_dice(pred, gt, (1.0, 1.0, 1.0), 1.1) == 1.0  # 1 mm slices: every boundary within 1.1 mm
    assert surface_dice(pred, gt, (1.0, 1.0, 3.0), 1.1) < 0.8  # 3 mm slices: the caps are 3 mm off
    assert surface_dice(gt, gt, (1.0, 1.0, 3.0), 1.1) == 1.0
    e = np.zeros_like(gt)
    assert surface_dice(e, e, (1, 1, 3), 1.1) == 1.0 and surface_dice(gt, e, (1, 1, 3), 1.1) == 0.0


def test_thresholded_jaccard_below_and_above_065():
    gt = np.zeros((10, 10), bool)
    gt[:, :5] = True  # 50 pixels
    above = gt.copy()
    above[:, 5] = True  # J = 50/60 = 0.833
    below = np.zeros_like(gt)
    below[:, 2:7] = True  # J = 30/70 = 0.43
    assert thresholded_jaccard(above, gt) == pytest.approx(50 / 60)
    assert thresholded_jaccard(below, gt) == 0.0
    assert dice(below, gt) == pytest.approx(0.6)  # Dice still credits it
    s = score_case(below.astype(int), gt.astype(int), get_task("skin2d").regions, scoring_for("skin2d"))
    assert s["tjaccard_lesion"] == 0.0 and s["dice_lesion"] == pytest.approx(0.6)


# -- aggregation: every case counts, "no cases" is None ---------------------------------------------
def test_accumulator_counts_every_case_and_reports_no_cases_as_none():
    task = get_task("brain3d")
    acc = ScoreAccumulator(task.regions, scoring_for("brain3d"))
    assert acc.summary()["dice_ET"] is None and acc.summary()["dice_mean"] is None  # no case: no value, not 0
    gt = np.zeros((12, 12, 12), np.int16)
    gt[2:6, 2:6, 2:6] = 2  # SNFH only
    pred = gt.copy()
    pred[8:11, 8:11, 8:11] = 1  # NETC predicted where the ground truth has none
    acc.add(score_case(pred, gt, task.regions, scoring_for("brain3d")))
    acc.add(score_case(gt, gt, task.regions, scoring_for("brain3d")))
    s = acc.summary()
    assert s["dice_NETC"] == pytest.approx(0.5)  # 0 (false positive on empty) and 1 (both empty)
    assert s["hd95_NETC"] == pytest.approx(BRATS_PENALTY_MM / 2)
    assert s["dice_SNFH"] == 1.0
    assert s["dice_mean"] == pytest.approx(np.mean([s[f"dice_{r}"] for r in task.regions]))
    with pytest.raises(ValueError):
        acc.add({"dice_ET": float("nan")})


# -- agreement with DeepMind's surface-distance (used by the KiTS23 and BraTS 2024 evaluations) ----
def _random_blob(rng, shape, n):
    from scipy import ndimage

    m = np.zeros(shape, bool)
    for _ in range(n):
        c = [rng.integers(3, s - 3) for s in shape]
        m[tuple(slice(x - 2, x + 3) for x in c)] = True
    return ndimage.binary_opening(m) | m


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.78, 0.78, 3.0), (2.5, 0.5, 1.2)])
def test_agrees_with_surface_distance(spacing):
    import surface_distance as sd  # pinned in requirements-dev.txt
    rng = np.random.default_rng(0)
    tolerances = scoring_for("kidney3d").surface_dice_tolerance
    for _ in range(3):
        gt = _random_blob(rng, (20, 18, 16), 3)
        pred = gt.copy()
        pred[rng.random(gt.shape) < 0.05] ^= True
        dist = sd.compute_surface_distances(gt, pred, spacing)
        assert dice(pred, gt) == pytest.approx(sd.compute_dice_coefficient(gt, pred), abs=1e-6)
        for tol in tolerances.values():  # KiTS23's own computation of Surface Dice
            assert surface_dice(pred, gt, spacing, tol) == pytest.approx(
                sd.compute_surface_dice_at_tolerance(dist, tol), abs=1e-5)
        # HD95: both take the larger directed 95th percentile; surface-distance weights surface
        # elements by area, MONAI counts boundary voxels: close, not identical
        ref = sd.compute_robust_hausdorff(dist, 95)
        assert hd95(pred, gt, spacing, 374) == pytest.approx(ref, rel=0.15)  # measured: at most 9.3 % apart


def test_metrics_package_imports_no_flare():
    import subprocess
    import sys

    code = "import sys, adpfl.metrics; print([m for m in sys.modules if m.split('.')[0] == 'nvflare'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
