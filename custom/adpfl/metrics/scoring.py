"""Per-case scores of a label map against its ground truth, and their means over cases.

Metric keys (``<r>`` = an evaluation region of the task):

- ``dice_<r>``, ``hd95_<r>``: voxel-wise Dice and HD95 (all tasks; HD95 optional);
- ``lesion_dice_<r>``, ``lesion_hd95_<r>``: BraTS lesion-wise (brain3d);
- ``sdice_<r>``: KiTS23 Surface Dice (kidney3d);
- ``tjaccard_<r>``: ISIC thresholded Jaccard (skin2d);
- ``<family>_mean`` (``dice_mean``, ``lesion_dice_mean``, ...): mean over the regions.

A mean over no case is ``None`` ("no cases"), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from adpfl.metrics.conventions import TaskScoring
from adpfl.metrics.lesionwise import lesion_wise
from adpfl.metrics.surface import surface_dice, thresholded_jaccard
from adpfl.metrics.voxelwise import dice, hd95, image_diagonal

__all__ = ["region_masks", "score_case", "metric_families", "ScoreAccumulator", "NO_CASES"]

NO_CASES = "no cases"


def region_masks(labels: np.ndarray, regions: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Binary mask of each region (a union of label values) of an integer label map."""
    labels = np.asarray(labels)
    return {name: np.isin(labels, list(values)) for name, values in regions.items()}


def metric_families(scoring: TaskScoring, with_hd95: bool = True) -> list[str]:
    """The metric families a task reports, in order (voxel-wise first)."""
    fams = ["dice"] + (["hd95"] if with_hd95 else [])
    if scoring.lesion_wise is not None:
        fams += ["lesion_dice"] + (["lesion_hd95"] if with_hd95 else [])
    if scoring.surface_dice_tolerance is not None:
        fams.append("sdice")
    if scoring.jaccard_threshold is not None:
        fams.append("tjaccard")
    return fams


def score_case(pred_labels: np.ndarray, gt_labels: np.ndarray, regions: Mapping[str, tuple[int, ...]],
               scoring: TaskScoring, spacing: Sequence[float] | None = None,
               with_hd95: bool = True) -> dict[str, float]:
    """All metrics of one case (spatial label maps of equal shape; ``spacing`` per axis,
    default 1). Keys as in the module docstring, without the ``_mean`` ones."""
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and ground truth {gt_labels.shape} differ in shape")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * gt_labels.ndim))
    if len(spacing) != gt_labels.ndim:
        raise ValueError(f"spacing {spacing} does not match a {gt_labels.ndim}-D label map")
    penalty = scoring.hd95_penalty if scoring.hd95_penalty is not None else image_diagonal(gt_labels.shape, spacing)
    p_reg, g_reg = region_masks(pred_labels, regions), region_masks(gt_labels, regions)
    out: dict[str, float] = {}
    for r in regions:
        p, g = p_reg[r], g_reg[r]
        out[f"dice_{r}"] = dice(p, g)
        if with_hd95:
            out[f"hd95_{r}"] = hd95(p, g, spacing, penalty)
        lw = scoring.lesion_wise
        if lw is not None:
            s = lesion_wise(p, g, spacing, lw.dilation_iterations, lw.min_volume(r), lw.penalty_mm)
            out[f"lesion_dice_{r}"] = s.dice
            if with_hd95:
                out[f"lesion_hd95_{r}"] = s.hd95
        if scoring.surface_dice_tolerance is not None:
            out[f"sdice_{r}"] = surface_dice(p, g, spacing, scoring.surface_dice_tolerance[r])
        if scoring.jaccard_threshold is not None:
            out[f"tjaccard_{r}"] = thresholded_jaccard(p, g, scoring.jaccard_threshold)
    return out


class ScoreAccumulator:
    """Collects per-case scores; :meth:`summary` gives the mean of every key over the cases
    that have it, ``None`` for a key no case had, and each family's mean over regions."""

    def __init__(self, regions: Iterable[str], scoring: TaskScoring, with_hd95: bool = True):
        self.regions = list(regions)
        self.families = metric_families(scoring, with_hd95)
        self._values: dict[str, list[float]] = {f"{f}_{r}": [] for f in self.families for r in self.regions}
        self.cases = 0

    def add(self, case_scores: Mapping[str, float]) -> None:
        self.cases += 1
        for k, v in case_scores.items():
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"case score {k}={v!r} is not a finite number")
            self._values.setdefault(k, []).append(float(v))

    def summary(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {k: (float(np.mean(v)) if v else None) for k, v in self._values.items()}
        for f in self.families:
            vals = [out[f"{f}_{r}"] for r in self.regions if out.get(f"{f}_{r}") is not None]
            out[f"{f}_mean"] = float(np.mean(vals)) if vals else None
        return out
