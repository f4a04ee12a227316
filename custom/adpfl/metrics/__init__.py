"""Scoring as the challenges score (pure: numpy, scipy, MONAI; no FLARE).

- :mod:`~adpfl.metrics.conventions`: one convention per task (empty cases, penalties,
  challenge metrics and their parameters);
- :mod:`~adpfl.metrics.voxelwise`: Dice and HD95 (MONAI) with the empty-case rules;
- :mod:`~adpfl.metrics.lesionwise`: BraTS 2023/2024 lesion-wise Dice and HD95;
- :mod:`~adpfl.metrics.surface`: KiTS23 Surface Dice, ISIC 2018 thresholded Jaccard;
- :mod:`~adpfl.metrics.scoring`: all metrics of a case, and means over cases ("no cases"
  = ``None``).
"""

from adpfl.metrics.conventions import BRATS_PENALTY_MM, SCORING, LesionWiseSpec, TaskScoring, scoring_for
from adpfl.metrics.lesionwise import LesionScore, lesion_wise
from adpfl.metrics.scoring import NO_CASES, ScoreAccumulator, metric_families, region_masks, score_case
from adpfl.metrics.surface import jaccard, surface_dice, thresholded_jaccard
from adpfl.metrics.voxelwise import dice, hd95, image_diagonal

__all__ = [
    "BRATS_PENALTY_MM", "SCORING", "LesionWiseSpec", "TaskScoring", "scoring_for", "LesionScore", "lesion_wise",
    "NO_CASES", "ScoreAccumulator", "metric_families", "region_masks", "score_case", "jaccard", "surface_dice",
    "thresholded_jaccard", "dice", "hd95", "image_diagonal",
]
