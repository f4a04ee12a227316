"""FLARE Executor: shareable in, shareable out, over :class:`adpfl.training.site.SiteSession`.

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

from adpfl.flare.site_config import is_simulation, read_site_config, resolve_data_root, resolve_ledger_dir
from adpfl.privacy.config import DPSGDConfig
from adpfl.privacy.errors import PrivacyConfigError
from adpfl.privacy.metadata import RECORD_PRIVACY_META_KEY
from adpfl.privacy.public_signals import PUBLIC_INFO_PROP
from adpfl.settings import InitialModelSettings
from adpfl.training import TrainConfig
from adpfl.training.site import RoundResult, SiteConfig, SiteSession

# the job-config surface below defaults from these (the one registry of names, defaults and
# units; see adpfl.settings and the README's settings tables)
_S, _T, _D = SiteConfig, TrainConfig, DPSGDConfig


class SegmentationExecutor(Executor):
    def __init__(
        self,
        task: str = _S.task,
        network: str = _S.network,
        data_root: str | None = _S.data_root,
        synthetic: bool = _S.synthetic,
        data_size: str = _S.data_size,
        num_train: int | None = _S.num_train,
        num_val: int | None = _S.num_val,
        image_size: int | None = _T.image_size,
        data_seed: int = _S.data_seed,
        local_epochs: int = _T.local_epochs,
        batch_size: int = _T.batch_size,
        learning_rate: float = _T.learning_rate,
        max_steps_per_round: int | None = _T.max_steps_per_round,
        trainable: str = _T.trainable,
        amp: bool = _T.amp,
        device: str = _T.device,
        num_workers: int = _T.num_workers,
        seed: int | None = _T.seed,
        hd95: bool = _S.hd95,
        dpsgd: bool = _S.dpsgd,
        dpsgd_target_epsilon: float | None = _D.target_epsilon,
        dpsgd_delta: float = _D.delta,
        dpsgd_max_grad_norm: float = _D.max_grad_norm,
        dpsgd_noise_multiplier: float | None = _D.noise_multiplier,
        dpsgd_planned_rounds: int | None = _D.planned_rounds,
        dpsgd_adaptive: bool = _D.adaptive,
        dpsgd_clip_quantile: float = _D.clip_quantile,
        dpsgd_clip_learning_rate: float = _D.clip_learning_rate,
        dpsgd_clip_count_noise: float = _D.clip_count_noise,
        dpsgd_noise_min_factor: float = _D.noise_min_factor,
        dpsgd_noise_max_factor: float = _D.noise_max_factor,
        dpsgd_keep_fraction: float = _D.keep_fraction,
        dpsgd_augmult: int = _D.augmult,
        dpsgd_ema_decay: float = _D.ema_decay,
        dpsgd_physical_batch_size: int | None = _D.physical_batch_size,
        dpsgd_public_num_records: int | None = _D.public_num_records,
        dpsgd_lr_schedule: str = _D.lr_schedule,
        dpsgd_lr_final_factor: float = _D.lr_final_factor,
        dpsgd_ema_warmup: bool = _D.ema_warmup,
        dpsgd_ledger_name: str | None = _S.dpsgd_ledger_name,
        ledger_dir: str | None = _S.ledger_dir,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        initial_checkpoint: str | None = InitialModelSettings.initial_checkpoint,
    ):
        """Local MONAI training of one site: FLARE glue over :class:`adpfl.training.site.SiteSession`.

        Every argument is a field of :class:`~adpfl.training.site.SiteConfig`,
        :class:`~adpfl.training.TrainConfig` or (``dpsgd_*``) :class:`~adpfl.training.dpsgd.DPSGDConfig`,
        where its meaning, unit and default are defined (rendered in the README's settings
        table); ``train_task_name`` / ``validate_task_name`` are the FLARE task names served.

        Raises:
            ValueError / PrivacyConfigError: a bad setting, at start-up, naming the setting.
        """
        super().__init__()
        self.task = task
        self.network = network
        self.data_root = data_root
        self.synthetic = synthetic
        self.data_size = data_size
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = image_size
        self.data_seed = data_seed
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_steps_per_round = max_steps_per_round
        self.trainable = trainable
        self.amp = amp
        self.device = device
        self.num_workers = num_workers
        self.seed = seed
        self.hd95 = hd95
        self.dpsgd = bool(dpsgd)
        self.dpsgd_target_epsilon = dpsgd_target_epsilon
        self.dpsgd_delta = dpsgd_delta
        self.dpsgd_max_grad_norm = dpsgd_max_grad_norm
        self.dpsgd_noise_multiplier = dpsgd_noise_multiplier
        self.dpsgd_planned_rounds = dpsgd_planned_rounds
        # ADP-SGD and the best-DP-training options (DPSGDConfig fields of the same name)
        extra = dict(adaptive=dpsgd_adaptive, clip_quantile=dpsgd_clip_quantile,
                     clip_learning_rate=dpsgd_clip_learning_rate, clip_count_noise=dpsgd_clip_count_noise,
                     noise_min_factor=dpsgd_noise_min_factor, noise_max_factor=dpsgd_noise_max_factor,
                     keep_fraction=dpsgd_keep_fraction, augmult=dpsgd_augmult, ema_decay=dpsgd_ema_decay,
                     physical_batch_size=dpsgd_physical_batch_size, public_num_records=dpsgd_public_num_records,
                     lr_schedule=dpsgd_lr_schedule, lr_final_factor=dpsgd_lr_final_factor,
                     ema_warmup=dpsgd_ema_warmup)
        for name, value in extra.items():
            setattr(self, f"dpsgd_{name}", value)
        self.ledger_dir = ledger_dir
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        # the job's warm start: the server builds the initial global model from it (jobs.py);
        # kept here so the job config shows it beside the network, never read at the site
        self.initial_checkpoint = initial_checkpoint
        self._site_config = SiteConfig(
            task=task, network=network, data_root=data_root, synthetic=synthetic, data_size=data_size,
            num_train=num_train, num_val=num_val,
            data_seed=data_seed, hd95=hd95, dpsgd=self.dpsgd, dpsgd_ledger_name=dpsgd_ledger_name,
            ledger_dir=ledger_dir,
        )
        # the exported job shows the ledger's real file name
        self.dpsgd_ledger_name = self._site_config.validate().ledger_name
        self._train_config = TrainConfig(
            local_epochs=local_epochs, batch_size=batch_size, learning_rate=learning_rate,
            max_steps_per_round=max_steps_per_round, trainable=trainable, amp=amp, image_size=image_size, device=device,
            num_workers=num_workers, seed=seed,
        )
        dp = None
        if self.dpsgd:
            if dpsgd_noise_multiplier is None and dpsgd_planned_rounds is None:
                raise ValueError("dpsgd needs dpsgd_planned_rounds (the job's num_rounds) or a dpsgd_noise_multiplier")
            dp = DPSGDConfig(
                max_grad_norm=dpsgd_max_grad_norm, target_epsilon=dpsgd_target_epsilon, delta=dpsgd_delta,
                planned_rounds=dpsgd_planned_rounds, noise_multiplier=dpsgd_noise_multiplier, **extra,
            )
        self._session_args = (self._site_config, self._train_config, dp)
        # validated now: a bad job config fails at start-up, naming the setting
        try:
            SiteSession("", *self._session_args)
        except PrivacyConfigError as e:
            raise PrivacyConfigError(f"DP-SGD setting (executor argument dpsgd_<name>): {e}") from None
        self._session: SiteSession | None = None
        self._state_checked = False
        self._lock = threading.Lock()
        self._site = None

    # -- set-up -------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._site = fl_ctx.get_identity_name()

    def _workspace_root(self, fl_ctx: FLContext) -> str | None:
        ws = fl_ctx.get_engine().get_workspace() if fl_ctx.get_engine() else None
        return ws.get_root_dir() if ws is not None else None

    def _setup(self, fl_ctx: FLContext) -> SiteSession:
        """The site's session, set up on the first task: where the data and the ledger are
        is the site's decision (its workspace config), read here."""
        if self._session is not None:
            return self._session
        session = SiteSession(fl_ctx.get_identity_name(), *self._session_args)
        ws_root = self._workspace_root(fl_ctx)
        data_root = resolve_data_root(self.task, self.data_root, ws_root)
        ledger_folder, cap, public_n = None, None, None
        if self.dpsgd:
            ledger_folder = resolve_ledger_dir(self.ledger_dir, ws_root, is_simulation(fl_ctx))
            site_cfg = read_site_config(ws_root)  # the site's own cap and declared public record count win
            cap, public_n = site_cfg.get("max_epsilon"), site_cfg.get("public_num_records")
        for line in session.setup(data_root, ledger_folder=ledger_folder, max_epsilon=cap,
                                  public_num_records=public_n):
            self.log_info(fl_ctx, line)
        self._session = session
        return session

    # -- tasks --------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task_name, self.validate_task_name):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        with self._lock:
            try:
                session = self._setup(fl_ctx)
                dxo = from_shareable(shareable)
                if dxo.data_kind != DataKind.WEIGHTS:
                    self.log_error(fl_ctx, f"expected WEIGHTS from the server, got {dxo.data_kind}")
                    return make_reply(ReturnCode.BAD_TASK_DATA)
                train = task_name == self.train_task_name
                current_round = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0) if train else None
                if train and not self._state_checked:
                    self._load_session_state(session, current_round, fl_ctx)
                global_weights = session.load_global(dxo.data, current_round)
            except Exception as e:
                self.log_exception(fl_ctx, f"set-up for task {task_name} failed: {e}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            if task_name == self.validate_task_name:
                return self._validate(session, fl_ctx)
            return self._train(session, global_weights, shareable, fl_ctx, abort_signal)

    def _send_metrics(self, fl_ctx: FLContext, prefix: str, metrics: dict[str, float | None], step: int) -> None:
        for key, value in metrics.items():
            if value is None or not np.isfinite(value):
                continue  # "no cases": nothing is plotted rather than a fake 0
            dxo = create_analytic_dxo(
                tag=f"{prefix}/{key}", value=float(value), data_type=AnalyticsDataType.SCALAR, global_step=int(step)
            )
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx)

    def _validate(self, session: SiteSession, fl_ctx: FLContext) -> Shareable:
        try:
            metrics = session.validate()
        except Exception as e:
            self.log_exception(fl_ctx, f"validation failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _train(self, session: SiteSession, global_weights, shareable: Shareable, fl_ctx: FLContext,
               abort_signal: Signal) -> Shareable:
        current_round = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0)
        try:
            # the public signals (adpfl.privacy.public_signals) for this site's result filter; never sent
            fl_ctx.set_prop(PUBLIC_INFO_PROP, session.public_info, private=True, sticky=False)
            result = session.train_round(
                global_weights, current_round, job_id=fl_ctx.get_job_id(),
                should_stop=lambda: abort_signal.triggered,
                report=lambda prefix, metrics: self._send_metrics(fl_ctx, prefix, metrics, current_round),
            )
            if result.aborted:
                return make_reply(ReturnCode.TASK_ABORTED)
            self.log_info(fl_ctx, result.summary(current_round))
            self._save_session_state(session, current_round, fl_ctx)
            out = self.make_result(result, global_weights, fl_ctx, current_round)
        except Exception as e:
            self.log_exception(fl_ctx, f"training round {current_round} failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return self.to_result_shareable(out, current_round)

    def make_result(self, result: RoundResult, global_weights: dict[str, np.ndarray], fl_ctx: FLContext,
                    current_round: int) -> DXO:
        """The round's outgoing DXO: ``WEIGHT_DIFF`` with the step count, the global model's
        Dice on this site (read by the server's model selector) and, under DP-SGD, the
        public record-level accounting."""
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: result.steps}
        if result.global_metrics.get("dice_mean") is not None:
            # global model's Dice (adpfl.metrics conventions, mean over regions) on this site's
            # validation set, read by the server's model selector (an uncovered output: see the
            # README's privacy section); "no cases" sends none rather than a fake 0
            meta[MetaKey.INITIAL_METRICS] = float(result.global_metrics["dice_mean"])
        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=result.diff, meta=meta)
        if result.record_meta is not None:
            out.set_meta_prop(RECORD_PRIVACY_META_KEY, result.record_meta)
        return out

    @staticmethod
    def to_result_shareable(out: DXO, current_round: int) -> Shareable:
        result = out.to_shareable()
        # the round travels with the result: the privacy filter accounts the release by it
        result.set_header(AppConstants.CURRENT_ROUND, int(current_round))
        return result

    # -- the site's state between rounds ------------------------------------------------
    def _state_path(self, fl_ctx: FLContext) -> str | None:
        ws_root = self._workspace_root(fl_ctx)
        if not ws_root:
            return None
        return os.path.join(ws_root, "adpfl_state", f"{fl_ctx.get_identity_name()}.session.pt")

    def _load_session_state(self, session: SiteSession, current_round: int, fl_ctx: FLContext) -> None:
        """Continue the session state saved after the previous round of this job when this
        process is a new one (a simulator with fewer threads than sites starts one per task;
        a restarted client). A first round, another job or a gap starts fresh. The state is
        the site's own (never sent); one that cannot be read is logged and skipped: only the
        optimizer moments and the adaptive clip's warm start are lost, never a ledger entry."""
        self._state_checked = True
        path = self._state_path(fl_ctx)
        if current_round == 0 or path is None or not os.path.exists(path):
            return
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("job_id") != fl_ctx.get_job_id() or int(saved.get("round", -2)) != current_round - 1:
                return
            session.load_state_dict(saved["state"])
        except Exception as e:  # noqa: BLE001 - utility state only
            self.log_warning(fl_ctx, f"{path}: cannot continue the site's state ({e}); starting it fresh")
            return
        self.log_info(fl_ctx, f"continuing the site's optimizer / adaptive state of round {current_round - 1} "
                              f"from {path}")

    def _save_session_state(self, session: SiteSession, current_round: int, fl_ctx: FLContext) -> None:
        path = self._state_path(fl_ctx)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save({"job_id": fl_ctx.get_job_id(), "round": current_round, "state": session.state_dict()}, tmp)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - losing it costs only a warm start next round
            self.log_warning(fl_ctx, f"{path}: cannot save the site's state ({e})")
