"""The job modes: how a site's training result is protected before it leaves the site.

==========  ==============================================================================
``npfl``    no privacy protection (the baseline)
``dpfl``    update-level DP: clip + Gaussian noise with a fixed noise multiplier
``adpfl``   update-level DP with the adaptive noise schedule and adaptive clipping
``dpsgd``   record-level DP: DP-SGD inside local training (a different privacy unit)
``adpsgd``  record-level DP with adaptive per-sample clipping and a public noise schedule
==========  ==============================================================================

One home for the names, their order and their display labels; the job definition
(``flare/jobs.py``), the CLI, the comparison harness and its report, and the attack
evaluation read them from here. A plain module at the top of the package (not in
``tasks/``, which registers tasks; a job is a task x a mode) that imports nothing, so
every layer may use it.
"""

from __future__ import annotations

#: every job mode, in the order reports list them
MODES = ("npfl", "dpfl", "adpfl", "dpsgd", "adpsgd")

#: how reports and plots name each mode
MODE_LABELS = {"npfl": "NP-FL", "dpfl": "DP-FL", "adpfl": "ADP-FL", "dpsgd": "DP-SGD (record-level)",
               "adpsgd": "ADP-SGD (record-level)"}

#: the modes whose privacy unit is one training record (DP-SGD inside local training)
RECORD_MODES = ("dpsgd", "adpsgd")

#: the modes whose privacy unit is a site's whole update (the result filter's pipeline)
UPDATE_MODES = ("dpfl", "adpfl")

#: comparison-grid configurations that run a job mode with other privacy settings (``adpfl
#: compare --modes``; their settings: adpfl.experiments.compare.variant_privacy)
GRID_VARIANTS = {"adpfl_paper": "adpfl"}
MODE_LABELS["adpfl_paper"] = "ADP-FL paper config (Laplace)"


def job_mode(mode: str) -> str:
    """The job mode a comparison-grid mode runs (itself, or a variant's)."""
    return GRID_VARIANTS.get(mode, mode)

__all__ = ["GRID_VARIANTS", "MODES", "MODE_LABELS", "RECORD_MODES", "UPDATE_MODES", "job_mode"]
