"""Voxel-wise Dice and HD95 of one binary region of one case, with the challenges' empty-case
rules (see :mod:`adpfl.metrics.conventions`).

The numbers come from MONAI: :func:`monai.metrics.compute_dice` with ``ignore_empty=False``
(empty ground truth: 1 if the prediction is empty too, else 0) and
:func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95`` and the image
``spacing``. MONAI's HD95 is the larger of the two directed 95th percentiles of the
distances from each mask's boundary voxels to the other mask (``directed=False``), Euclidean,
in the units of ``spacing``. (The DeepMind ``surface-distance`` HD95 used by the BraTS
scripts also takes the larger directed percentile, but weights boundary elements by their
surface area, so the two agree only approximately on small or jagged masks.) What MONAI
leaves undefined -- HD95 when either mask is empty -- is set here: both empty 0, one empty
the penalty distance.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

__all__ = ["dice", "hd95", "image_diagonal", "crop_pair"]


def _t(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(mask, dtype=bool))[None, None].float()


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks: both empty 1, empty ground truth with a prediction 0."""
    return float(compute_dice(_t(pred), _t(gt), include_background=True, ignore_empty=False)[0, 0])


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the diagonal of an image of ``shape`` voxels of size ``spacing``."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def crop_pair(a: np.ndarray, b: np.ndarray, margin: int = 1):
    """Both masks cropped to the bounding box of their union, ``margin`` voxels wider (distances
    and overlaps are unchanged; the metrics run on far fewer voxels)."""
    union = a | b
    if not union.any():
        return a, b
    idx = np.nonzero(union)
    sl = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    pad = [(margin, margin)] * a.ndim
    return np.pad(a[sl], pad), np.pad(b[sl], pad)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], penalty: float) -> float:
    """MONAI's symmetric HD95 (max of the two directed 95th percentiles) in the units of
    ``spacing``; both empty 0, exactly one empty ``penalty``."""
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 0.0
    if p_any != g_any:
        return float(penalty)
    p, g = crop_pair(np.asarray(pred, bool), np.asarray(gt, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = compute_hausdorff_distance(_t(p), _t(g), include_background=True, percentile=95,
                                       spacing=[float(s) for s in spacing])
    return float(v[0, 0])
