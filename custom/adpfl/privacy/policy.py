"""The server's privacy rules (moved from the FLARE widget and the job definition).

Pure functions the server-side adapter (:class:`adpfl.flare.privacy_widget.PrivacyAccountingWidget`)
applies; every site still enforces its own budget in its filter, and the server's
rules only mirror, reject and stop early (see docs/privacy-model.md):

* :func:`noise_floor`: the least noise multiplier a site's release may claim under
  the job's settings (contributions claiming less are rejected);
* :func:`site_total_epsilon` / :func:`projected_update_epsilon`: a site's best known
  update-level spend, and the spend after one more release at its last noise level
  (the early-stop projection);
* :func:`check_record_budget` / :func:`projected_record_epsilon`: the record-level
  (DP-SGD) budget check on a contribution, and its early-stop projection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from .config import PrivacyConfig
from .ledger import PrivacyLedger
from .record import opacus_rdp_epsilon
from .schedule import AdaptiveNoiseSchedule

#: relative slack on the record-level target: float round-off only (calibration lands at or
#: below the target; a fixed noise multiplier that overshoots it by any real amount is refused)
RECORD_TOLERANCE = 1e-9

UNIT = (
    "site-level update DP: each site's whole model update per round is the protected unit "
    "(replace-one neighbours, L2 sensitivity = 2 * clip_norm, sample rate 1, one release per round)"
)
RECORD_UNIT = (
    "record-level DP (DP-SGD at each site): one training image/patient of a site is the protected unit "
    "(add/remove-one, Poisson sampling, per-sample clipping); a different unit from the update-level figure, "
    "never added to it"
)
UNCOVERED = [
    "training/validation metrics each site reports (loss, Dice, HD95, lesion-wise and surface metrics) are not "
    "privatized",
    "the global model's validation Dice on each site (model selection, final-model selection) is not privatized",
    "participation (which sites answered in which round) is visible to the server",
    "NP-FL results carry the local step count, which reveals the site's training-set size (private update-level "
    "jobs send a constant weight instead)",
    "DP-SGD results carry the sample rate q = batch_size / n_train and the step counts: each site's exact number "
    "of training records n is treated as public",
    "a site's reported cumulative epsilon (update-level) and its whole (z, q, steps) DP-SGD history reveal how "
    "much it trained on the same data in earlier jobs",
    "round timing (when each site answers, how long its training took) is visible to the server",
    "floating-point exposure: noise is drawn and added in float64 and rounded to float32; float64 samplers have "
    "bounded support (about 8.5 sigma) and a finite grid, so releases are not an exact continuous Gaussian",
]


def noise_floor(settings: Mapping[str, Any]) -> float:
    """The least noise multiplier a release may claim under a job's filter ``settings``,
    computed exactly as the site computes its own: DP-FL's fixed z
    (:meth:`PrivacyConfig.resolved_noise_multiplier`, calibrated from the target when not
    given; Laplace too) or the adaptive schedule's floor, ``noise_min_factor`` times the
    schedule's even-spend ``z_plan`` (ADP-FL). Rounded DOWN to 4 significant digits (and
    1e-4 relative below): the floor is a policy, not a bit pattern, and must never reject
    a release the site's own rules allow."""
    known = {f.name for f in fields(PrivacyConfig)}
    config = PrivacyConfig(**{k: v for k, v in settings.items() if k in known})
    if config.mode == "adpfl" and config.noise_type != "laplace":  # Laplace: fixed z in both modes
        schedule = AdaptiveNoiseSchedule(
            target_epsilon=config.target_epsilon, delta=config.delta, planned_rounds=int(config.planned_rounds),
            accountant=config.accountant, min_factor=config.noise_min_factor, max_factor=config.noise_max_factor,
        )
        z = schedule.min_factor * schedule.z_plan
    else:
        z = config.resolved_noise_multiplier()
    z *= 1 - 1e-4
    scale = 10.0 ** (3 - math.floor(math.log10(z)))
    return math.floor(z * scale) / scale


def account_update_release(ledger: PrivacyLedger, meta: Mapping[str, Any], job_id: str | None) -> dict[str, Any]:
    """The server's own accounting of one checked release (:func:`adpfl.privacy.metadata.check_privacy_meta`):
    the released noise multiplier, clip and mask recorded in the server's ledger of the site,
    so every epsilon is recomputed rather than taken from the site; the site's own figure
    stays beside it (``site_reported_epsilon_rdp``). Returns the entry. Raises PrivacyError
    for a second release of the same round."""
    entry = ledger.record(
        round=int(meta["round"]),
        noise_multiplier=float(meta["noise_multiplier"]),
        update_noise_multiplier=float(meta.get("update_noise_multiplier", meta["noise_multiplier"])),
        clip_norm=float(meta["clip_norm"]),
        keep_fraction=float(meta["keep_fraction"]),
        mask_policy=str(meta["mask_policy"]),
        mask_covered=bool(meta["mask_covered"]),
        mechanism=meta["mechanism"],
        job_id=job_id,
    )
    entry["site_reported_epsilon_rdp"] = meta.get("epsilon_rdp")
    ledger.entries[-1] = entry
    return entry


def site_total_epsilon(ledger: PrivacyLedger, reported: float | None) -> float:
    """Best known cumulative epsilon of a site: this job's (server-computed) spend, or the
    site's own reported total (it may include earlier jobs) when that is larger."""
    own = ledger.epsilon("rdp")
    if isinstance(reported, (int, float)) and math.isfinite(reported):
        return max(own, float(reported))
    return own


def projected_update_epsilon(ledger: PrivacyLedger, reported: float | None) -> float:
    """The site's total after one more release at its last noise level (RDP)."""
    last = ledger.entries[-1]
    prior = max(0.0, site_total_epsilon(ledger, reported) - ledger.epsilon("rdp"))
    return prior + ledger.projected_epsilon(last["noise_multiplier"], "rdp", last["mechanism"])


def record_limit(target_epsilon: float) -> float:
    """The largest record-level epsilon accepted for ``target_epsilon`` (calibration slack)."""
    return float(target_epsilon) * (1 + RECORD_TOLERANCE)


def check_record_budget(record: Mapping[str, Any], target_epsilon: float) -> None:
    """ValueError unless the recomputed record-level epsilon of a checked contribution
    (:func:`adpfl.privacy.metadata.check_record_meta`) is within the budget."""
    if record["epsilon_recomputed"] > record_limit(target_epsilon):
        raise ValueError(
            f"record-level epsilon {record['epsilon_recomputed']:.4g} (recomputed from its history) "
            f"exceeds the job's record_target_epsilon {target_epsilon}"
        )


def projected_record_epsilon(
    history: Sequence[Sequence[float]], noise_multiplier: float, sample_rate: float, steps_per_round: int, delta: float
) -> float:
    """Record-level epsilon after one more round of ``steps_per_round`` DP-SGD steps."""
    hist = [tuple(h) for h in history]
    hist.append((noise_multiplier, sample_rate, steps_per_round))
    return opacus_rdp_epsilon(hist, delta)


__all__ = [
    "RECORD_TOLERANCE",
    "RECORD_UNIT",
    "UNCOVERED",
    "UNIT",
    "check_record_budget",
    "noise_floor",
    "projected_record_epsilon",
    "projected_update_epsilon",
    "record_limit",
    "site_total_epsilon",
]
