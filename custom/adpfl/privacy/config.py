"""Settings of the privacy layer: :class:`PrivacyConfig` (update-level release, moved from
privacy/pipeline.py) and :class:`DPSGDConfig` (record-level DP-SGD, moved from
training/dpsgd.py). See docs/privacy-model.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

from .analysis import ACCOUNTANTS, calibrate_noise_multiplier, epsilon_gaussian
from .errors import PrivacyConfigError
from .mechanisms import MASK_POLICIES

MODES = ("dpfl", "adpfl")
NOISE_TYPES = ("gaussian", "laplace")
TEST_SEED_ENV = "ADPFL_ALLOW_TEST_SEED"


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
        raise PrivacyConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass
class PrivacyConfig:
    """Settings of the privacy pipeline (see module docstring for the modes).

    ``test_seed`` fixes the noise generator and is for tests only: it is refused unless
    the environment variable ``ADPFL_ALLOW_TEST_SEED=1`` is set, so a job config cannot
    set it by accident; seeded releases carry ``seeded=True`` in their metadata.
    """

    mode: str = "adpfl"
    keep_fraction: float = 1.0
    mask_policy: str = "random"
    clip_norm: float = 1.0
    clip_percentile: float = 0.5
    clip_lr: float = 0.2
    clip_indicator_noise: float = 10.0
    clip_min: float = 1e-4
    clip_max: float = 1e4
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    planned_rounds: int | None = None
    noise_type: str = "gaussian"
    accountant: str = "rdp"
    noise_max_factor: float = 1.5
    noise_min_factor: float = 0.5
    track_prv: bool = True
    test_seed: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrivacyConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrivacyConfigError(f"unknown privacy setting(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def adaptive_clip(self) -> bool:
        return self.mode == "adpfl" and self.clip_lr > 0

    def validate(self) -> "PrivacyConfig":
        """Check every setting; PrivacyConfigError names the offending one. Returns self."""
        if self.mode not in MODES:
            raise PrivacyConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
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
        if not (self.clip_lr >= 0 and math.isfinite(self.clip_lr)):
            raise PrivacyConfigError(f"clip_lr must be finite and >= 0, got {self.clip_lr}")
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
            isinstance(self.planned_rounds, bool) or int(self.planned_rounds) != self.planned_rounds or self.planned_rounds < 1
        ):
            raise PrivacyConfigError(f"planned_rounds must be a positive integer, got {self.planned_rounds}")
        if not (0.0 < self.noise_min_factor <= 1.0):
            raise PrivacyConfigError(f"noise_min_factor must be in (0, 1], got {self.noise_min_factor}")
        if not (self.noise_max_factor >= 1.0 and math.isfinite(self.noise_max_factor)):
            raise PrivacyConfigError(f"noise_max_factor must be >= 1, got {self.noise_max_factor}")
        if self.test_seed is not None:
            if os.environ.get(TEST_SEED_ENV) != "1":
                raise PrivacyConfigError(
                    f"test_seed is for tests only (fixed noise is not private); it is refused unless {TEST_SEED_ENV}=1"
                )
            if isinstance(self.test_seed, bool) or int(self.test_seed) != self.test_seed:
                raise PrivacyConfigError(f"test_seed must be an integer, got {self.test_seed!r}")

        if self.mode == "dpfl":
            if self.keep_fraction != 1.0:
                raise PrivacyConfigError(f"keep_fraction must be 1.0 in mode='dpfl' (no sparsification), got {self.keep_fraction}")
            if self.noise_multiplier is None:
                if self.target_epsilon is None or self.planned_rounds is None:
                    raise PrivacyConfigError(
                        "mode='dpfl' needs noise_multiplier, or target_epsilon and planned_rounds to calibrate it"
                    )
                self._check_reachable()
        else:
            if self.noise_type != "gaussian":
                raise PrivacyConfigError(
                    f"noise_type={self.noise_type!r} is supported in mode='dpfl' only (adaptive clipping and the "
                    "adaptive schedule are Gaussian)"
                )
            if self.target_epsilon is None or self.planned_rounds is None:
                raise PrivacyConfigError("mode='adpfl' needs target_epsilon and planned_rounds (the adaptive noise budget)")
            if self.noise_multiplier is not None:
                raise PrivacyConfigError("noise_multiplier is fixed-noise (dpfl) only; mode='adpfl' chooses it adaptively")
            self._check_reachable()
            if self.clip_lr > 0:
                _positive("clip_indicator_noise", self.clip_indicator_noise)
        return self

    def _check_reachable(self) -> None:
        if self.noise_type == "laplace":
            return  # any epsilon is reachable: z = rounds / epsilon
        from .analysis import MAX_NOISE_MULTIPLIER

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


__all__ = ["DPSGDConfig", "MODES", "NOISE_TYPES", "PrivacyConfig", "TEST_SEED_ENV"]
