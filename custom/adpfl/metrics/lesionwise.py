"""BraTS 2023/2024 lesion-wise Dice and HD95 of one region of one case.

Neither MONAI nor another installed library computes these, so they are implemented here
from the BraTS lesion-wise description (Saluja et al., BraTS 2023/2024 lesion-wise
performance metrics):

1. Ground-truth lesions: connected components of the region (26-connectivity); components
   whose dilations (below) touch are one lesion, so satellites next to a lesion do not count
   as separate lesions.
2. Each ground-truth lesion is dilated (``dilation_iterations`` of the 18-neighbourhood
   structuring element); every predicted connected component (26-connectivity) that
   intersects the dilated lesion is matched to it.
3. Each ground-truth lesion is scored by Dice and HD95 (:func:`adpfl.metrics.voxelwise.hd95`,
   in mm) between the lesion and the union of its matched predicted components; a missed
   lesion scores Dice 0 and HD95 = the penalty (374 mm).
4. Ground-truth lesions of ``min_volume`` mm^3 or less are left out of the score (their
   matched predictions are not false positives either).
5. Every predicted component matched to no ground-truth lesion is a false positive scoring
   Dice 0 and HD95 = the penalty.
6. The case's score is the mean over scored lesions and false positives; with neither (no
   lesion above the volume threshold and no false positive) Dice 1 and HD95 0.

Not reproduced from the official scripts: their merging of lesions across tissue labels
(e.g. an ET component touching a NETC one) and DeepMind's surface-element weighting of HD95
(see :mod:`adpfl.metrics.voxelwise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adpfl.metrics.voxelwise import dice as voxel_dice
from adpfl.metrics.voxelwise import hd95 as voxel_hd95

__all__ = ["LesionScore", "lesion_wise"]


@dataclass
class LesionScore:
    dice: float
    hd95: float
    lesions: int  # scored ground-truth lesions (above the volume threshold)
    missed: int  # of which no predicted component matched
    false_positives: int
    small_lesions: int  # ground-truth lesions left out by the volume threshold


def _bbox(sl: tuple, shape, margin: int) -> tuple:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(sl, shape))


def lesion_wise(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], dilation_iterations: int = 3,
                min_volume: float = 20.0, penalty: float = 374.0) -> LesionScore:
    """Lesion-wise Dice and HD95 of binary masks ``pred``/``gt`` (see the module docstring)."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    nd = gt.ndim
    conn = np.ones((3,) * nd, bool)  # 26-connectivity in 3D (8 in 2D)
    dil_struct = ndimage.generate_binary_structure(nd, 2)  # 18-neighbourhood in 3D
    k = int(dilation_iterations)
    voxel_volume = float(np.prod([float(s) for s in spacing]))

    pred_cc, n_pred = ndimage.label(pred, structure=conn)
    if gt.any():
        near, _ = ndimage.label(ndimage.binary_dilation(gt, dil_struct, iterations=k), structure=conn)
        lesions = np.where(gt, near, 0)
    else:
        lesions = np.zeros(gt.shape, np.int32)

    matched = set()
    dices: list[float] = []
    hds: list[float] = []
    missed = small = 0
    for lid, sl in enumerate(ndimage.find_objects(lesions), start=1):
        if sl is None:
            continue
        box = _bbox(sl, gt.shape, k + 1)
        lesion = lesions[box] == lid
        roi = ndimage.binary_dilation(lesion, dil_struct, iterations=k)
        hits = np.unique(pred_cc[box][roi])
        hits = hits[hits != 0]
        matched.update(int(h) for h in hits)
        if np.count_nonzero(lesion) * voxel_volume <= min_volume:
            small += 1
            continue
        full_lesion = lesions == lid
        matched_pred = np.isin(pred_cc, hits) if hits.size else np.zeros_like(pred)
        if not hits.size:
            missed += 1
        dices.append(voxel_dice(matched_pred, full_lesion))
        hds.append(voxel_hd95(matched_pred, full_lesion, spacing, penalty))
    n_fp = n_pred - len(matched)
    n = len(dices) + n_fp
    if n == 0:
        return LesionScore(1.0, 0.0, 0, 0, 0, small)
    return LesionScore(
        dice=float(sum(dices)) / n,
        hd95=(float(sum(hds)) + n_fp * float(penalty)) / n,
        lesions=len(dices),
        missed=missed,
        false_positives=n_fp,
        small_lesions=small,
    )
