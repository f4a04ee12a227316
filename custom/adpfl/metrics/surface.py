"""KiTS23 Surface Dice and ISIC 2018 thresholded Jaccard of one binary region of one case.

Surface Dice is MONAI's :func:`monai.metrics.compute_surface_dice` with
``use_subvoxels=True``, which follows DeepMind's ``surface-distance`` (the library the KiTS23
evaluation uses): the fraction of both boundaries, weighted by surface-element area, lying
within the tolerance of the other boundary, with the image spacing. MONAI returns NaN when
both masks are empty; KiTS23 scores that 1, and one empty mask 0 (set here).

The thresholded Jaccard (ISIC 2018 Task 1) is not in MONAI; it is computed here from its
definition: the per-image Jaccard index, replaced by 0 when below the threshold (0.65).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice

from adpfl.metrics.voxelwise import crop_pair

__all__ = ["surface_dice", "jaccard", "thresholded_jaccard"]


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Surface Dice at ``tolerance`` (units of ``spacing``); both empty 1, one empty 0."""
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0
    if p_any != g_any:
        return 0.0
    p, g = crop_pair(np.asarray(pred, bool), np.asarray(gt, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = compute_surface_dice(
            torch.as_tensor(p)[None, None].float(),
            torch.as_tensor(g)[None, None].float(),
            class_thresholds=[float(tolerance)],
            include_background=True,
            spacing=[float(s) for s in spacing],
            use_subvoxels=p.ndim == 3,  # DeepMind's surface elements (3D only in MONAI)
        )
    return float(v[0, 0])


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index |P & G| / |P | G|; both empty 1."""
    union = int(np.count_nonzero(np.logical_or(pred, gt)))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(np.logical_and(pred, gt))) / union


def thresholded_jaccard(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.65) -> float:
    """ISIC 2018 Task 1 per-image score: the Jaccard index, 0 when below ``threshold``."""
    j = jaccard(pred, gt)
    return j if j >= threshold else 0.0
