"""FLARE Executor: a thin adapter over :class:`adpfl.training.LocalTrainer`.

Tasks handled:
- ``train``: load the global weights, validate them on the site's validation set, train
  locally, validate the local model, return ``WEIGHT_DIFF`` (local - global) with the
  number of local steps. Metrics go to the server's TensorBoard through FLARE's analytics
  path (``send_analytic_dxo`` here, ``ConvertToFedEvent`` on the client,
  ``TBAnalyticsReceiver`` on the server).
- ``validate``: score received weights on the site's validation set (cross-site eval).

Public information for the privacy filter (the change of the global model between the
last two rounds, known to every site and the server) is handed to the result filter in
the FL context under ``PUBLIC_INFO_PROP``; it never leaves the site.
"""

from __future__ import annotations

import os
import threading
from typing import Dict, Optional

import numpy as np
import torch
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.app_constant import AppConstants

from adpfl.flare.site_config import resolve_data_root
from adpfl.tasks.base import get_task
from adpfl.tasks.network import TaskNetwork
from adpfl.training import LocalTrainer, TrainConfig

PUBLIC_INFO_PROP = "adpfl.public_info"

#: test-only fault injection, read from the site process's environment (never from a job
#: config): "<site>:<fault>[:<round>]" (comma-separated for several sites) with fault in
#: nan_update, wrong_shape, weights_kind,
#: crash (the site process exits, as a dying hospital node would).
FAULT_ENV = "ADPFL_TEST_FAULT"


class SegmentationExecutor(Executor):
    def __init__(
        self,
        task: str = "skin2d",
        data_root: str = "",
        synthetic: bool = True,
        num_train: int = 40,
        num_val: int = 20,
        image_size: int = 0,
        data_seed: int = 0,
        local_epochs: int = 2,
        batch_size: int = 8,
        learning_rate: float = 1e-3,
        max_steps_per_round: int = 0,
        amp: bool = True,
        device: str = "auto",
        num_workers: int = 0,
        hd95: bool = True,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
    ):
        """Local MONAI training of one site.

        Args:
            task: skin2d, kidney3d or brain3d.
            data_root: the task's data folder holding ``<site>/datalist.json``; the site's
                ``local/adpfl_site.json`` or ``ADPFL_DATA_ROOT`` override it (see site_config).
            synthetic: generate the embedded synthetic data for this site when missing.
            num_train / num_val / image_size / data_seed: synthetic data settings.
            local_epochs, batch_size, learning_rate, max_steps_per_round, amp, device,
            num_workers: local training settings.
            hd95: also compute HD95 on validation.
        """
        super().__init__()
        self.task = task
        self.data_root = data_root
        self.synthetic = synthetic
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = image_size
        self.data_seed = data_seed
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_steps_per_round = max_steps_per_round
        self.amp = amp
        self.device = device
        self.num_workers = num_workers
        self.hd95 = hd95
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        # validate the settings now: a bad job config fails at start-up, naming the setting
        self._task_spec = get_task(task)
        self._train_config = TrainConfig(
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            max_steps_per_round=max_steps_per_round,
            amp=amp,
            image_size=image_size or None,
            device=device,
            num_workers=num_workers,
        )
        self._train_config.validate()
        self._task_spec.resolve_size(image_size or None)
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
        self._trainer: Optional[LocalTrainer] = None
        self._model: Optional[torch.nn.Module] = None
        self._prev_global: Optional[Dict[str, np.ndarray]] = None
        self._lock = threading.Lock()
        self._site = None

    # -- set-up -------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._site = fl_ctx.get_identity_name()

    def _workspace_root(self, fl_ctx: FLContext) -> Optional[str]:
        ws = fl_ctx.get_engine().get_workspace() if fl_ctx.get_engine() else None
        return ws.get_root_dir() if ws is not None else None

    def _setup(self, fl_ctx: FLContext) -> None:
        if self._trainer is not None:
            return
        from adpfl.data.datalist import load_site_datalist, validate_site
        from adpfl.data.synthetic import ensure_site_data

        site = fl_ctx.get_identity_name()
        root = resolve_data_root(self.task, self.data_root, self._workspace_root(fl_ctx))
        if self.synthetic:
            ensure_site_data(
                self.task,
                root,
                site,
                num_train=self.num_train,
                num_val=self.num_val,
                size=self.image_size or None,
                seed=self.data_seed,
            )
        datalist = load_site_datalist(root, site, task=self.task)
        validate_site(datalist)
        self.log_info(
            fl_ctx,
            f"{site}: task {self.task}, data {os.path.join(root, site)}: "
            f"{len(datalist['training'])} training / {len(datalist['validation'])} validation cases",
        )
        self._trainer = LocalTrainer(self._task_spec, datalist, self._train_config)
        self._model = TaskNetwork(self.task).to(self._trainer.device)

    # -- tasks --------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task_name, self.validate_task_name):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        with self._lock:
            try:
                self._setup(fl_ctx)
                dxo = from_shareable(shareable)
                if dxo.data_kind != DataKind.WEIGHTS:
                    self.log_error(fl_ctx, f"expected WEIGHTS from the server, got {dxo.data_kind}")
                    return make_reply(ReturnCode.BAD_TASK_DATA)
                self._load_global(dxo.data)
            except Exception as e:
                self.log_exception(fl_ctx, f"set-up for task {task_name} failed: {e}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            if task_name == self.validate_task_name:
                return self._validate(dxo, fl_ctx)
            return self._train(dxo, shareable, fl_ctx, abort_signal)

    def _load_global(self, weights: Dict[str, np.ndarray]) -> None:
        own = self._model.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ValueError(f"global weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        new_state = {}
        for k, v in weights.items():
            t = torch.as_tensor(np.asarray(v))
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"global weight {k} has shape {tuple(t.shape)}, model expects {tuple(own[k].shape)}")
            new_state[k] = t.to(own[k].dtype)
        self._model.load_state_dict(new_state)

    def _send_metrics(self, fl_ctx: FLContext, prefix: str, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is None or not np.isfinite(value):
                continue
            dxo = create_analytic_dxo(
                tag=f"{prefix}/{key}", value=float(value), data_type=AnalyticsDataType.SCALAR, global_step=int(step)
            )
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx)

    def _validate(self, dxo: DXO, fl_ctx: FLContext) -> Shareable:
        try:
            metrics = self._trainer.evaluate(self._model, with_hd95=self.hd95)
        except Exception as e:
            self.log_exception(fl_ctx, f"validation failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _train(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0
        global_weights = {k: np.asarray(v) for k, v in dxo.data.items()}
        try:
            self._publish_public_info(fl_ctx, global_weights, current_round)
            global_metrics = self._trainer.evaluate(self._model, with_hd95=self.hd95)
            self._send_metrics(fl_ctx, "val_global", global_metrics, current_round)
            stats = self._trainer.train(self._model, should_stop=lambda: abort_signal.triggered)
            if stats["aborted"]:
                return make_reply(ReturnCode.TASK_ABORTED)
            local_metrics = self._trainer.evaluate(self._model, with_hd95=self.hd95)
            self._send_metrics(fl_ctx, "val_local", local_metrics, current_round)
            self._send_metrics(fl_ctx, "train", {"loss": stats["loss"]}, current_round)
            self.log_info(
                fl_ctx,
                f"round {current_round}: global dice {global_metrics['dice_mean']:.4f} -> local "
                f"{local_metrics['dice_mean']:.4f}, loss {stats['loss']:.4f}, {stats['steps']} steps "
                f"in {stats['seconds']:.1f}s",
            )
            local_state = self._model.state_dict()
            diff = {}
            for k, g in global_weights.items():
                local = local_state[k].detach().to("cpu", torch.float32).numpy()
                diff[k] = (local - g.astype(np.float32)).astype(np.float32)
        except Exception as e:
            self.log_exception(fl_ctx, f"training round {current_round} failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        kind = DataKind.WEIGHT_DIFF
        fault = self._fault(fl_ctx, current_round)
        if fault == "crash":
            self.log_error(fl_ctx, f"{FAULT_ENV}: crashing this site process in round {current_round}")
            os._exit(17)
        elif fault == "nan_update":
            first = next(iter(diff))
            diff[first] = np.full_like(diff[first], np.nan)
        elif fault == "wrong_shape":
            first = next(iter(diff))
            diff[first] = np.zeros((3, 3), dtype=np.float32)
        elif fault == "weights_kind":
            kind = DataKind.WEIGHTS
            diff = {k: local_state[k].detach().cpu().float().numpy() for k in global_weights}
        out = DXO(
            data_kind=kind,
            data=diff,
            meta={
                MetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"],
                # global model's Dice on this site's validation set, read by the server's
                # model selector (an uncovered output: see the README's privacy section)
                MetaKey.INITIAL_METRICS: float(global_metrics["dice_mean"]),
            },
        )
        result = out.to_shareable()
        # the round travels with the result: the privacy filter accounts the release by it
        result.set_header(AppConstants.CURRENT_ROUND, int(current_round))
        return result

    def _fault(self, fl_ctx: FLContext, current_round: int) -> Optional[str]:
        """The fault injected into this site in this round, if the test environment asks
        for one (comma-separated specs, e.g. "site-1:nan_update,site-3:crash:1")."""
        for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
            parts = spec.strip().split(":")
            site, fault = parts[0], parts[1] if len(parts) > 1 else ""
            if site != fl_ctx.get_identity_name():
                continue
            if len(parts) > 2 and int(parts[2]) != int(current_round):
                continue
            self.log_warning(fl_ctx, f"TEST FAULT INJECTION ACTIVE ({FAULT_ENV}={spec}): {fault} in round {current_round}")
            return fault
        return None

    def _publish_public_info(self, fl_ctx: FLContext, global_weights: Dict[str, np.ndarray], current_round: int):
        """Hand public information to this site's result filter (it never leaves the site).

        ``public_scores``: magnitudes of the last global-model change (|w_t - w_{t-1}|), or of
        the global weights themselves in the first round; both are known to every site and
        the server, so a top-k mask chosen from them costs no privacy.
        ``global_change``: ||w_t - w_{t-1}|| / ||w_t||, the training-progress signal of the
        adaptive noise schedule (None in the first round).
        """
        info = {"round": int(current_round), "global_change": None, "public_scores": None}
        if self._prev_global is not None and set(self._prev_global) == set(global_weights):
            delta = {k: global_weights[k].astype(np.float32) - self._prev_global[k] for k in global_weights}
            num = float(np.sqrt(sum(float(np.square(d).sum()) for d in delta.values())))
            den = float(np.sqrt(sum(float(np.square(g.astype(np.float32)).sum()) for g in global_weights.values())))
            info["global_change"] = num / max(den, 1e-12)
            info["public_scores"] = {k: np.abs(d) for k, d in delta.items()}
        else:
            info["public_scores"] = {k: np.abs(v.astype(np.float32)) for k, v in global_weights.items()}
        self._prev_global = {k: v.astype(np.float32).copy() for k, v in global_weights.items()}
        fl_ctx.set_prop(PUBLIC_INFO_PROP, info, private=True, sticky=False)
