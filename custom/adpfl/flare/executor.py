"""FLARE Executor: a thin adapter over :class:`adpfl.training.LocalTrainer`.

Tasks handled:
- ``train``: load the global weights, validate them on the site's validation set, train
  locally, validate the local model, return ``WEIGHT_DIFF`` (local - global) with the
  number of local steps. Metrics go to the server's TensorBoard through FLARE's analytics
  path (``send_analytic_dxo`` here, ``ConvertToFedEvent`` on the client,
  ``TBAnalyticsReceiver`` on the server).
- ``validate``: score received weights on the site's validation set (cross-site eval).

Record-level DP-SGD (``dpsgd=True``): local training runs with Opacus
(:class:`adpfl.training.dpsgd.DPSGDTrainer`), the site's record-level ledger
(``<ledger_dir>/<site>/<dpsgd_ledger_name>.json``) composes every DP-SGD round ever trained on
these records, and each result carries the record-level accounting under
``RECORD_PRIVACY_META_KEY`` (public parameters only: z, q, steps, delta, epsilon). The
training loss (computed on the private records without noise) is then not reported.

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

from adpfl.flare.privacy_meta import RECORD_PRIVACY_META_KEY
from adpfl.flare.site_config import is_simulation, read_site_config, resolve_data_root, resolve_ledger_dir
from adpfl.privacy.reservation import reserve_record_round, settle_record_round, sync_record_ledger
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
        dpsgd: bool = False,
        dpsgd_target_epsilon: float = 8.0,
        dpsgd_delta: float = 1e-5,
        dpsgd_max_grad_norm: float = 1.0,
        dpsgd_noise_multiplier: float = 0.0,
        dpsgd_planned_rounds: int = 0,
        dpsgd_ledger_name: str = "",
        ledger_dir: str = "",
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
            dpsgd: train with record-level DP-SGD (Opacus) instead of plain local training.
            dpsgd_target_epsilon / dpsgd_delta: the record-level budget of this site's data
                (cumulative over every DP-SGD job on it; the site's ``max_epsilon`` in
                ``local/adpfl_site.json`` caps it).
            dpsgd_max_grad_norm: per-sample L2 clip.
            dpsgd_noise_multiplier: fixed z (0 = calibrated from the remaining budget over
                ``dpsgd_planned_rounds`` rounds, the job's num_rounds).
            dpsgd_ledger_name: record-level ledger file name (default ``dpsgd_<task>``).
            ledger_dir: where the record-level ledger lives (default: the site workspace's
                ``adpfl_privacy``; the site's config or ``ADPFL_LEDGER_DIR`` override it).
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
        self.dpsgd = bool(dpsgd)
        self.dpsgd_target_epsilon = dpsgd_target_epsilon
        self.dpsgd_delta = dpsgd_delta
        self.dpsgd_max_grad_norm = dpsgd_max_grad_norm
        self.dpsgd_noise_multiplier = dpsgd_noise_multiplier
        self.dpsgd_planned_rounds = dpsgd_planned_rounds
        self.dpsgd_ledger_name = dpsgd_ledger_name or f"dpsgd_{task}"
        self.ledger_dir = ledger_dir
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
        self._dp_config = None
        if self.dpsgd:
            from adpfl.training.dpsgd import DPSGDConfig

            if os.sep in self.dpsgd_ledger_name or self.dpsgd_ledger_name.startswith("."):
                raise ValueError(f"dpsgd_ledger_name must be a plain file name, got {self.dpsgd_ledger_name!r}")
            # validated now (a bad DP-SGD setting stops the job at start-up, naming the setting)
            self._dp_config = DPSGDConfig(
                max_grad_norm=float(dpsgd_max_grad_norm),
                target_epsilon=float(dpsgd_target_epsilon),
                delta=float(dpsgd_delta),
                planned_rounds=int(dpsgd_planned_rounds) or None,
                noise_multiplier=float(dpsgd_noise_multiplier) or None,
            )
            if not dpsgd_noise_multiplier and not dpsgd_planned_rounds:
                raise ValueError("dpsgd needs dpsgd_planned_rounds (the job's num_rounds) or a dpsgd_noise_multiplier")
            self._dp_config.validate()
        self._record_ledger = None
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
        model = TaskNetwork(self.task)
        if self.dpsgd:
            from opacus.validators import ModuleValidator

            # the server's model must stay the task network (same keys), so it is checked,
            # not rewritten: MONAI's UNet here uses InstanceNorm without affine weights (no
            # BatchNorm), PReLU and transposed convolutions (Opacus' functorch path)
            errors = ModuleValidator.validate(model, strict=False)
            if errors:
                raise ValueError(f"task {self.task}'s network is not Opacus-compatible for DP-SGD: {errors}")
            self._trainer = self._make_dpsgd_trainer(fl_ctx, datalist)
        else:
            self._trainer = LocalTrainer(self._task_spec, datalist, self._train_config)
        self._model = model.to(self._trainer.device)

    def _make_dpsgd_trainer(self, fl_ctx: FLContext, datalist):
        """DP-SGD trainer continuing the site's record-level ledger (calibrated for what is left)."""
        import dataclasses

        from adpfl.training.dpsgd import DPSGDTrainer, RecordLedger

        site = fl_ctx.get_identity_name()
        ws_root = self._workspace_root(fl_ctx)
        dp = self._dp_config
        cap = read_site_config(ws_root).get("max_epsilon")
        if cap is not None and float(cap) < float(dp.target_epsilon):
            # the site's own cap wins over a job asking for more
            dp = dataclasses.replace(dp, target_epsilon=float(cap))
        folder = os.path.join(resolve_ledger_dir(self.ledger_dir, ws_root, is_simulation(fl_ctx)), site)
        path = os.path.join(folder, f"{self.dpsgd_ledger_name}.json")
        ledger = RecordLedger.load_or_create(path, delta=dp.delta)
        trainer = DPSGDTrainer(self._task_spec, datalist, self._train_config, dp, prior_history=ledger.history())
        # fail now, before any training, if the ledger cannot be locked, read or written
        # (H5: under its lock, re-read first, so other jobs' entries are never overwritten)
        sync_record_ledger(ledger, path)
        self._record_ledger = ledger
        self.log_info(
            fl_ctx,
            f"{site}: record-level DP-SGD, ledger {path} ({len(ledger.entries)} earlier rounds, epsilon "
            f"{ledger.epsilon():.4g} of {dp.target_epsilon} at delta={dp.delta}); z={trainer.noise_multiplier:.4g}, "
            f"q={trainer.sample_rate:.4g}, {trainer.steps_per_round} steps per round, clip {dp.max_grad_norm}",
        )
        return trainer

    # --- H5 (issue 12): the round is reserved in the record-level ledger before training
    def _reserve_dpsgd(self, fl_ctx: FLContext, current_round: int) -> tuple:
        """Reserve this round's DP-SGD steps in the site's record-level ledger, under its file
        lock and checked against every job's spend (BudgetExhausted: not trained). Returns
        ``(reservation id, the trainer's step count before the round)``."""
        trainer = self._trainer
        rid = reserve_record_round(
            self._record_ledger, target_epsilon=trainer.dp.target_epsilon, job_id=fl_ctx.get_job_id(),
            round=current_round, noise_multiplier=trainer.noise_multiplier, sample_rate=trainer.sample_rate,
            steps=trainer.steps_per_round,
        )
        return rid, sum(int(h[2]) for h in trainer.history)

    def _account_dpsgd(self, fl_ctx: FLContext, current_round: int, reservation: tuple) -> dict:
        """Settle the round's reservation with the DP-SGD steps the trainer took (also the
        steps of a round that failed or was aborted: they were computed; none taken: rolled
        back) and return the public accounting for the result's metadata."""
        ledger, trainer = self._record_ledger, self._trainer
        rid, steps_before = reservation
        settle_record_round(ledger, rid, sum(int(h[2]) for h in trainer.history) - steps_before)
        return {
            "unit": "record",
            "mechanism": "dpsgd",
            "delta": float(trainer.dp.delta),
            "noise_multiplier": float(trainer.noise_multiplier),
            "sample_rate": float(trainer.sample_rate),
            "max_grad_norm": float(trainer.dp.max_grad_norm),
            "steps_per_round": int(trainer.steps_per_round),
            "round": int(current_round),
            "history": [list(h) for h in ledger.history()],
            "epsilon_rdp": float(ledger.epsilon()),
            "target_epsilon": float(trainer.dp.target_epsilon),
        }

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
            record_meta = None
            reservation = self._reserve_dpsgd(fl_ctx, current_round) if self.dpsgd else None
            try:
                stats = self._trainer.train(self._model, should_stop=lambda: abort_signal.triggered)
            finally:
                if self.dpsgd:
                    # every computed DP-SGD step is accounted, whatever happens next; an
                    # unwritable ledger raises here and nothing is sent
                    record_meta = self._account_dpsgd(fl_ctx, current_round, reservation)
            if stats["aborted"]:
                return make_reply(ReturnCode.TASK_ABORTED)
            local_metrics = self._trainer.evaluate(self._model, with_hd95=self.hd95)
            self._send_metrics(fl_ctx, "val_local", local_metrics, current_round)
            if record_meta is None:
                # the DP-SGD loss is an un-noised statistic of the private records: not sent
                self._send_metrics(fl_ctx, "train", {"loss": stats["loss"]}, current_round)
            self.log_info(
                fl_ctx,
                f"round {current_round}: global dice {global_metrics['dice_mean']:.4f} -> local "
                f"{local_metrics['dice_mean']:.4f}, loss {stats['loss']:.4f}, {stats['steps']} steps "
                f"in {stats['seconds']:.1f}s"
                + (f"; record-level epsilon {record_meta['epsilon_rdp']:.4g} at delta={record_meta['delta']}"
                   if record_meta else ""),
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
        if record_meta is not None:
            out.set_meta_prop(RECORD_PRIVACY_META_KEY, record_meta)
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
