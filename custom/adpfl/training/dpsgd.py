"""Record-level DP-SGD for local training (Opacus), usable like :class:`LocalTrainer`.

Unit of privacy: **one training record** (one image / patient case of the site). This is
a different unit from the update-level ADP filter (a site's whole round contribution);
the two epsilons are reported side by side and never added (see
``shared/design/privacy-model.md``).

Mechanism, per optimizer step (Abadi et al. 2016, as implemented by Opacus):

* Poisson sampling: every training record joins the batch independently with
  probability ``q = batch_size / n_train`` (Opacus ``UniformWithReplacementSampler``;
  ``int(1 / q)`` steps per epoch; empty batches are possible and still add noise);
* per-sample gradients (Opacus ``GradSampleModule``, hooks), each clipped to L2 norm
  ``max_grad_norm`` (flat clipping over all parameters);
* Gaussian noise ``N(0, (z * max_grad_norm)^2)`` on the summed clipped gradient, divided
  by the expected batch size (Opacus ``DPOptimizer``, loss reduction "mean"); the noise
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
parameters has no weights and is per-sample; no BatchNorm). ``Conv2d/Conv3d`` use Opacus'
own grad samplers; ``PReLU`` and ``ConvTranspose2d/3d`` have none and go through Opacus'
functorch (``torch.func``) fallback, which works and matches per-example gradients computed
one sample at a time (checked in 2D and on a 16^3 3D UNet). :func:`dpsgd_network` builds the
task network and runs ``ModuleValidator.fix`` (which would replace BatchNorm by GroupNorm) as
a safeguard; ``act="relu"`` is an option that avoids the functorch path for activations.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from monai.data import DataLoader
from monai.data.utils import list_data_collate
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from adpfl._io import write_json_atomic
from adpfl.privacy.errors import BudgetExhausted, PrivacyConfigError, PrivacyError
from adpfl.privacy.mechanisms import make_generator
from adpfl.tasks.base import SegTask
from adpfl.training.dp_noise import Float64NoiseDPOptimizer
from adpfl.training.loop import LocalTrainer, TrainConfig

__all__ = [
    "DPSGDConfig",
    "DPSGDTrainer",
    "PRIVACY_UNIT",
    "RecordLedger",
    "calibrate_with_prior",
    "dpsgd_network",
    "make_private_trainer",
    "opacus_rdp_epsilon",
]

PRIVACY_UNIT = "record-level DP: one training image/patient"
#: H5 (issue 12): calibration aims this far (relative) below the target, so float round-off
#: never makes the strict budget check (any excess refused) refuse a calibrated round.
CALIBRATION_MARGIN = 1e-9


def dpsgd_network(task: SegTask, act: Optional[str] = None) -> torch.nn.Module:
    """The task's MONAI UNet in a form Opacus accepts.

    ``act=None`` keeps the task's own network (PReLU, InstanceNorm without affine):
    Opacus supports it (PReLU and ConvTranspose through its functorch fallback).
    ``act="relu"`` (any MONAI activation name) builds the same UNet with that activation.
    Raises ``PrivacyConfigError`` if Opacus' validator still reports an incompatibility
    after ``ModuleValidator.fix``.
    """
    if act is None:
        net = task.build_network()
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


def grouped_history(history) -> list:
    """``[(z, q, steps)]`` with the steps of equal ``(z, q)`` added up. RDP composes by
    summation and Opacus computes ``steps`` identical steps as ``steps`` times one step's
    RDP, so the grouped history has the same epsilon -- and costs one RDP evaluation per
    distinct ``(z, q)`` instead of one per round (about 0.14 s each at q < 1)."""
    steps = {}
    for z, q, n in history:
        key = (float(z), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(z, q, n) for (z, q), n in steps.items()]


def opacus_rdp_epsilon(history, delta: float) -> float:
    """Epsilon of an Opacus history ``[(z, q, steps), ...]`` with a fresh RDPAccountant."""
    acc = RDPAccountant()
    acc.history = grouped_history(history)
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def calibrate_with_prior(
    prior_history, target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float = 0.01
) -> float:
    """Smallest noise multiplier ``z`` (within ``tolerance`` of the target) such that the
    prior history plus ``steps`` DP-SGD steps at ``(z, sample_rate)`` stays within
    ``target_epsilon`` at ``delta`` (Opacus RDP). Without prior history this is Opacus'
    ``get_noise_multiplier``; with one, Opacus has no helper (it calibrates from zero spend),
    so this bisects on Opacus' own accountant. Raises BudgetExhausted when the prior spend
    alone already reaches the target. The result lands on the safe side: its epsilon is at most
    ``target_epsilon * (1 - CALIBRATION_MARGIN)``."""
    target_epsilon = float(target_epsilon) * (1.0 - CALIBRATION_MARGIN)  # H5 (issue 12)
    prior = [tuple(h) for h in prior_history or []]
    if not prior:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                              sample_rate=float(sample_rate), steps=int(steps), accountant="rdp",
                                              epsilon_tolerance=float(tolerance)))
    spent = opacus_rdp_epsilon(prior, delta)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"record-level epsilon already spent on this data is {spent:.4f} >= target {target_epsilon} "
            f"(delta={delta}); no DP-SGD training is possible"
        )

    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    prior_rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders)
                    for z, q, n in grouped_history(prior))

    def eps(z: float) -> float:  # what RDPAccountant.get_epsilon computes for prior + new steps
        new = rdp_analysis.compute_rdp(q=float(sample_rate), noise_multiplier=z, steps=int(steps), orders=orders)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=prior_rdp + new, delta=delta)[0])

    lo, hi = 0.0, 10.0  # invariant: eps(lo) > target (z -> 0: unbounded), eps(hi) <= target
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyConfigError(f"no noise multiplier reaches record-level epsilon {target_epsilon}")
    for _ in range(200):
        if eps(hi) >= target_epsilon - tolerance or hi - lo < 1e-4 * hi:
            break
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return float(hi)


RECORD_LEDGER_FORMAT = "adpfl-record-ledger"


class RecordLedger:
    """A site's persistent record-level (DP-SGD) ledger: one entry per DP-SGD training
    round ``{job_id, round, noise_multiplier, sample_rate, steps, epsilon_rdp}``, kept
    across jobs and restarts (every job that trains on the same records composes).

    Every training counts, also a retried one (its noisy gradients were computed anew);
    nothing computed is ever removed (a round reserved but stopped before its first step is
    rolled back). Atomic writes; a corrupt file is an error naming it. Concurrent jobs
    change the file only under its lock (:mod:`adpfl.privacy.reservation`).
    """

    def __init__(self, delta: float, entries: Optional[List[dict]] = None, path: Optional[str] = None):
        if not (0 < float(delta) < 1):
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
        self.delta = float(delta)
        self.entries: List[dict] = list(entries or [])
        self.path = path

    def history(self) -> list:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries]

    def epsilon(self) -> float:
        return opacus_rdp_epsilon(self.history(), self.delta)

    def record(self, *, job_id: Optional[str], round: int, noise_multiplier: float, sample_rate: float,
               steps: int) -> dict:
        entry = {"job_id": job_id, "round": int(round), "noise_multiplier": float(noise_multiplier),
                 "sample_rate": float(sample_rate), "steps": int(steps)}
        hist = self.history() + [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
        entry["epsilon_rdp"] = opacus_rdp_epsilon(hist, self.delta)
        self.entries.append(entry)
        return dict(entry)

    def save(self, path: Optional[str] = None) -> None:
        write_json_atomic(path or self.path, {"format": RECORD_LEDGER_FORMAT, "unit": PRIVACY_UNIT,
                                              "delta": self.delta, "accountant": "opacus rdp",
                                              "entries": self.entries})

    @classmethod
    def load_or_create(cls, path: str, delta: float) -> "RecordLedger":
        if not os.path.exists(path):
            return cls(delta, path=path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict) or data.get("format") != RECORD_LEDGER_FORMAT:
                raise ValueError(f"format field is not {RECORD_LEDGER_FORMAT!r}")
            ledger = cls(data["delta"], path=path)
            for i, e in enumerate(data.get("entries", [])):
                z, q, n = float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
                if not (z > 0 and math.isfinite(z) and 0 < q <= 1 and n >= 0):
                    raise ValueError(f"entry {i} has invalid (z, q, steps) = ({z}, {q}, {n})")
                ledger.entries.append(dict(e))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrivacyError(f"record-level privacy ledger {path} is corrupt or invalid: {e}") from None
        if abs(ledger.delta - float(delta)) > 0:
            raise PrivacyConfigError(f"record-level ledger {path} uses delta={ledger.delta}, the job asks delta={delta}")
        return ledger


@dataclass
class DPSGDConfig:
    """Record-level DP-SGD settings.

    Either ``noise_multiplier`` is given, or it is calibrated from ``target_epsilon`` over
    ``planned_rounds`` rounds of the trainer's local training (``local_epochs`` epochs of
    ``int(1/q)`` Poisson steps, or ``max_steps_per_round`` steps when capped).
    """

    max_grad_norm: float = 1.0
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    planned_rounds: Optional[int] = None
    noise_multiplier: Optional[float] = None
    epsilon_tolerance: float = 0.01
    optimizer: str = "adam"  # "adam" | "sgd"

    def validate(self) -> "DPSGDConfig":
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise PrivacyConfigError(f"max_grad_norm must be positive and finite, got {self.max_grad_norm}")
        if not (0 < self.delta < 1):
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.optimizer not in ("adam", "sgd"):
            raise PrivacyConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.noise_multiplier is None:
            if self.target_epsilon is None or self.planned_rounds is None:
                raise PrivacyConfigError("DP-SGD needs noise_multiplier, or target_epsilon and planned_rounds")
        elif not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyConfigError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyConfigError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.planned_rounds is not None and int(self.planned_rounds) < 1:
            raise PrivacyConfigError(f"planned_rounds must be >= 1, got {self.planned_rounds}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


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

    def __init__(self, task: SegTask, datalist: Dict[str, List[dict]], config: TrainConfig, dp: DPSGDConfig,
                 prior_history: Optional[list] = None):
        """``prior_history``: Opacus history ``[(z, q, steps), ...]`` already spent on these
        records (earlier jobs or rounds before a restart, from the site's RecordLedger);
        the accountant starts from it and ``z`` is calibrated for the remaining budget."""
        self.dp = dp.validate()
        self.base = LocalTrainer(task, datalist, config)
        self.task, self.config, self.device = task, config, self.base.device
        self.num_train = self.base.num_train
        self.sample_rate = min(1.0, config.batch_size / self.num_train)
        self.steps_per_epoch = max(1, int(1 / self.sample_rate))
        per_round = config.local_epochs * self.steps_per_epoch
        if config.max_steps_per_round:
            per_round = min(per_round, int(config.max_steps_per_round))
        self.steps_per_round = per_round
        prior = [tuple(h) for h in prior_history or []]
        if dp.noise_multiplier is not None:
            self.noise_multiplier = float(dp.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_with_prior(
                prior, float(dp.target_epsilon), float(dp.delta), self.sample_rate,
                int(dp.planned_rounds) * self.steps_per_round, float(dp.epsilon_tolerance),
            )
        self.accountant = RDPAccountant()
        self.accountant.history = list(prior)
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._optimizer_model_id: Optional[int] = None
        self.rounds_trained = 0

    # -- accounting -----------------------------------------------------------------
    @property
    def history(self) -> list:
        return list(self.accountant.history)

    def epsilon(self) -> float:
        """Cumulative record-level epsilon at ``dp.delta`` (Opacus RDP)."""
        return opacus_rdp_epsilon(self.accountant.history, self.dp.delta)

    def projected_epsilon(self, extra_steps: Optional[int] = None) -> float:
        steps = self.steps_per_round if extra_steps is None else int(extra_steps)
        hist = list(self.accountant.history) + [(self.noise_multiplier, self.sample_rate, steps)]
        return opacus_rdp_epsilon(hist, self.dp.delta)

    def privacy_report(self) -> Dict[str, Any]:
        return {
            "unit": PRIVACY_UNIT,
            "mechanism": "DP-SGD (Opacus): Poisson sampling, per-sample L2 clip, Gaussian noise",
            "epsilon": self.epsilon(),
            "delta": self.dp.delta,
            "accountant": "rdp",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.dp.max_grad_norm,
            "steps": sum(int(h[2]) for h in self.accountant.history),
            "planned_rounds": self.dp.planned_rounds,
            "target_epsilon": self.dp.target_epsilon,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {"history": [list(h) for h in self.accountant.history], "noise_multiplier": self.noise_multiplier,
                "rounds_trained": self.rounds_trained}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.accountant.history = [tuple(h) for h in state.get("history", [])]
        self.rounds_trained = int(state.get("rounds_trained", 0))

    # -- training -------------------------------------------------------------------
    def _base_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """One optimizer per model object, kept across rounds (its moments are
        post-processing of noisy gradients, hence private)."""
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
        return DataLoader(
            self.base.train_ds, batch_sampler=sampler, num_workers=self.config.num_workers, collate_fn=_collate_or_empty
        )

    def train(
        self,
        model: torch.nn.Module,
        should_stop: Optional[Callable[[], bool]] = None,
        on_step: Optional[Callable[[int, float], None]] = None,
    ) -> Dict[str, Any]:
        """One round of DP-SGD local training.

        Returns ``loss`` (mean over non-empty steps), ``steps``, ``samples``, ``seconds``,
        ``aborted``, ``epsilon`` (cumulative record-level epsilon at ``delta`` after this
        round), ``delta``, ``noise_multiplier``, ``sample_rate``, ``privacy_unit``.
        Raises :class:`BudgetExhausted` before training if this round would exceed
        ``target_epsilon`` (nothing trained, accountant unchanged).
        """
        if self.dp.target_epsilon is not None:
            # H5 (issue 12): any excess is refused (calibration lands CALIBRATION_MARGIN below)
            projected = self.projected_epsilon()
            if projected > float(self.dp.target_epsilon):
                raise BudgetExhausted(
                    f"DP-SGD round would bring record-level epsilon to {projected:.4f} > target "
                    f"{self.dp.target_epsilon} (delta={self.dp.delta}); not training"
                )
        model.to(self.device).train()
        base_opt = self._base_optimizer(model)
        gen = make_generator(self.device)  # OS entropy: Poisson sampling and noise
        sample_gen = make_generator("cpu")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = Float64NoiseDPOptimizer(  # H5 (issue 12): Opacus' DPOptimizer, noise drawn/added in float64
            base_opt,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=max(1, int(round(self.sample_rate * self.num_train))),
            loss_reduction="mean",
            generator=gen,
        )
        opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = self.base.loss_fn
        steps, samples, loss_sum, nonempty = 0, 0, 0.0, 0
        aborted = False
        t0 = time.perf_counter()
        try:
            while steps < self.steps_per_round and not aborted:
                for batch in self._poisson_loader(sample_gen):
                    if should_stop is not None and should_stop():
                        aborted = True
                        break
                    opt.zero_grad(set_to_none=True)
                    n = int(batch["image"].shape[0]) if batch else 0
                    if n == 0:
                        # empty Poisson batch: the step still releases noise
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    else:
                        x = batch["image"].to(self.device)
                        y = batch["label"].to(self.device)
                        loss = loss_fn(gsm(x), y)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"DP-SGD loss became {loss.item()} at step {steps}")
                        loss.backward()
                        loss_sum += float(loss.detach())
                        nonempty += 1
                    opt.step()
                    steps += 1
                    samples += n
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
            "privacy_unit": PRIVACY_UNIT,
        }

    def evaluate(self, model: torch.nn.Module, with_hd95: bool = True) -> Dict[str, float]:
        return self.base.evaluate(model, with_hd95=with_hd95)


def make_private_trainer(
    task: SegTask, datalist: Dict[str, List[dict]], config: TrainConfig, **dp_kwargs: Any
) -> DPSGDTrainer:
    """Shorthand: ``DPSGDTrainer(task, datalist, config, DPSGDConfig(**dp_kwargs))``."""
    return DPSGDTrainer(task, datalist, config, DPSGDConfig(**dp_kwargs))
