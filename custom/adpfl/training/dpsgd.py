"""Record-level DP-SGD for local training (Opacus), usable like :class:`LocalTrainer`.

Unit of privacy: **one training record** (one image / patient case of the site). This is
a different unit from the update-level ADP filter (a site's whole round contribution);
the two epsilons are reported side by side and never added (see
``docs/privacy-model.md``).

Mechanism, per optimizer step (Abadi et al. 2016, as implemented by Opacus):

* Poisson sampling: every training record joins the batch independently with
  probability ``q = batch_size / n_train`` (Opacus ``UniformWithReplacementSampler``;
  ``int(1 / q)`` steps per epoch; empty batches are possible and still add noise);
* per-sample gradients (Opacus ``GradSampleModule``, hooks), each clipped to L2 norm
  ``max_grad_norm`` (flat clipping over all parameters);
* Gaussian noise ``N(0, (z * max_grad_norm)^2)`` on the summed clipped gradient, divided
  by the configured ``batch_size`` -- a public constant, never a function of the private
  dataset size (Opacus issue #819; it used to be ``round(q * n)``, which is ``n`` once
  ``n < batch_size``) -- (Opacus ``DPOptimizer``, loss reduction "mean"); the noise
  generator is seeded from the OS entropy at each round;
* accounting: one Opacus ``RDPAccountant`` per trainer, appended to by the optimizer's
  step hook with ``(z, q)`` at every step and **kept across rounds** (the FL client
  loads the global weights into the model each round; the accountant keeps composing).
  ``state_dict``/``load_state_dict`` persist it across restarts.

Calibration: ``z`` is calibrated once with ``opacus.accountants.utils.get_noise_multiplier``
so that the *whole planned training* (``planned_rounds * steps_per_round`` steps at sample
rate ``q``) meets ``(target_epsilon, delta)``, landing ``CALIBRATION_MARGIN`` below it. Before
each round the trainer refuses to train (:class:`BudgetExhausted`) if the projected epsilon
exceeds the target at all; the executor also reserves the round in the site's record ledger
under its lock (:mod:`adpfl.privacy.reservation`). Noise: :mod:`adpfl.training.dp_noise`.

Opacus compatibility of the project's MONAI UNet (measured with Opacus 1.6.0, MONAI 1.6.1):
``ModuleValidator.validate`` reports no error for the task UNet (InstanceNorm without affine
parameters has no weights and is per-sample; no BatchNorm). Importing this module registers
the hand-written grad samplers of :mod:`adpfl.training.grad_samplers` with Opacus: ``Conv2d/3d``
and ``ConvTranspose2d/3d`` as one grouped convolution backward (Opacus' own conv sampler unfolds
the input 27x in 3D; transposed convolutions and ``PReLU`` have none in Opacus and would go
through its slower functorch fallback). Per-sample gradients of both network variants (setting
``network``; ``dp`` is :class:`adpfl.tasks.dp_unet.DPUNet`; jobs train ``standard``) match
gradients computed one sample at a time (tests/test_grad_samplers.py); step times in
docs/benchmarks.md. :func:`dpsgd_network` builds the task network and runs
``ModuleValidator.fix`` (which would replace BatchNorm by GroupNorm) as a safeguard;
``act="relu"`` is an option kept for the comparison benches.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from monai.data import DataLoader
from monai.data.utils import list_data_collate
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.utils.batch_memory_manager import wrap_data_loader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from adpfl.privacy.config import DPSGDConfig
from adpfl.privacy.errors import BudgetExhausted, PrivacyConfigError
from adpfl.privacy.mechanisms import make_generator
from adpfl.privacy.record import PRIVACY_UNIT, RecordLedger, calibrate_with_prior, opacus_rdp_epsilon
from adpfl.privacy.record_adaptive import QuantileClip, RecordNoiseSchedule, gradient_noise_multiplier
from adpfl.tasks.base import SegTask
from adpfl.tasks.network import set_trainable
from adpfl.training.dp_extras import AugmentedCopies, ema_tracker, lr_factor, random_mask
from adpfl.training.dp_noise import RecordDPOptimizer
from adpfl.training.grad_samplers import register as _register_grad_samplers
from adpfl.training.loop import LocalTrainer, TrainConfig

# Opacus' GradSampleModule registers full backward hooks; torch warns on every DP-SGD run that
# they fire on module outputs because the input image does not require a gradient. That is the
# intended case (per-sample gradients are of the weights, not the image), so the warning is
# noise in every site's log; only this message is silenced.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")

# every GradSampleModule of this process uses the hand-written samplers (Opacus' registry is global)
_register_grad_samplers()

__all__ = [
    "DPSGDConfig",
    "DPSGDTrainer",
    "PRIVACY_UNIT",
    "RecordLedger",
    "calibrate_with_prior",
    "dpsgd_network",
    "make_private_trainer",
    "opacus_rdp_epsilon",
    "per_record_gradient_norms",
]


def dpsgd_network(task: SegTask, act: str | None = None, network: str = "standard") -> torch.nn.Module:
    """The task's MONAI UNet in a form Opacus accepts.

    ``act=None`` keeps the task's own network of variant ``network`` (``standard``: PReLU,
    InstanceNorm without affine, ConvTranspose up-sampling; ``dp``: :class:`~adpfl.tasks.dp_unet.DPUNet`;
    both with the registered samplers of :mod:`adpfl.training.grad_samplers`).
    ``act="relu"`` (any MONAI activation name) builds the same UNet with that activation.
    Raises ``PrivacyConfigError`` if Opacus' validator still reports an incompatibility
    after ``ModuleValidator.fix``.
    """
    if act is None:
        net = task.build_network(network)
    else:
        from monai.networks.nets import UNet

        net = UNet(
            spatial_dims=task.spatial_dims,
            in_channels=task.in_channels,
            out_channels=task.num_classes,
            channels=task.unet_channels,
            strides=task.unet_strides,
            num_res_units=task.num_res_units,
            act=act,
        )
    if ModuleValidator.validate(net, strict=False):
        net = ModuleValidator.fix(net)
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise PrivacyConfigError(f"network of task {task.name} is not Opacus-compatible: {errors}")
    return net


def _collate_or_empty(items):
    """MONAI's collate; an empty Poisson batch becomes ``{}``."""
    if not items:
        return {}
    return list_data_collate(items)


class DPSGDTrainer:
    """Local training with record-level DP-SGD; ``train``/``evaluate`` like LocalTrainer.

    The model passed to :meth:`train` is wrapped in a ``GradSampleModule`` for the round
    and unwrapped (hooks and ``grad_sample`` attributes removed) before returning, so the
    caller's model stays a plain module (state-dict keys unchanged).
    """

    def __init__(self, task: SegTask, datalist: dict[str, list[dict]], config: TrainConfig, dp: DPSGDConfig,
                 prior_history: list | None = None):
        """``prior_history``: Opacus history ``[(z, q, steps), ...]`` already spent on these
        records (earlier jobs or rounds before a restart, from the site's RecordLedger);
        the accountant starts from it and ``z`` is calibrated for the remaining budget."""
        self.dp = dp.validate()
        self.base = LocalTrainer(task, datalist, config)
        self.task, self.config, self.device = task, config, self.base.device
        self.num_train = self.base.num_train
        # q (and so the steps per epoch) from the site's declared public count when it has one:
        # Poisson sampling at a fixed q over whatever records there are, normalised by the
        # public batch size, releases nothing that depends on the true n (add/remove-one)
        n_public = dp.public_num_records or self.num_train
        self.sample_rate = min(1.0, config.batch_size / n_public)
        self.steps_per_epoch = max(1, int(1 / self.sample_rate))
        per_round = config.local_epochs * self.steps_per_epoch
        if config.max_steps_per_round:
            per_round = min(per_round, int(config.max_steps_per_round))
        self.steps_per_round = per_round
        prior = [tuple(h) for h in prior_history or []]
        if dp.noise_multiplier is not None:
            self.noise_multiplier = float(dp.noise_multiplier)
        elif dp.adaptive:
            self.noise_multiplier = float("nan")  # set below from the schedule
        else:
            self.noise_multiplier = calibrate_with_prior(
                prior, float(dp.target_epsilon), float(dp.delta), self.sample_rate,
                int(dp.planned_rounds) * self.steps_per_round, float(dp.epsilon_tolerance),
            )
        #: the public constant the noisy gradient sum is divided by (Opacus issue #819): the
        #: configured batch size, never a function of the private dataset size n
        self.expected_batch_size = int(config.batch_size)
        self.schedule = None
        self.quantile_clip = None
        self.clip = float(dp.max_grad_norm)
        if dp.adaptive:
            self.schedule = RecordNoiseSchedule(
                float(dp.target_epsilon), float(dp.delta), int(dp.planned_rounds), self.sample_rate,
                self.steps_per_round, min_factor=float(dp.noise_min_factor), max_factor=float(dp.noise_max_factor))
            self.noise_multiplier = self.schedule.z_plan  # until plan_round re-plans from the ledger
            if dp.clip_learning_rate > 0:
                self.quantile_clip = QuantileClip(self.clip, dp.clip_quantile, dp.clip_learning_rate,
                                                  self.expected_batch_size)
        self.accountant = RDPAccountant()
        self.accountant.history = list(prior)
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_model_id: int | None = None
        self.rounds_trained = 0

    # -- accounting -----------------------------------------------------------------
    def plan_round(self, ledger: Any, round_index: int, global_change: float | None = None) -> float:
        """ADP-SGD: the effective noise multiplier of round ``round_index`` from the site's
        record ledger (every job's spend, re-read under its lock by the caller) and the
        public progress signal; sets ``noise_multiplier``. Fixed-noise DP-SGD: unchanged."""
        if self.schedule is not None:
            self.noise_multiplier = float(self.schedule.next_noise_multiplier(ledger, round_index, global_change))
            if self.quantile_clip is not None:
                gradient_noise_multiplier(self.noise_multiplier, float(self.dp.clip_count_noise))  # feasible?
        return self.noise_multiplier

    @property
    def gradient_noise_multiplier(self) -> float:
        """The multiplier of the gradient's own noise (the effective one without adaptive clipping)."""
        if self.quantile_clip is None:
            return self.noise_multiplier
        return gradient_noise_multiplier(self.noise_multiplier, float(self.dp.clip_count_noise))

    @property
    def history(self) -> list:
        return list(self.accountant.history)

    def epsilon(self) -> float:
        """Cumulative record-level epsilon at ``dp.delta`` (Opacus RDP)."""
        return opacus_rdp_epsilon(self.accountant.history, self.dp.delta)

    def projected_epsilon(self, extra_steps: int | None = None) -> float:
        steps = self.steps_per_round if extra_steps is None else int(extra_steps)
        hist = list(self.accountant.history) + [(self.noise_multiplier, self.sample_rate, steps)]
        return opacus_rdp_epsilon(hist, self.dp.delta)

    def privacy_report(self) -> dict[str, Any]:
        return {
            "unit": PRIVACY_UNIT,
            "mechanism": "DP-SGD (Opacus): Poisson sampling, per-sample L2 clip, Gaussian noise",
            "epsilon": self.epsilon(),
            "delta": self.dp.delta,
            "accountant": "rdp",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.clip,
            "steps": sum(int(h[2]) for h in self.accountant.history),
            "planned_rounds": self.dp.planned_rounds,
            "target_epsilon": self.dp.target_epsilon,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.accountant.history], "noise_multiplier": self.noise_multiplier,
                "rounds_trained": self.rounds_trained, "clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the adaptive clip and round count; the accountant's history only when
        ``state`` carries one (a site session takes it from the record ledger instead)."""
        if "history" in state:
            self.accountant.history = [tuple(h) for h in state["history"]]
        self.rounds_trained = int(state.get("rounds_trained", 0))
        self.clip = float(state.get("clip", self.clip))
        if self.quantile_clip is not None:
            self.quantile_clip.clip = self.clip

    # -- training -------------------------------------------------------------------
    def optimizer_for(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The non-private optimizer the DP optimizer wraps, one per model (see ``_base_optimizer``)."""
        return self._base_optimizer(model)

    def _base_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """One optimizer per model object, kept across rounds (its moments are
        post-processing of noisy gradients, hence private), over the parameters setting
        ``trainable`` names (frozen here first: they get no per-sample gradient and no noise)."""
        set_trainable(model, self.config.trainable)
        if self._optimizer is None or self._optimizer_model_id != id(model):
            params = [p for p in model.parameters() if p.requires_grad]
            if self.dp.optimizer == "adam":
                self._optimizer = torch.optim.Adam(params, lr=self.config.learning_rate)
            else:
                self._optimizer = torch.optim.SGD(params, lr=self.config.learning_rate)
            self._optimizer_model_id = id(model)
        return self._optimizer

    def _poisson_loader(self, generator: torch.Generator) -> DataLoader:
        sampler = UniformWithReplacementSampler(
            num_samples=self.num_train, sample_rate=self.sample_rate, generator=generator
        )
        ds = self.base.train_ds if self.dp.augmult == 1 else AugmentedCopies(self.base.train_ds, self.dp.augmult)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.config.num_workers, collate_fn=_collate_or_empty)

    def make_optimizer(self, model: torch.nn.Module, generator: torch.Generator | None = None,
                       mask: dict | None = None) -> RecordDPOptimizer:
        """The round's DP optimizer over ``model`` (already wrapped for per-sample gradients),
        normalising by the public ``expected_batch_size`` and accounting ``(z, q)`` per step."""
        opt = RecordDPOptimizer(  # Opacus' DPOptimizer, noise drawn and added in float64
            self._base_optimizer(model),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=generator if generator is not None else make_generator(self.device),
            augmult=self.dp.augmult,
            mask=mask,
            quantile_clip=self.quantile_clip,
            count_noise=self.dp.clip_count_noise,
        )
        opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return opt

    def train(
        self,
        model: torch.nn.Module,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> dict[str, Any]:
        """One round of DP-SGD local training.

        Returns ``loss`` (mean over non-empty steps), ``steps``, ``samples``, ``seconds``,
        ``aborted``, ``epsilon`` (cumulative record-level epsilon at ``delta`` after this
        round), ``delta``, ``noise_multiplier``, ``sample_rate``, ``privacy_unit``.
        Raises :class:`BudgetExhausted` before training if this round would exceed
        ``target_epsilon`` (nothing trained, accountant unchanged).
        """
        if self.dp.target_epsilon is not None:
            # any excess is refused (calibration lands privacy.record.CALIBRATION_MARGIN below the target)
            projected = self.projected_epsilon()
            if projected > float(self.dp.target_epsilon):
                raise BudgetExhausted(
                    f"DP-SGD round would bring record-level epsilon to {projected:.4f} > target "
                    f"{self.dp.target_epsilon} (delta={self.dp.delta}); not training"
                )
        model.to(self.device).train()
        set_trainable(model, self.config.trainable)  # before Opacus hooks the trainable modules
        gen = make_generator(self.device)  # OS entropy: noise and the mask
        sample_gen = make_generator("cpu")
        aug_gen = self.base.augment_generator()  # augmentation only (per row, before per-sample gradients)
        mask = random_mask(model, float(self.dp.keep_fraction), gen)
        ema = ema_tracker(model, float(self.dp.ema_decay), bool(self.dp.ema_warmup))
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = self.make_optimizer(model, gen, mask)
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = self.base.loss_fn
        # the schedule counts this job's logical steps over its planned rounds (public numbers only)
        done_before = self.rounds_trained * self.steps_per_round
        total_steps = int(self.dp.planned_rounds or 1) * self.steps_per_round
        steps, samples, loss_sum, nonempty = 0, 0, 0.0, 0
        aborted = False
        t0 = time.perf_counter()
        try:
            while steps < self.steps_per_round and not aborted:
                loader = self._poisson_loader(sample_gen)
                if self.dp.physical_batch_size:
                    loader = wrap_data_loader(data_loader=loader, max_batch_size=int(self.dp.physical_batch_size),
                                              optimizer=opt)  # Opacus BatchMemoryManager: virtual steps
                for batch in loader:
                    if should_stop is not None and should_stop():
                        aborted = True
                        break
                    n = int(batch["image"].shape[0]) if batch else 0
                    if n == 0:
                        # empty Poisson batch: the step still releases noise
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    else:
                        x = batch["image"].to(self.device)
                        y = batch["label"].to(self.device)
                        x, y = self.base.augment_batch(x, y, aug_gen)
                        loss = loss_fn(gsm(x), y)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"DP-SGD loss became {loss.item()} at step {steps}")
                        loss.backward()
                        loss_sum += float(loss.detach())
                        nonempty += 1
                    for group in opt.param_groups:
                        group["lr"] = self.config.learning_rate * lr_factor(
                            self.dp.lr_schedule, done_before + steps, total_steps, self.dp.lr_final_factor)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    samples += n // self.dp.augmult
                    if opt._is_last_step_skipped:
                        continue  # a physical batch inside a logical one: no step yet
                    steps += 1
                    if ema is not None:
                        ema.update_parameters(model)
                    if on_step is not None:
                        on_step(steps, loss_sum / max(nonempty, 1))
                    if steps >= self.steps_per_round:
                        break
        finally:
            opt.zero_grad(set_to_none=True)
            gsm._close()  # remove hooks and grad_sample attributes: plain model again
            for p in model.parameters():
                for attr in ("summed_grad", "grad_sample", "_processed"):
                    if hasattr(p, attr):
                        try:
                            delattr(p, attr)
                        except AttributeError:
                            pass
        self.clip = float(opt.max_grad_norm)
        if ema is not None and steps > 0:
            with torch.no_grad():  # what leaves is the EMA of the noisy iterates (post-processing)
                for p, q in zip(model.parameters(), ema.module.parameters()):
                    p.copy_(q)
        self.rounds_trained += 1
        return {
            "loss": loss_sum / max(nonempty, 1),
            "steps": steps,
            "samples": samples,
            "seconds": time.perf_counter() - t0,
            "aborted": aborted,
            "epsilon": self.epsilon(),
            "delta": self.dp.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.clip,
            "privacy_unit": PRIVACY_UNIT,
        }

    def evaluate(self, model: torch.nn.Module, with_hd95: bool = True) -> dict[str, float]:
        return self.base.evaluate(model, with_hd95=with_hd95)


def make_private_trainer(
    task: SegTask, datalist: dict[str, list[dict]], config: TrainConfig, **dp_kwargs: Any
) -> DPSGDTrainer:
    """Shorthand: ``DPSGDTrainer(task, datalist, config, DPSGDConfig(**dp_kwargs))``."""
    return DPSGDTrainer(task, datalist, config, DPSGDConfig(**dp_kwargs))


def per_record_gradient_norms(model: torch.nn.Module, trainer: LocalTrainer, trainable: str = "all",
                              chunk: int = 8) -> torch.Tensor:
    """The L2 norm of each training record's loss gradient over the parameters ``trainable``
    names (:func:`adpfl.tasks.network.set_trainable`): what DP-SGD clips, per record, in
    ``trainer.train_ds`` order, without augmentation (the records as cached).

    For choosing ``dpsgd_max_grad_norm`` on **public** records only (``bench/grad_norms.py``):
    on a site's own records these norms are a release that no ledger accounts for. The model's
    ``requires_grad`` flags are left as ``trainable`` sets them. Per-sample gradients from Opacus'
    ``GradSampleModule`` (loss reduction "mean", so each is the gradient of that record's own
    loss), as in training. The records are drawn as the data loader draws them (3D tasks: the
    task's random patch); the batch augmentation is not applied."""
    from monai.data.utils import list_data_collate

    set_trainable(model, trainable)
    model.to(trainer.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    norms = []
    try:
        for start in range(0, len(trainer.train_ds), int(chunk)):
            batch = list_data_collate([trainer.train_ds[i]
                                       for i in range(start, min(start + int(chunk), len(trainer.train_ds)))])
            x, y = batch["image"].to(trainer.device), batch["label"].to(trainer.device)
            loss = trainer.loss_fn(gsm(x), y)
            loss.backward()
            sq = sum(p.grad_sample.reshape(x.shape[0], -1).double().pow(2).sum(1) for p in params)
            norms.append(sq.sqrt().float().cpu())
            gsm.zero_grad(set_to_none=True)  # Opacus clears grad_sample too
    finally:
        gsm._close()
    return torch.cat(norms)
