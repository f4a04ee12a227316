"""How each task is scored: the challenge it follows, its empty-case rules and its
challenge metrics (one convention per task, used by every place the bundle scores).

Voxel-wise rules, all tasks (per case and region, as BraTS 2023/2024 "legacy" Dice/HD95 and
KiTS23 score them):

==========================  ============  ===========================================
ground truth / prediction   Dice          HD95
==========================  ============  ===========================================
both empty                  1             0
one of them empty           0             the task's penalty distance (below)
both non-empty              MONAI Dice    MONAI HD95 (see ``voxelwise``)
==========================  ============  ===========================================

Every case is therefore scored for every region; a region mean over no case at all (no
validation case, or the metric switched off) is ``None`` ("no cases"), never 0.

Penalty distance: BraTS's 374 mm (the diagonal of the 240 x 240 x 155 SRI-24 space at 1 mm,
the value of the BraTS 2023/2024 lesion-wise scripts); for kidney3d and skin2d, whose
challenges rank no HD95, the diagonal of the scored image in its own units (the largest
distance possible in it).

Challenge metrics beside the voxel-wise ones:

* brain3d (BraTS 2024 GLI): lesion-wise Dice and HD95 on ET, NETC, SNFH, RC, TC, WT
  (:mod:`adpfl.metrics.lesionwise`). Label 4 is the resection cavity (RC): its own region,
  not part of TC (1, 3) or WT (1, 2, 3), as in the BraTS 2024 GLI definition and its
  official evaluation configuration.
* kidney3d (KiTS23): Surface Dice on the hierarchical regions kidney+tumour+cyst,
  tumour+cyst, tumour at KiTS23's tolerances 1.0331, 1.1329, 1.1498 mm; empty rules as
  the voxel-wise Dice (both empty 1, one empty 0).
* skin2d (ISIC 2018 Task 1): thresholded Jaccard: per-image Jaccard, 0 when below 0.65;
  both empty counts 1.

Distances are in mm from the image spacing (skin2d: pixels, ISIC images carry no spacing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["LesionWiseSpec", "TaskScoring", "SCORING", "scoring_for", "BRATS_PENALTY_MM", "FAMILY_LABELS", "describe"]

#: BraTS 2023/2024 penalty distance (mm) for a missed lesion, a false positive lesion or an
#: empty-vs-non-empty region
BRATS_PENALTY_MM = 374.0


@dataclass(frozen=True)
class LesionWiseSpec:
    """BraTS lesion-wise matching parameters (BraTS 2024 GLI evaluation)."""

    #: iterations of a binary dilation with the 18-neighbourhood (3x3x3 cube less its
    #: corners) applied to each ground-truth lesion to find the predicted lesions it matches
    dilation_iterations: int = 3
    #: ground-truth lesions of this volume (mm^3) or less are not scored (per region)
    min_volume_mm3: Mapping[str, float] = field(default_factory=dict)
    default_min_volume_mm3: float = 20.0
    penalty_mm: float = BRATS_PENALTY_MM

    def min_volume(self, region: str) -> float:
        return float(self.min_volume_mm3.get(region, self.default_min_volume_mm3))


@dataclass(frozen=True)
class TaskScoring:
    task: str
    challenge: str
    #: None: the diagonal of the scored image (in its distance unit)
    hd95_penalty: float | None
    distance_unit: str = "mm"
    lesion_wise: LesionWiseSpec | None = None
    #: KiTS Surface Dice tolerance per region (distance unit); None: not scored
    surface_dice_tolerance: Mapping[str, float] | None = None
    #: ISIC thresholded Jaccard: per-image Jaccard below this counts 0; None: not scored
    jaccard_threshold: float | None = None


SCORING: dict[str, TaskScoring] = {
    "brain3d": TaskScoring(
        task="brain3d",
        challenge="BraTS 2024 GLI",
        hd95_penalty=BRATS_PENALTY_MM,
        # the official GLI script sets its threshold to 10 mm^3 at ET and keeps it for the regions
        # scored after ET (RC), so RC lesions of 10-20 mm^3 count there too
        lesion_wise=LesionWiseSpec(min_volume_mm3={"ET": 10.0, "RC": 10.0}, default_min_volume_mm3=20.0),
    ),
    "kidney3d": TaskScoring(
        task="kidney3d",
        challenge="KiTS23",
        hd95_penalty=None,
        surface_dice_tolerance={"kidney_tumor_cyst": 1.0330772532390826, "tumor_cyst": 1.1328796488598762,
                                "tumor": 1.1498198361434828},
    ),
    "skin2d": TaskScoring(
        task="skin2d",
        challenge="ISIC 2018 Task 1",
        hd95_penalty=None,
        distance_unit="px",
        jaccard_threshold=0.65,
    ),
}


def scoring_for(task_name: str) -> TaskScoring:
    try:
        return SCORING[task_name]
    except KeyError:
        raise ValueError(f"no scoring convention for task {task_name!r}; known: {sorted(SCORING)}") from None


#: display names of the metric families (key prefixes) of :mod:`adpfl.metrics.scoring`
FAMILY_LABELS = {
    "dice": "Dice",
    "hd95": "HD95",
    "lesion_dice": "Lesion-wise Dice",
    "lesion_hd95": "Lesion-wise HD95",
    "sdice": "Surface Dice",
    "tjaccard": "Thresholded Jaccard",
}


def describe(task_name: str) -> list:
    """One sentence per metric the task reports: its definition, empty cases and units
    (printed in the comparison report)."""
    s = scoring_for(task_name)
    u = s.distance_unit
    pen = (f"{s.hd95_penalty:g} {u}" if s.hd95_penalty is not None
           else f"the diagonal of the image in {u}")
    lines = [
        f"Scoring follows {s.challenge}, on the original image grid (predictions resampled back), "
        f"distances in {u} from the image spacing; every case counts for every region, and a "
        "figure over no case is printed as 'no cases'.",
        "Dice: voxel-wise per case and region (MONAI); both masks empty 1, one empty 0; mean over cases.",
        "HD95: MONAI's symmetric 95th-percentile Hausdorff distance (the larger of the two directed 95th "
        f"percentiles of boundary-voxel distances); both empty 0, one empty {pen}.",
    ]
    if s.lesion_wise is not None:
        lw = s.lesion_wise
        small = ", ".join(f"{r} {v:g}" for r, v in sorted(lw.min_volume_mm3.items()))
        lines.append(
            "Lesion-wise Dice / HD95 (BraTS 2023/2024): ground-truth lesions = 26-connected components merged "
            f"when within {lw.dilation_iterations} dilations; predicted components touching a lesion dilated "
            f"{lw.dilation_iterations} times are matched to it; missed lesions and unmatched predicted components "
            f"score Dice 0 and HD95 {lw.penalty_mm:g} mm; lesions of {lw.default_min_volume_mm3:g} mm^3 or less "
            f"({small} mm^3) are not scored; per case the mean over lesions and false positives (none: 1 and 0). "
            "RC (label 4) is its own region, outside TC and WT.")
    if s.surface_dice_tolerance is not None:
        tol = ", ".join(f"{r} {v:.4f} {u}" for r, v in s.surface_dice_tolerance.items())
        lines.append(f"Surface Dice (KiTS23): boundary fraction within the tolerance ({tol}), surface elements "
                     "weighted by area (MONAI, DeepMind convention); both empty 1, one empty 0.")
    if s.jaccard_threshold is not None:
        lines.append(f"Thresholded Jaccard (ISIC 2018 Task 1): per-image Jaccard, 0 when below "
                     f"{s.jaccard_threshold:g}; both empty 1.")
    return lines
