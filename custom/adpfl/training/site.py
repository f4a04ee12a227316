"""One site's side of federated training, without FLARE: set up, train a round, validate.

:class:`SiteSession` is what the FLARE executor (:mod:`adpfl.flare.executor`) dispatches to,
in the way NVFlare's ``LearnerExecutor`` dispatches to a FLARE-free learner: the executor
turns Shareables into arrays and back; everything else happens here and is tested without
FLARE. A session

- finds (and, for synthetic runs, generates) the site's data and checks its datalist,
- builds the task network and a :class:`~adpfl.training.LocalTrainer`, or with
  ``SiteConfig.dpsgd`` a :class:`~adpfl.training.dpsgd.DPSGDTrainer` that continues the
  site's record-level ledger,
- loads global weights (keys and shapes checked), trains one round and returns the weight
  difference (local - global), the number of local steps and the metrics,
- validates the current model.

Where the data and the ledger live is decided by the caller (the executor reads the site's
workspace for that, see :mod:`adpfl.flare.site_config`); the session gets plain paths.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from adpfl.data.sizes import check_data_size, resolve_data_size, synthetic_root
from adpfl.privacy.config import DPSGDConfig
from adpfl.privacy.public_signals import public_signals
from adpfl.privacy.record import RecordLedger
from adpfl.privacy.reservation import reserve_record_round, settle_record_round, sync_record_ledger
from adpfl.tasks.base import check_network, get_task
from adpfl.tasks.network import TaskNetwork
from adpfl.training.dpsgd import DPSGDTrainer
from adpfl.training.loop import LocalTrainer, TrainConfig

__all__ = ["SiteConfig", "SiteSession", "RoundResult"]

Weights = dict[str, np.ndarray]


def site_seed(seed: int | None, site: str) -> int | None:
    """The run's ``seed`` mixed with the site's name: sites of one seeded run draw different
    shuffles and augmentations, and the same ones in every run of that seed."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + zlib.crc32(site.encode())) % (2**63)


@dataclass
class SiteConfig:
    """A site's data and run settings (the executor's settings that are not training ones)."""

    task: str = field(default="skin2d", metadata={"help": "the segmentation task: skin2d, kidney3d or brain3d"})
    network: str = field(default="standard", metadata={
        "help": "the task network's variant: `standard` (MONAI UNet, PReLU, transposed convolutions) or `dp` "
                "(same UNet with ReLU and convolution + linear up-sampling instead of transposed convolutions) or "
                "`dp_ws` (`dp` with weight-standardised convolutions before each normalisation); `small` / `dp_small`: "
                "`standard` / `dp` with half the channels and one residual unit a level (kidney3d: 152 k parameters "
                "instead of 1.19 M; less DP-SGD noise in norm); all have fast "
                "exact per-sample gradients for DP-SGD; server and sites build the same one"})
    data_root: str | None = field(default=None, metadata={
        "help": "the task's data folder holding `<site>/datalist.json`; the site's `local/adpfl_site.json` "
                "or `$ADPFL_DATA_ROOT` override it (None: `~/.cache/adpfl/data/<task>`)", "unit": "path"})
    synthetic: bool = field(default=True, metadata={
        "help": "generate the embedded synthetic data for this site when it is missing"})
    data_size: str = field(default="tiny", metadata={
        "help": "synthetic site size: `tiny` (tests, smoke runs: skin2d 40 / 20, 3D 8 / 4 cases) or `realistic` "
                "(skin2d 3,300 / 330 images at 128^2, kidney3d 130 / 30 and brain3d 130 / 20 patients at 48^3; "
                "generated once into a cache folder under the data root and reused by every job); explicit "
                "`num_train`, `num_val`, `image_size` override it"})
    num_train: int | None = field(default=None, metadata={
        "help": "synthetic training cases per site (None: the `data_size` preset's)", "unit": "cases"})
    num_val: int | None = field(default=None, metadata={
        "help": "synthetic validation cases per site (None: the `data_size` preset's)", "unit": "cases"})
    data_seed: int = field(default=0, metadata={"help": "seed of the synthetic data generator"})
    hd95: bool = field(default=True, metadata={"help": "also compute HD95 when validating"})
    dpsgd: bool = field(default=False, metadata={
        "help": "train with record-level DP-SGD (Opacus) instead of plain local training"})
    dpsgd_ledger_name: str | None = field(default=None, metadata={
        "help": "file name of the site's record-level ledger (None: `dpsgd_<task>`)"})
    ledger_dir: str | None = field(default=None, metadata={
        "help": "folder of the record-level ledger; the site's config or `$ADPFL_LEDGER_DIR` override it "
                "(None: the site workspace's `adpfl_privacy`)", "unit": "path"})

    def validate(self) -> SiteConfig:
        """Check every setting; ValueError names the offending one. Returns self."""
        get_task(self.task)
        check_network(self.network)
        check_data_size(self.data_size)
        for name in ("num_train", "num_val"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None (the data_size preset's) or an int >= 1, got {value!r}")
        if self.dpsgd_ledger_name is not None and (
            not self.dpsgd_ledger_name or os.sep in self.dpsgd_ledger_name or self.dpsgd_ledger_name.startswith(".")
        ):
            raise ValueError(f"dpsgd_ledger_name must be a plain file name, got {self.dpsgd_ledger_name!r}")
        return self

    @property
    def ledger_name(self) -> str:
        return self.dpsgd_ledger_name or f"dpsgd_{self.task}"


@dataclass
class RoundResult:
    """What one local round produced (``diff`` is None when the round was aborted)."""

    diff: Weights | None
    steps: int
    global_metrics: dict[str, float]
    local_metrics: dict[str, float] | None = None
    loss: float | None = None  # None under DP-SGD: an un-noised statistic of the private records
    seconds: float = 0.0
    aborted: bool = False
    record_meta: dict | None = None  # public record-level accounting (DP-SGD only)

    def summary(self, current_round: int) -> str:
        local = "not validated" if self.local_metrics is None else _fmt(self.local_metrics.get("dice_mean"))
        text = (f"round {current_round}: global dice {_fmt(self.global_metrics.get('dice_mean'))} -> local "
                f"{local}, {self.steps} steps in {self.seconds:.1f}s")
        if self.loss is not None:
            text += f", loss {self.loss:.4f}"
        if self.record_meta:
            text += f"; record-level epsilon {self.record_meta['epsilon_rdp']:.4g} at delta={self.record_meta['delta']}"
        return text


class SiteSession:
    """The site's trainer, model and (for DP-SGD) record-level ledger across rounds.

    Args:
        site: the site's name (its data folder under the data root, its ledger folder).
        config: data and run settings.
        train: local training settings.
        dp: record-level DP-SGD settings, required when ``config.dpsgd``.

    Raises:
        ValueError / PrivacyConfigError: a bad setting, at construction (before any data is read).
    """

    def __init__(self, site: str, config: SiteConfig, train: TrainConfig, dp: DPSGDConfig | None = None):
        self.site = site
        config.validate()
        train.validate()
        # the data_size preset fills what the job left unset (explicit settings win)
        n_train, n_val, size = resolve_data_size(config.task, config.data_size, config.num_train, config.num_val,
                                                 train.image_size)
        self.config = dataclasses.replace(config, num_train=n_train, num_val=n_val)
        self.train_config = train = dataclasses.replace(train, image_size=size, seed=site_seed(train.seed, site))
        self.task = get_task(config.task)
        self.task.resolve_size(train.image_size)
        if config.dpsgd:
            if dp is None or dp.target_epsilon is None:
                # the record-level budget is what the server holds every DP-SGD site to
                raise ValueError("dpsgd=True needs the site's record-level budget (dpsgd_target_epsilon)")
            dp.validate()
        self.dp = dp if config.dpsgd else None
        self.trainer = None
        self.model: torch.nn.Module | None = None
        self.record_ledger: RecordLedger | None = None
        self._prev_global: Weights | None = None
        self._global_change: float | None = None
        #: the public signals of the last train round's global model (:mod:`adpfl.privacy.public_signals`)
        self.public_info: dict | None = None

    @property
    def ready(self) -> bool:
        return self.trainer is not None

    # -- set-up ------------------------------------------------------------------------
    def setup(self, data_root: str, ledger_folder: str | None = None, max_epsilon: float | None = None,
              public_num_records: int | None = None) -> list[str]:
        """Read (or generate) the site's data and build the model and trainer; once.

        Args:
            data_root: the task's data folder (the site's data is ``<data_root>/<site>``).
            ledger_folder: folder of the record-level ledger (DP-SGD only); the file is
                ``<ledger_folder>/<site>/<dpsgd_ledger_name>.json``.
            max_epsilon: the site's own cap on the record-level budget (wins over a job
                asking for more).
            public_num_records: the site's own declaration of its public record count (wins
                over the job's ``public_num_records``; see :class:`DPSGDConfig`).

        Returns the lines worth logging.
        """
        if self.ready:
            return []
        from adpfl.data.datalist import load_site_datalist, validate_site
        from adpfl.data.synthetic import ensure_site_data

        cfg = self.config
        if cfg.synthetic:
            size = self.task.resolve_size(self.train_config.image_size)
            data_root = synthetic_root(data_root, cfg.data_size, cfg.num_train, cfg.num_val, size, cfg.data_seed)
            ensure_site_data(cfg.task, data_root, self.site, num_train=cfg.num_train, num_val=cfg.num_val,
                             size=size, seed=cfg.data_seed)
        datalist = load_site_datalist(data_root, self.site, task=cfg.task)
        validate_site(datalist)
        lines = [f"{self.site}: task {cfg.task}, data {os.path.join(data_root, self.site)}: "
                 f"{len(datalist['training'])} training / {len(datalist['validation'])} validation cases"]
        model = TaskNetwork(cfg.task, cfg.network)
        if cfg.dpsgd:
            from opacus.validators import ModuleValidator

            # the server's model must stay the task network (same keys), so it is checked,
            # not rewritten: both variants use InstanceNorm without affine weights (no
            # BatchNorm); every parametrised layer of both has a grad sampler, Opacus' own or
            # adpfl.training.grad_samplers' (registered by adpfl.training.dpsgd)
            errors = ModuleValidator.validate(model, strict=False)
            if errors:
                raise ValueError(f"task {cfg.task}'s network is not Opacus-compatible for DP-SGD: {errors}")
            if not ledger_folder:
                raise ValueError("dpsgd needs a ledger folder for the site's record-level ledger")
            trainer, line = self._dpsgd_trainer(datalist, ledger_folder, max_epsilon, public_num_records)
            lines.append(line)
        else:
            trainer = LocalTrainer(self.task, datalist, self.train_config)
        self.model = model.to(trainer.device)
        self.trainer = trainer
        return lines

    def _dpsgd_trainer(self, datalist, ledger_folder: str, max_epsilon: float | None,
                       public_num_records: int | None = None):
        """DP-SGD trainer continuing the site's record-level ledger (calibrated for what is left)."""
        dp = self.dp
        if public_num_records is not None:
            dp = dataclasses.replace(dp, public_num_records=public_num_records).validate()
        if max_epsilon is not None and float(max_epsilon) < float(dp.target_epsilon):
            # the site's own cap wins over a job asking for more
            dp = dataclasses.replace(dp, target_epsilon=float(max_epsilon))
        path = os.path.join(ledger_folder, self.site, f"{self.config.ledger_name}.json")
        ledger = RecordLedger.load_or_create(path, delta=dp.delta)
        trainer = DPSGDTrainer(self.task, datalist, self.train_config, dp, prior_history=ledger.history())
        # fail now, before any training, if the ledger cannot be locked, read or written (under
        # its lock and re-read first, so other jobs' entries are never overwritten)
        sync_record_ledger(ledger, path)
        self.record_ledger = ledger
        line = (f"{self.site}: record-level DP-SGD, ledger {path} ({len(ledger.entries)} earlier rounds, epsilon "
                f"{ledger.epsilon():.4g} of {dp.target_epsilon} at delta={dp.delta}); "
                f"z={trainer.noise_multiplier:.4g}, "
                f"q={trainer.sample_rate:.4g}, {trainer.steps_per_round} steps per round, clip {dp.max_grad_norm}"
                + (f"; q and steps from the declared public record count {dp.public_num_records} "
                   f"(the true count {trainer.num_train} stays at the site)" if dp.public_num_records else
                   f"; q reveals the true record count {trainer.num_train} (no public_num_records declared)"))
        return trainer, line

    def _require_ready(self) -> None:
        if not self.ready:
            raise RuntimeError("SiteSession.setup() has not run")

    # -- rounds ------------------------------------------------------------------------
    def load_global(self, weights: Weights, current_round: int | None = None) -> Weights:
        """Load the global weights into the model; returns them as numpy arrays.

        ``current_round`` (a training round's index) also computes the round's public
        signals (:attr:`public_info`, the ADP noise schedules' progress signal) against the
        previous training round's global model; without it they are computed only for
        ADP-SGD (round 0 is assumed).

        Raises ValueError when the keys or shapes do not match the task network."""
        self._require_ready()
        weights = {k: np.asarray(v) for k, v in weights.items()}
        own = self.model.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"global weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        new_state = {}
        for k, v in weights.items():
            t = torch.as_tensor(v)
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"global weight {k} has shape {tuple(t.shape)}, model expects {tuple(own[k].shape)}")
            new_state[k] = t.to(own[k].dtype)
        self.model.load_state_dict(new_state)
        # public progress signal of the ADP noise schedules (both global models are public)
        if current_round is not None or (self.dp is not None and self.dp.adaptive):
            self.public_info, self._prev_global = public_signals(weights, self._prev_global, int(current_round or 0))
            self._global_change = self.public_info["global_change"]
        return weights

    # -- state kept between rounds ---------------------------------------------------------
    def state_dict(self) -> dict:
        """What the site carries from one round to the next besides its ledgers: the local
        optimizer's moments, the previous global model (the public progress signal) and,
        under DP-SGD, the adaptive clip. A site process that is re-created between rounds
        (``nvflare simulator`` with fewer threads than sites starts one per task; a
        restarted client) continues from it rather than from scratch. Tensors only."""
        self._require_ready()
        state: dict = {
            "optimizer": self.trainer.optimizer_for(self.model).state_dict(),
            "prev_global": None if self._prev_global is None
            else {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._prev_global.items()},
        }
        if self.dp is not None:
            state["dpsgd"] = {"clip": float(self.trainer.clip), "rounds_trained": int(self.trainer.rounds_trained)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of the same site and job (the record-level
        spend comes from the ledger, never from here). Raises ValueError when it does not
        fit this session's model or mode."""
        self._require_ready()
        if ("dpsgd" in state) != (self.dp is not None):
            raise ValueError("the saved state is of a different mode (DP-SGD or not) than this session")
        prev = state.get("prev_global")
        if prev is not None:
            own = self.model.state_dict()
            if set(prev) != set(own) or any(tuple(v.shape) != tuple(own[k].shape) for k, v in prev.items()):
                raise ValueError("the saved previous global model does not match the task network")
        self.trainer.optimizer_for(self.model).load_state_dict(state["optimizer"])
        self._prev_global = None if prev is None else {k: v.numpy().astype(np.float32) for k, v in prev.items()}
        if self.dp is not None:
            self.trainer.load_state_dict(state["dpsgd"])

    def validate(self) -> dict[str, float]:
        """Dice (and HD95) of the current model on the site's validation set."""
        self._require_ready()
        return self.trainer.evaluate(self.model, with_hd95=self.config.hd95)

    def train_round(
        self,
        global_weights: Weights,
        current_round: int,
        job_id: str | None = None,
        should_stop: Callable[[], bool] | None = None,
        report: Callable[[str, dict[str, float]], None] | None = None,
        validate_local: bool = True,
    ) -> RoundResult:
        """Validate the global model, train locally, validate the local model.

        ``global_weights`` must already be loaded (:meth:`load_global`). ``report(prefix,
        metrics)`` receives ``val_global``, ``val_local`` and (without DP-SGD) ``train``
        metrics as soon as they exist. Under DP-SGD the round's steps are reserved in the
        record-level ledger before training (under its file lock, checked against every job's
        spend: :class:`~adpfl.privacy.errors.BudgetExhausted` trains nothing), and settled with
        the steps computed, also when training fails or is aborted; an unwritable ledger
        raises and nothing is returned. ``validate_local=False`` skips the local model's
        validation (``local_metrics`` None): a runner that only scores global models saves
        one validation pass per round.
        """
        self._require_ready()
        report = report or (lambda prefix, metrics: None)
        global_metrics = self.validate()
        report("val_global", global_metrics)
        record_meta = None
        reservation = self.reserve_dpsgd(current_round, job_id) if self.config.dpsgd else None
        try:
            stats = self.trainer.train(self.model, should_stop=should_stop)
        finally:
            if reservation is not None:
                record_meta = self.account_dpsgd(current_round, reservation)
        if stats["aborted"]:
            return RoundResult(diff=None, steps=int(stats["steps"]), global_metrics=global_metrics, aborted=True,
                               seconds=float(stats["seconds"]), record_meta=record_meta)
        local_metrics = None
        if validate_local:
            local_metrics = self.validate()
            report("val_local", local_metrics)
        loss = None
        if record_meta is None:
            loss = float(stats["loss"])
            report("train", {"loss": loss})
        local_state = self.model.state_dict()
        diff = {}
        for k, g in global_weights.items():
            local = local_state[k].detach().to("cpu", torch.float32).numpy()
            diff[k] = (local - g.astype(np.float32)).astype(np.float32)
        return RoundResult(diff=diff, steps=int(stats["steps"]), global_metrics=global_metrics,
                           local_metrics=local_metrics, loss=loss, seconds=float(stats["seconds"]),
                           record_meta=record_meta)

    def reserve_dpsgd(self, current_round: int, job_id: str | None = None) -> tuple:
        """Reserve this round's DP-SGD steps in the site's record-level ledger, under its file
        lock and checked against every job's spend (BudgetExhausted: not trained). Returns
        ``(reservation id, the trainer's step count before the round)``."""
        trainer = self.trainer
        if trainer.schedule is not None:
            # ADP-SGD: plan this round's noise on every job's spend (re-read under the lock)
            sync_record_ledger(self.record_ledger)
            trainer.plan_round(self.record_ledger, current_round, self._global_change)
        rid = reserve_record_round(
            self.record_ledger, target_epsilon=trainer.dp.target_epsilon, job_id=job_id, round=current_round,
            noise_multiplier=trainer.noise_multiplier, sample_rate=trainer.sample_rate,
            steps=trainer.steps_per_round,
        )
        return rid, sum(int(h[2]) for h in trainer.history)

    def account_dpsgd(self, current_round: int, reservation: tuple) -> dict:
        """Settle the round's reservation with the DP-SGD steps the trainer took (also the
        steps of a round that failed or was aborted: they were computed; none taken: rolled
        back) and return the public accounting for the result's metadata."""
        ledger, trainer = self.record_ledger, self.trainer
        rid, steps_before = reservation
        settle_record_round(ledger, rid, sum(int(h[2]) for h in trainer.history) - steps_before)
        meta = {
            "unit": "record",
            "mechanism": "adpsgd" if trainer.dp.adaptive else "dpsgd",
            "delta": float(trainer.dp.delta),
            "noise_multiplier": float(trainer.noise_multiplier),
            "sample_rate": float(trainer.sample_rate),
            "max_grad_norm": float(trainer.clip),
            "steps_per_round": int(trainer.steps_per_round),
            "round": int(current_round),
            "history": [list(h) for h in ledger.history()],
            "epsilon_rdp": float(ledger.epsilon()),
            "target_epsilon": float(trainer.dp.target_epsilon),
        }
        if trainer.dp.adaptive:  # how the effective multiplier splits (the server checks the composition)
            meta["gradient_noise_multiplier"] = float(trainer.gradient_noise_multiplier)
            if trainer.quantile_clip is not None:
                meta["clip_count_noise"] = float(trainer.dp.clip_count_noise)
        meta["keep_fraction"] = float(trainer.dp.keep_fraction)
        return meta


def _fmt(value: float | None) -> str:
    """A metric for the log: "no cases" when no case could be scored (never a fake 0)."""
    return "no cases" if value is None else f"{value:.4f}"
