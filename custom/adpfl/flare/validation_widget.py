"""Server-side validation of every contribution, in every job (private or not).

At ``BEFORE_CONTRIBUTION_ACCEPT`` (after any server-side result filters, before the
aggregator), a contribution with the wrong data kind, keys or shapes that do not match the
global model, or non-finite values is rejected: its return code is set to BAD_TASK_DATA,
which the aggregator disregards, and a log line names the site. The round completes with
the other sites.
"""

from __future__ import annotations

import threading

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from adpfl.flare.contribution_checks import check_update


class ContributionValidator(Widget):
    def __init__(self, expected_data_kind: str = DataKind.WEIGHT_DIFF):
        """Args:
        expected_data_kind: the only DXO kind accepted from sites (WEIGHT_DIFF).
        """
        super().__init__()
        self.expected_data_kind = expected_data_kind
        self._lock = threading.Lock()
        self.rejected = []

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            return
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        if result is None or result.get_return_code() not in (None, ReturnCode.OK):
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None) or "unknown site"
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        try:
            dxo = from_shareable(result)
            if dxo.data_kind != self.expected_data_kind:
                kind = getattr(dxo.data_kind, "value", dxo.data_kind)
                expected = getattr(self.expected_data_kind, "value", self.expected_data_kind)
                raise ValueError(f"data kind {kind}, expected {expected}")
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            weights = global_model.get("weights") if global_model is not None else None
            if not weights:
                raise ValueError("no global model to check the contribution against")
            check_update(dxo.data, {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()})
        except Exception as e:
            result.set_return_code(ReturnCode.BAD_TASK_DATA)
            with self._lock:
                self.rejected.append({"site": site, "round": current_round, "reason": str(e)})
            self.log_error(fl_ctx, f"rejected the contribution of {site} in round {current_round}: {e}")
