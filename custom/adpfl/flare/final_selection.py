"""Let the final global model compete for "best".

FLARE's ``IntimeModelSelector`` scores the global model a site receives at the start of a
round (the ``INITIAL_METRICS`` the executor reports) and, when it beats the best so far, the
persistor saves it as ``best_FL_global_model.pt``. The aggregate of the last round is never
sent out for training, so it is never scored: the "best" model could never be the final one,
and in runs that improve to the end "best" was strictly worse than final.

:class:`FinalModelSelection` is a server workflow that runs after ``ScatterAndGather``: it
sends the final global model to every site on the ``validate`` task, averages the sites'
``dice_mean`` exactly as the selector averages ``INITIAL_METRICS`` (equal weights over the
sites that answered), and if that beats the selector's best it fires FLARE's own
``GLOBAL_BEST_MODEL_AVAILABLE`` event with the final model, so the persistor saves it as the
best model. The validation scores it reads are the same uncovered output as the final
cross-site evaluation (``GlobalModelEval``) reports for that model anyway.

Written here because FLARE 2.9 has no workflow that scores the last aggregate for selection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller, Task
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import model_learnable_to_dxo
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType


def mean_score(scores: Iterable[float | None]) -> float | None:
    """Unweighted mean of the finite scores (None when there is none)."""
    ok = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
    return sum(ok) / len(ok) if ok else None


def final_beats_best(final: float | None, best: float) -> bool:
    """The final model becomes the best when it scores strictly higher (or nothing was scored)."""
    return final is not None and final > best


class FinalModelSelection(Controller):
    def __init__(
        self,
        persistor_id: str = "persistor",
        model_selector_id: str = "model_selector",
        validation_task_name: str = AppConstants.TASK_VALIDATION,
        validation_timeout: int = 600,
        key_metric: str = "dice_mean",
    ):
        """Args:
        persistor_id: the ``PTFileModelPersistor`` holding the final global model.
        model_selector_id: the ``IntimeModelSelector`` whose best score the final model must beat.
        validation_task_name: the sites' validation task.
        validation_timeout: seconds to wait for the sites' scores.
        key_metric: the metric of a site's validation result that is averaged.
        """
        super().__init__()
        self.persistor_id = persistor_id
        self.model_selector_id = model_selector_id
        self.validation_task_name = validation_task_name
        self.validation_timeout = validation_timeout
        self.key_metric = key_metric
        self._persistor = None
        self._selector = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        self._persistor = engine.get_component(self.persistor_id)
        self._selector = engine.get_component(self.model_selector_id)
        if self._persistor is None or self._selector is None:
            self.system_panic(f"final model selection needs components {self.persistor_id!r} and "
                              f"{self.model_selector_id!r}", fl_ctx)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        pass

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        if abort_signal.triggered or self._persistor is None or self._selector is None:
            return  # start_controller already panicked on a missing component
        name = self._persistor.global_model_file_name
        model = self._persistor.get_model(name, fl_ctx)
        if model is None:
            self.log_warning(fl_ctx, f"no final global model ({name}) to score; best model unchanged")
            return
        task = Task(name=self.validation_task_name, data=model_learnable_to_dxo(model).to_shareable(),
                    timeout=int(self.validation_timeout))
        self.broadcast_and_wait(task, fl_ctx, min_responses=0, abort_signal=abort_signal)
        if abort_signal.triggered:
            return
        scores = {ct.client.name: self._score(ct.result, fl_ctx, ct.client.name) for ct in task.client_tasks}
        final = mean_score(scores.values())
        best = float(self._selector.best_val_metric)
        self.log_info(fl_ctx, f"final global model: {self.key_metric} {final} over {scores} "
                              f"(best of the rounds: {best})")
        if not final_beats_best(final, best):
            return
        self._selector.best_val_metric = final
        self._selector.best_raw_val_metric = final
        # ScatterAndGather holds GLOBAL_MODEL as a sticky property: set it the same way (FLARE
        # refuses, with a warning, to change a property's stickiness, and keeps the old value)
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=True)
        fl_ctx.set_prop(AppConstants.VALIDATION_RESULT, final, private=True, sticky=False)
        fl_ctx.set_prop(AppConstants.METRICS_SELECTION_INFO, {
            "source": type(self).__name__, "metric_source": self.validation_task_name,
            "key_metric": {"name": self.key_metric, "mode": "max"}, "best_round": "final",
            "best_metrics": {self.key_metric: final},
        }, private=True, sticky=False)
        self.log_info(fl_ctx, f"the final global model is the best model ({self.key_metric} {final:.4f} > {best:.4f})")
        self.fire_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)

    def _score(self, result, fl_ctx: FLContext, site: str) -> float | None:
        if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            self.log_warning(fl_ctx, f"{site} did not score the final model")
            return None
        try:
            dxo = from_shareable(result)
            if dxo.data_kind != DataKind.METRICS:
                raise ValueError(f"data kind {dxo.data_kind}")
            return float(dxo.data[self.key_metric])
        except Exception as e:
            self.log_warning(fl_ctx, f"{site}'s score of the final model is unusable: {e}")
            return None
