"""What the adaptive parts of the privacy layer may read: already-public values only.

Every site and the server receive the global model of each round, so anything computed
from two consecutive global models is public: reading it costs no privacy. This module
computes those signals (moved from the FLARE executor); the site hands them to its
result filter in memory, and they never leave the site. See docs/privacy-model.md.

* ``public_scores``: ``|w_t - w_{t-1}|`` per entry (the last global-model change), or
  ``|w_t|`` in the first round; the ``topk_public`` mask is chosen from them.
* ``global_change``: ``||w_t - w_{t-1}|| / ||w_t||``, the training-progress signal of
  :class:`adpfl.privacy.schedule.AdaptiveNoiseSchedule` (None in the first round).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: name under which a site hands the public signals to its result filter (FL context
#: property; private to the site)
PUBLIC_INFO_PROP = "adpfl.public_info"


def public_signals(
    global_weights: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray] | None,
    round_index: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The public signals of round ``round_index`` and the snapshot to pass as ``previous``
    next round.

    Args:
        global_weights: the global model this round starts from.
        previous: the snapshot returned for the previous round (None in the first round
            this site takes part in, or when the model's keys changed).
        round_index: the round (0-based), stored in the result.

    Returns:
        ``({"round", "global_change", "public_scores"}, snapshot)``.
    """
    info: dict[str, Any] = {"round": int(round_index), "global_change": None, "public_scores": None}
    if previous is not None and set(previous) == set(global_weights):
        delta = {k: global_weights[k].astype(np.float32) - previous[k] for k in global_weights}
        num = float(np.sqrt(sum(float(np.square(d).sum()) for d in delta.values())))
        den = float(np.sqrt(sum(float(np.square(g.astype(np.float32)).sum()) for g in global_weights.values())))
        info["global_change"] = num / max(den, 1e-12)
        info["public_scores"] = {k: np.abs(d) for k, d in delta.items()}
    else:
        info["public_scores"] = {k: np.abs(v.astype(np.float32)) for k, v in global_weights.items()}
    snapshot = {k: v.astype(np.float32).copy() for k, v in global_weights.items()}
    return info, snapshot


__all__ = ["PUBLIC_INFO_PROP", "public_signals"]
