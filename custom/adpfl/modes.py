"""The job modes: how a site's training result is protected before it leaves the site.

==========  ==============================================================================
``npfl``    no privacy protection (the baseline)
``dpfl``    update-level DP: clip + Gaussian noise with a fixed noise multiplier
``adpfl``   update-level DP with the adaptive noise schedule and adaptive clipping
``dpsgd``   record-level DP: DP-SGD inside local training (a different privacy unit)
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

__all__ = ["MODES", "MODE_LABELS", "RECORD_MODES"]
