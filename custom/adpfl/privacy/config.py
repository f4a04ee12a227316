"""Settings of the privacy layer, defined once: names, defaults, units and validation.

* :class:`PrivacyConfig`: the update-level release (the site's result filter). Unit of
  privacy: the site's whole model update of one round (site-level update DP).
* :class:`DPSGDConfig`: record-level DP-SGD in local training. Unit: one training record.

Each field carries ``metadata={"help": ..., "unit": ...}``; the FLARE components take their
constructor defaults from these dataclasses (:func:`default_of`), and documentation is
generated from the metadata, so a name or default exists in one place only. ``None``
means "not set" (for example ``noise_multiplier=None``: calibrate from ``target_epsilon``).
See docs/privacy-model.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from adpfl.modes import UPDATE_MODES

from .analysis import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, calibrate_noise_multiplier, epsilon_gaussian
from .errors import PrivacyConfigError
from .mechanisms import MASK_POLICIES

#: how the site's update is released: the update-level job modes (adpfl.modes, the one home of
#: the mode names; npfl and the record-level modes release no filtered update)
RELEASE_MODES = UPDATE_MODES
NOISE_TYPES = ("gaussian", "laplace")
DPSGD_OPTIMIZERS = ("adam", "sgd")
#: learning-rate schedules of DP-SGD over its planned steps (adpfl.training.dp_extras.lr_factor)
DPSGD_LR_SCHEDULES = ("constant", "cosine")


def setting(default: Any, help: str, unit: str = "") -> Any:
    """A dataclass field with its documentation (``help``) and ``unit`` in the metadata."""
    return field(default=default, metadata={"help": help, "unit": unit})


def default_of(cls: type, name: str) -> Any:
    """The default of setting ``name`` of config dataclass ``cls`` (KeyError if unknown)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is MISSING:
                raise KeyError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
        raise PrivacyConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass
class PrivacyConfig:
    """Settings of the update-level privacy pipeline (:class:`adpfl.privacy.pipeline.PrivacyPipeline`).

    ``mode="dpfl"``: no sparsification, fixed clip, fixed noise multiplier (given, or
    calibrated from ``target_epsilon`` over ``planned_rounds``). ``mode="adpfl"``: sparsify,
    adaptive clip (``clip_learning_rate=0`` keeps it fixed) and adaptive noise under
    ``target_epsilon``. :meth:`validate` raises :class:`PrivacyConfigError` naming the setting.
    """

    mode: str = setting("adpfl", "dpfl (fixed clip, fixed noise, no sparsification) or adpfl "
                        "(sparsify + adaptive clip + adaptive noise)")
    keep_fraction: float = setting(1.0, "fraction of coordinates released per round (adpfl)", "fraction in (0, 1]")
    mask_policy: str = setting("random", "random (fresh randomness), topk_public (last global change) or "
                               "topk_private (opt-out: mask chosen from the private update, flagged)")
    clip_norm: float = setting(1.0, "fixed clip (dpfl) or initial clip (adpfl) of the kept update",
                               "L2 norm; sensitivity is 2 * clip_norm")
    clip_percentile: float = setting(0.5, "target quantile of the site's update norms (adaptive clip)",
                                     "quantile in (0, 1)")
    clip_learning_rate: float = setting(0.2, "geometric step of the adaptive clip (0 = fixed clip)")
    clip_indicator_noise: float = setting(1.0, "std of the noise on the adaptive clip's indicator (accounted)",
                                          "noise multiplier of a sensitivity-1 bit")
    clip_min: float = setting(1e-4, "lower bound of the adaptive clip", "L2 norm")
    clip_max: float = setting(1e4, "upper bound of the adaptive clip", "L2 norm")
    noise_multiplier: float | None = setting(None, "fixed noise multiplier for dpfl (None = calibrate from "
                                                "target_epsilon over planned_rounds)", "noise std / (2 * clip_norm)")
    target_epsilon: float | None = setting(None, "the site's budget at delta (None = no budget; adpfl and a "
                                              "calibrated dpfl need it)", "epsilon, site-level update DP")
    delta: float = setting(1e-5, "the delta every epsilon is stated at", "probability, per site")
    planned_rounds: int | None = setting(None, "rounds the budget is planned over (the job's num_rounds)",
                                            "rounds")
    noise_type: str = setting("gaussian", "gaussian, or laplace (L1 clip, pure epsilon-DP, budget spread evenly "
                              "over planned_rounds; in adpfl the noise scale follows the adaptive L1 clip, whose "
                              "indicator gets Laplace noise too: the ADP-FL paper's noise)")
    accountant: str = setting("rdp", "accountant that enforces the budget: rdp (PRV is reported beside it) or prv")
    noise_max_factor: float = setting(1.5, "adaptive noise: largest multiplier as a factor of the even-spend plan",
                                      "factor >= 1")
    noise_min_factor: float = setting(0.5, "adaptive noise: smallest multiplier as a factor of the even-spend plan",
                                      "factor in (0, 1]")
    track_prv: bool = setting(True, "also compute the PRV epsilon for the ledger and the report")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrivacyConfigError(f"unknown privacy setting(s): {', '.join(unknown)}")
        return cls(**dict(data))

    @property
    def adaptive_clip(self) -> bool:
        return self.mode == "adpfl" and self.clip_learning_rate > 0

    def validate(self) -> PrivacyConfig:
        """Check every setting; PrivacyConfigError names the offending one. Returns self."""
        if self.mode not in RELEASE_MODES:
            raise PrivacyConfigError(f"mode must be one of {RELEASE_MODES}, got {self.mode!r}")
        if self.noise_type not in NOISE_TYPES:
            raise PrivacyConfigError(f"noise_type must be one of {NOISE_TYPES}, got {self.noise_type!r}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if not (isinstance(self.keep_fraction, (int, float)) and 0.0 < self.keep_fraction <= 1.0):
            raise PrivacyConfigError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.mask_policy not in MASK_POLICIES:
            raise PrivacyConfigError(f"mask_policy must be one of {MASK_POLICIES}, got {self.mask_policy!r}")
        _positive("clip_norm", self.clip_norm)
        _positive("delta", self.delta)
        if not self.delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not (0.0 < self.clip_percentile < 1.0):
            raise PrivacyConfigError(f"clip_percentile must be in (0, 1), got {self.clip_percentile}")
        if not (self.clip_learning_rate >= 0 and math.isfinite(self.clip_learning_rate)):
            raise PrivacyConfigError(f"clip_learning_rate must be finite and >= 0, got {self.clip_learning_rate}")
        _positive("clip_min", self.clip_min)
        _positive("clip_max", self.clip_max)
        if not (self.clip_min <= self.clip_norm <= self.clip_max):
            raise PrivacyConfigError(
                f"clip_norm={self.clip_norm} must lie in [clip_min={self.clip_min}, clip_max={self.clip_max}]"
            )
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if self.planned_rounds is not None and (
            isinstance(self.planned_rounds, bool)
            or int(self.planned_rounds) != self.planned_rounds
            or self.planned_rounds < 1
        ):
            raise PrivacyConfigError(f"planned_rounds must be a positive integer, got {self.planned_rounds}")
        if not (0.0 < self.noise_min_factor <= 1.0):
            raise PrivacyConfigError(f"noise_min_factor must be in (0, 1], got {self.noise_min_factor}")
        if not (self.noise_max_factor >= 1.0 and math.isfinite(self.noise_max_factor)):
            raise PrivacyConfigError(f"noise_max_factor must be >= 1, got {self.noise_max_factor}")

        if self.mode == "dpfl":
            if self.keep_fraction != 1.0:
                raise PrivacyConfigError(
                    f"keep_fraction must be 1.0 in mode='dpfl' (no sparsification), got {self.keep_fraction}"
                )
            if self.noise_multiplier is None:
                if self.target_epsilon is None or self.planned_rounds is None:
                    raise PrivacyConfigError(
                        "mode='dpfl' needs noise_multiplier, or target_epsilon and planned_rounds to calibrate it"
                    )
                self._check_reachable()
        else:
            if self.target_epsilon is None or self.planned_rounds is None:
                raise PrivacyConfigError(
                    "mode='adpfl' needs target_epsilon and planned_rounds (the adaptive noise budget)"
                )
            if self.noise_multiplier is not None:
                raise PrivacyConfigError(
                    "noise_multiplier is fixed-noise (dpfl) only; mode='adpfl' chooses it adaptively"
                )
            self._check_reachable()
            if self.clip_learning_rate > 0:
                _positive("clip_indicator_noise", self.clip_indicator_noise)
        return self

    def _check_reachable(self) -> None:
        if self.noise_type == "laplace":
            return  # any epsilon is reachable: z = rounds / epsilon
        floor = epsilon_gaussian([MAX_NOISE_MULTIPLIER] * int(self.planned_rounds), self.delta, self.accountant)
        if floor >= self.target_epsilon:
            raise PrivacyConfigError(
                f"target_epsilon={self.target_epsilon} is unreachable in planned_rounds={self.planned_rounds} at "
                f"delta={self.delta} with noise multiplier <= {MAX_NOISE_MULTIPLIER:g} ({self.accountant}: "
                f"floor {floor:.3g})"
            )

    def resolved_noise_multiplier(self) -> float:
        """dpfl: the fixed multiplier (calibrated from the target when not given)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if self.noise_type == "laplace":
            return float(self.planned_rounds) / float(self.target_epsilon)
        return calibrate_noise_multiplier(self.target_epsilon, self.delta, int(self.planned_rounds), self.accountant)


@dataclass
class DPSGDConfig:
    """Record-level DP-SGD settings.

    Either ``noise_multiplier`` is given, or it is calibrated from ``target_epsilon`` over
    ``planned_rounds`` rounds of the trainer's local training (``local_epochs`` epochs of
    ``int(1/q)`` Poisson steps, or ``max_steps_per_round`` steps when capped).
    """

    max_grad_norm: float = setting(1.0, "per-sample gradient clip", "L2 norm of one record's gradient")
    target_epsilon: float | None = setting(None, "the site's record-level budget at delta (None: needs "
                                              "noise_multiplier)", "epsilon, record-level DP")
    delta: float = setting(1e-5, "the delta the record-level epsilon is stated at", "probability")
    planned_rounds: int | None = setting(None, "rounds the record-level budget is planned over", "rounds")
    noise_multiplier: float | None = setting(None, "fixed DP-SGD noise multiplier (None = calibrate from "
                                                "target_epsilon)", "noise std / max_grad_norm")
    epsilon_tolerance: float = setting(0.01, "calibration stops within this of the target", "epsilon")
    optimizer: str = setting("adam", "optimizer over the noisy gradients: adam or sgd")
    # ---- ADP-SGD (mode adpsgd; privacy/record_adaptive.py) and what the best DP training uses
    adaptive: bool = setting(False, "ADP-SGD: adaptive per-sample clip from a private quantile estimate and a "
                                    "noise schedule driven by public training progress under the budget")
    clip_quantile: float = setting(0.5, "adaptive clip: target quantile of per-record gradient norms",
                                   "quantile in (0, 1)")
    clip_learning_rate: float = setting(0.2, "adaptive clip: geometric step per optimizer step (0 = fixed clip)")
    clip_count_noise: float = setting(10.0, "adaptive clip: noise std of the released centred unclipped count "
                                            "(accounted; needs 2 x it > the effective noise multiplier)",
                                      "records")
    noise_min_factor: float = setting(0.5, "adaptive noise: least multiplier as a factor of the even plan",
                                      "factor in (0, 1]")
    noise_max_factor: float = setting(1.5, "adaptive noise: largest multiplier as a factor of the even plan",
                                      "factor >= 1")
    keep_fraction: float = setting(1.0, "fraction of coordinates updated per round (random mask drawn from "
                                        "fresh randomness each round, data-independent)", "fraction in (0, 1]")
    augmult: int = setting(1, "augmentation multiplicity: per-record gradient averaged over K augmentations "
                              "before clipping (still one record's contribution)", "K copies")
    ema_decay: float = setting(0.0, "EMA of the weights over the round's steps; the EMA is what leaves "
                                    "(post-processing; 0 = off)", "decay in [0, 1)")
    ema_warmup: bool = setting(False, "EMA decay at the round's t-th averaged step min(ema_decay, (1 + t) / (10 + t)) "
                                      "(De et al. 2022), so a high decay does not pin the EMA to the round's first "
                                      "weights")
    physical_batch_size: int | None = setting(None, "largest physical batch (Opacus BatchMemoryManager): "
                                                    "larger Poisson batches as virtual steps (None = no split)",
                                              "records")
    lr_schedule: str = setting("constant", "learning rate over the planned training (planned_rounds x steps per "
                                           "round, counted across rounds): constant, or cosine from the job's "
                                           "learning_rate down to lr_final_factor x it (public step counts only: "
                                           "post-processing, no privacy cost)")
    lr_final_factor: float = setting(0.0, "cosine schedule: the last step's learning rate as a factor of the "
                                          "job's learning_rate", "factor in [0, 1]")
    public_num_records: int | None = setting(
        None, "the site's number of training records as it declares it public (e.g. its published cohort "
              "size): the sample rate q = batch_size / public_num_records and the steps per round come from it, "
              "so nothing released depends on the true count (add/remove-one); None: the true count is used and "
              "revealed by q (treated as public)", "records")

    def validate(self) -> DPSGDConfig:
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise PrivacyConfigError(f"max_grad_norm must be positive and finite, got {self.max_grad_norm}")
        if not (0 < self.delta < 1):
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.optimizer not in DPSGD_OPTIMIZERS:
            raise PrivacyConfigError(f"optimizer must be one of {DPSGD_OPTIMIZERS}, got {self.optimizer!r}")
        if self.noise_multiplier is None:
            if self.target_epsilon is None or self.planned_rounds is None:
                raise PrivacyConfigError("DP-SGD needs noise_multiplier, or target_epsilon and planned_rounds")
        elif not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyConfigError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyConfigError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.planned_rounds is not None and int(self.planned_rounds) < 1:
            raise PrivacyConfigError(f"planned_rounds must be >= 1, got {self.planned_rounds}")
        if self.adaptive:
            if self.target_epsilon is None or self.planned_rounds is None or self.noise_multiplier is not None:
                raise PrivacyConfigError("adaptive DP-SGD needs target_epsilon and planned_rounds and no fixed "
                                         "noise_multiplier (the schedule chooses it)")
            if not 0 < self.clip_quantile < 1:
                raise PrivacyConfigError(f"clip_quantile must be in (0, 1), got {self.clip_quantile}")
            if not (self.clip_learning_rate >= 0 and math.isfinite(self.clip_learning_rate)):
                raise PrivacyConfigError(f"clip_learning_rate must be finite and >= 0, got {self.clip_learning_rate}")
            _positive("clip_count_noise", self.clip_count_noise)
            if not 0 < self.noise_min_factor <= 1:
                raise PrivacyConfigError(f"noise_min_factor must be in (0, 1], got {self.noise_min_factor}")
            if not (self.noise_max_factor >= 1 and math.isfinite(self.noise_max_factor)):
                raise PrivacyConfigError(f"noise_max_factor must be >= 1, got {self.noise_max_factor}")
        if not (isinstance(self.keep_fraction, (int, float)) and 0 < self.keep_fraction <= 1):
            raise PrivacyConfigError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if isinstance(self.augmult, bool) or not isinstance(self.augmult, int) or self.augmult < 1:
            raise PrivacyConfigError(f"augmult must be an integer >= 1, got {self.augmult!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise PrivacyConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.ema_warmup, bool):
            raise PrivacyConfigError(f"ema_warmup must be true or false, got {self.ema_warmup!r}")
        if self.lr_schedule not in DPSGD_LR_SCHEDULES:
            raise PrivacyConfigError(f"lr_schedule must be one of {DPSGD_LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule != "constant" and self.planned_rounds is None:
            raise PrivacyConfigError(f"lr_schedule {self.lr_schedule!r} needs planned_rounds (the steps it spans)")
        if isinstance(self.lr_final_factor, bool) or not (
            isinstance(self.lr_final_factor, (int, float)) and 0 <= self.lr_final_factor <= 1
        ):
            raise PrivacyConfigError(f"lr_final_factor must be in [0, 1], got {self.lr_final_factor!r}")
        if self.physical_batch_size is not None and (
            isinstance(self.physical_batch_size, bool) or not isinstance(self.physical_batch_size, int)
            or self.physical_batch_size < 1
        ):
            raise PrivacyConfigError(f"physical_batch_size must be an integer >= 1, got {self.physical_batch_size!r}")
        if self.public_num_records is not None and (
            isinstance(self.public_num_records, bool) or not isinstance(self.public_num_records, int)
            or self.public_num_records < 1
        ):
            raise PrivacyConfigError(f"public_num_records must be an integer >= 1, got {self.public_num_records!r}")
        return self


__all__ = ["DPSGD_OPTIMIZERS", "DPSGDConfig", "NOISE_TYPES", "PrivacyConfig", "RELEASE_MODES", "default_of", "setting"]
