"""Test-only FLARE components: a site executor that injects faults (never shipped in the package).

Tests select it in the job config they build (``flare_helpers.inject_faults``), which copies
this file into the job's ``app/custom/`` folder: FLARE puts a job's custom folder on the site
process's ``sys.path`` (BYOC), so the simulator's site processes import it the way a real
deployment imports job code, with no environment variable and no hook in shipped code.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DataKind

from adpfl.flare.executor import SegmentationExecutor

#: nan_update (a NaN in the update), wrong_shape (an entry of the wrong shape), weights_kind
#: (full weights instead of a difference), crash (the site process exits, as a dying hospital
#: node would)
FAULTS = ("nan_update", "wrong_shape", "weights_kind", "crash")


class FaultInjectingExecutor(SegmentationExecutor):
    def __init__(self, faults: str = "", **kwargs):
        """Args:
        faults: "<site>:<fault>[:<round>]", comma-separated for several sites or rounds.
        kwargs: the SegmentationExecutor's settings.
        """
        super().__init__(**kwargs)
        self.faults = faults
        self._faults = []
        for spec in filter(None, (s.strip() for s in faults.split(","))):
            parts = spec.split(":")
            if len(parts) not in (2, 3) or parts[1] not in FAULTS:
                raise ValueError(f"fault spec must be <site>:<fault>[:<round>] with fault in {FAULTS}, got {spec!r}")
            self._faults.append((parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None))

    def _fault(self, site: str, current_round: int):
        for s, fault, rnd in self._faults:
            if s == site and (rnd is None or rnd == int(current_round)):
                return fault
        return None

    def make_result(self, result, global_weights, fl_ctx, current_round):
        out = super().make_result(result, global_weights, fl_ctx, current_round)
        fault = self._fault(fl_ctx.get_identity_name(), current_round)
        if fault is None:
            return out
        self.log_warning(fl_ctx, f"TEST FAULT INJECTION: {fault} in round {current_round}")
        first = next(iter(out.data))
        if fault == "crash":
            self.log_error(fl_ctx, f"test fault: crashing this site process in round {current_round}")
            os._exit(17)
        elif fault == "nan_update":
            out.data[first] = np.full_like(out.data[first], np.nan)
        elif fault == "wrong_shape":
            out.data[first] = np.zeros((3, 3), dtype=np.float32)
        elif fault == "weights_kind":
            out.data_kind = DataKind.WEIGHTS
            out.data = {k: global_weights[k].astype(np.float32) + d for k, d in out.data.items()}
        return out
