"""The site's privacy pipeline on an outgoing model update (sparsify -> clip -> noise).

Modes (same code, different settings):

* ``"dpfl"``: no sparsification, fixed clip ``C``, fixed multiplier ``z`` (given, or
  calibrated from ``target_epsilon`` over ``planned_rounds``).
* ``"adpfl"``: sparsify (``keep_fraction``, ``mask_policy``), adaptive clip (Andrew et
  al.; ``clip_lr=0`` keeps it fixed) and adaptive noise (:class:`AdaptiveNoiseSchedule`).

Conventions: replace-one sensitivity ``2 * C_t``; noise std ``sigma_t = z_u * 2 * C_t``
on every kept coordinate (``z_u`` is the update's own multiplier; the ledger accounts
the effective ``z_t`` that also covers the adaptive clipper's noisy indicator);
unkept coordinates are exactly 0 in the release. Laplace (pure DP, L1 clip, scale
``b = z * 2 * C``, ``epsilon_round = 1 / z``) is supported in dpfl mode only.

Order inside :meth:`PrivacyPipeline.release`: under the ledger file's lock (when
``ledger_path`` is given; :mod:`adpfl.privacy.reservation`), re-read the ledger from disk
(other jobs' releases included), refuse a repeated round, choose ``z_t`` with that spend,
refuse with :class:`BudgetExhausted` if the projected epsilon would exceed
``target_epsilon`` (nothing computed, ledger unchanged), else record the entry and save
it -- the spend is reserved before the update is touched; then validate and flatten the
update (non-float entries -> ValueError naming the key, the caller drops them
beforehand; NaN/Inf -> PrivacyError naming the key); mask; clip; noise (float64 draw and
sum, rounded to the wire dtype); adaptive-clip step for the next round. If anything fails
before the adaptive-clip step, the reservation is rolled back under the lock (nothing was
released); any exception propagates and nothing is returned. A lock or I/O error of the
ledger raises before anything is computed (fail closed).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from .accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise_multiplier, epsilon_gaussian
from .adaptive import AdaptiveClipper, update_noise_multiplier_for
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError
from .mechanisms import (
    MASK_POLICIES,
    FlatSpec,
    add_gaussian_noise,
    add_laplace_noise,
    clip_l1,
    clip_l2,
    first_nonfinite_key,
    flatten_update,
    make_generator,
    mask_is_covered,
    sparsify_mask,
    unflatten_update,
)
from .reservation import RESERVATION_KEY, reserve_update_release, rollback_update_release
from .schedule import AdaptiveNoiseSchedule, FixedNoise

MODES = ("dpfl", "adpfl")
NOISE_TYPES = ("gaussian", "laplace")
TEST_SEED_ENV = "ADPFL_ALLOW_TEST_SEED"
SENSITIVITY_CONVENTION = "replace-one, sensitivity = 2 * clip_norm"


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
        from .accounting import MAX_NOISE_MULTIPLIER

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
class SparseRelease:
    """Kept coordinates of a release: ``values`` at flat ``indices`` (sorted) of ``spec``."""

    indices: torch.Tensor
    values: torch.Tensor
    spec: FlatSpec

    def to_dense(self) -> dict[str, torch.Tensor]:
        flat = torch.zeros(self.spec.numel, dtype=self.values.dtype, device=self.values.device)
        flat[self.indices] = self.values
        return unflatten_update(flat, self.spec)


class PrivacyPipeline:
    """Sparsify -> clip -> noise with accounting in ``ledger`` (see module docstring)."""

    def __init__(self, config: PrivacyConfig, ledger: PrivacyLedger, ledger_path: str | os.PathLike | None = None):
        self.config = config.validate()
        self.ledger = ledger
        self.ledger_path = None if ledger_path is None else os.fspath(ledger_path)
        if abs(ledger.delta - config.delta) > 0:
            raise PrivacyConfigError(f"delta={config.delta} differs from the privacy ledger's delta={ledger.delta}")
        if config.target_epsilon is not None:
            ledger.target_epsilon = float(config.target_epsilon)
        ledger.accountant = config.accountant
        ledger.track_prv = config.track_prv
        self.mechanism = config.noise_type
        if config.mode == "dpfl":
            self.schedule: FixedNoise | AdaptiveNoiseSchedule = FixedNoise(config.resolved_noise_multiplier())
        else:
            self.schedule = AdaptiveNoiseSchedule(
                target_epsilon=config.target_epsilon,
                delta=config.delta,
                planned_rounds=int(config.planned_rounds),
                accountant=config.accountant,
                min_factor=config.noise_min_factor,
                max_factor=config.noise_max_factor,
            )
        self.clipper: AdaptiveClipper | None = None
        if config.adaptive_clip:
            self.clipper = AdaptiveClipper(
                initial_clip_norm=config.clip_norm,
                target_quantile=config.clip_percentile,
                learning_rate=config.clip_lr,
                indicator_noise_std=config.clip_indicator_noise,
                min_clip_norm=config.clip_min,
                max_clip_norm=config.clip_max,
            )
            if not config.clip_indicator_noise > self.schedule.z_max:
                raise PrivacyConfigError(
                    f"clip_indicator_noise={config.clip_indicator_noise} must exceed the largest effective noise "
                    f"multiplier the schedule may use ({self.schedule.z_max:.4g}); recommended >= "
                    f"{3 * self.schedule.z_max:.3g}, or clip_lr=0 for a fixed clip"
                )
        self._fixed_clip = float(config.clip_norm)
        self.last_indices: torch.Tensor | None = None

    # ------------------------------------------------------------------- state
    @property
    def clip_norm(self) -> float:
        """Clip norm ``C_t`` the next release will use (public)."""
        return self.clipper.clip_norm if self.clipper is not None else self._fixed_clip

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.config.mode:
            raise PrivacyConfigError(f"saved privacy state is for mode={state.get('mode')!r}, config has {self.config.mode!r}")
        if self.clipper is not None and state.get("clipper"):
            self.clipper.load_state_dict(state["clipper"])
        if state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])

    def describe(self) -> str:
        return f"privacy pipeline mode={self.config.mode} clip_norm={self.clip_norm:.4g}; {self.schedule.describe()}"

    # ----------------------------------------------------------------- release
    def release(
        self,
        update: Mapping[str, torch.Tensor],
        round_index: int,
        public_scores: Mapping[str, torch.Tensor] | None = None,
        global_change: float | None = None,
        job_id: str | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Dense released update (same keys/shapes, float32 or the original float dtype;
        unkept coordinates exactly 0) and its metadata. The kept flat indices are left
        in ``self.last_indices``."""
        sparse, metadata = self.release_sparse(update, round_index, public_scores, global_change, job_id)
        if sparse.indices.numel() == sparse.spec.numel:
            dense = unflatten_update(sparse.values, sparse.spec)
        else:
            dense = sparse.to_dense()
        return dense, metadata

    def release_sparse(
        self,
        update: Mapping[str, torch.Tensor],
        round_index: int,
        public_scores: Mapping[str, torch.Tensor] | None = None,
        global_change: float | None = None,
        job_id: str | None = None,
    ) -> tuple[SparseRelease, dict[str, Any]]:
        """Like :meth:`release` but returns only the kept coordinates."""
        cfg = self.config
        round_index = int(round_index)
        clip_norm = self.clip_norm
        keep_fraction = float(cfg.keep_fraction) if cfg.mode == "adpfl" else 1.0
        policy = cfg.mask_policy if keep_fraction < 1.0 else "none"
        covered = mask_is_covered(policy)
        # --- H5 (issue 12): 1. noise level, budget check and RESERVATION of the spend, in one
        # hold of the ledger file's lock, planned on the ledger as re-read from disk (other
        # jobs' entries included), saved before the update is touched (privacy/reservation.py)
        planned: dict[str, float] = {}

        def plan(ledger: PrivacyLedger) -> dict[str, Any]:
            if ledger.has_round(round_index, job_id):
                raise PrivacyError(
                    f"round {round_index} of job {job_id!r} was already released; a second noisy release would "
                    "cost privacy again (resend the cached release instead)"
                )
            z_eff = float(self.schedule.next_noise_multiplier(ledger, round_index, global_change))
            z_update = update_noise_multiplier_for(z_eff, cfg.clip_indicator_noise) if self.clipper else z_eff
            projected = ledger.projected_epsilon(z_eff, mechanism=self.mechanism)
            if ledger.target_epsilon is not None and projected > ledger.target_epsilon:
                raise BudgetExhausted(
                    f"releasing round {round_index} at noise multiplier {z_eff:.4g} would bring epsilon to "
                    f"{projected:.4f} > target_epsilon={ledger.target_epsilon} (delta={cfg.delta}, "
                    f"{ledger.accountant}); nothing was released"
                )
            planned.update(z_eff=z_eff, z_update=z_update)
            return dict(round=round_index, noise_multiplier=z_eff, update_noise_multiplier=z_update,
                        clip_norm=clip_norm, keep_fraction=keep_fraction, mask_policy=policy,
                        mask_covered=covered, mechanism=self.mechanism, job_id=job_id)

        entry = reserve_update_release(self.ledger, self.ledger_path, plan)
        z_eff, z_update = planned["z_eff"], planned["z_update"]
        try:  # steps 2-5 compute the release; on failure nothing left the site: roll back
            values, indices, spec, pre_norm, std, seeded, gen = self._compute_release(
                update, round_index, public_scores, clip_norm, keep_fraction, policy, z_update)
        except BaseException:
            rollback_update_release(self.ledger, self.ledger_path, entry[RESERVATION_KEY])
            raise
        # --- end H5
        # 7. adaptive clip step for the next round (noisy indicator, accounted in z_eff)
        if self.clipper is not None:
            self.clipper.update(pre_norm, gen)
        self.last_indices = indices
        metadata = {
            "mechanism": self.mechanism,
            "noise_multiplier": z_eff,
            "update_noise_multiplier": z_update,
            "noise_std" if self.mechanism == "gaussian" else "noise_scale": std,
            "clip_norm": clip_norm,
            "sensitivity": 2.0 * clip_norm,
            "keep_fraction": keep_fraction,
            "kept_coordinates": int(indices.numel()),
            "mask_policy": policy,
            "mask_covered": covered,
            "delta": cfg.delta,
            "epsilon_rdp": entry["epsilon_rdp"],
            "epsilon_prv": entry["epsilon_prv"],
            "target_epsilon": self.ledger.target_epsilon,
            "accountant": self.ledger.accountant,
            "round": round_index,
            "job_id": job_id,
            "seeded": seeded,
            "sensitivity_convention": SENSITIVITY_CONVENTION,
        }
        if self.mechanism == "laplace":
            metadata["noise_std"] = std * math.sqrt(2.0)
            metadata["epsilon_round"] = entry["epsilon_round"]
        return SparseRelease(indices=indices, values=values, spec=spec), metadata

    def _compute_release(self, update, round_index, public_scores, clip_norm, keep_fraction, policy, z_update):
        """Steps 2-5 of :meth:`release_sparse` (flatten, validate, mask, clip, float-safe noise);
        touches no state, so a failure here leaves nothing behind but the reservation."""
        cfg = self.config
        # 2. flatten and validate
        flat, spec = flatten_update(update)
        bad = first_nonfinite_key(flat, spec)
        if bad is not None:
            raise PrivacyError(f"update entry {bad!r} contains NaN or Inf; refusing to release")
        numel = spec.numel
        seeded = cfg.test_seed is not None
        seed = None if not seeded else (int(cfg.test_seed) * 1_000_003 + round_index) % (2**63)
        gen = make_generator(flat.device, seed)
        # 3. mask (drawn first, from fresh randomness or public scores only)
        if keep_fraction < 1.0:
            scores = None
            if policy == "topk_public":
                if public_scores is None:
                    raise PrivacyConfigError("mask_policy='topk_public' needs public_scores (e.g. the last global change)")
                missing = [k for k in spec.keys if k not in public_scores]
                if missing:
                    raise PrivacyConfigError(f"public_scores lacks update entries: {missing[:5]}")
                scores = torch.cat([public_scores[k].detach().reshape(-1).to(flat.device, torch.float32) for k in spec.keys])
            mask = sparsify_mask(
                numel, keep_fraction, policy, gen, public_scores=scores,
                private_values=flat if policy == "topk_private" else None,
            )
            indices = mask.nonzero().squeeze(1)
            kept = flat[indices]
        else:
            indices = torch.arange(numel, device=flat.device)
            kept = flat
        # 4. clip and 5. noise (float64 draw and sum, rounded to the wire dtype: issue 12)
        if self.mechanism == "gaussian":
            clipped, pre_norm = clip_l2(kept, clip_norm)
            std = z_update * 2.0 * clip_norm
            values = add_gaussian_noise(clipped, std, gen)
        else:
            clipped, pre_norm = clip_l1(kept, clip_norm)
            std = z_update * 2.0 * clip_norm  # Laplace scale b
            values = add_laplace_noise(clipped, std, gen)
        return values, indices, spec, pre_norm, std, seeded, gen

__all__ = ["MODES", "NOISE_TYPES", "PrivacyConfig", "PrivacyPipeline", "SparseRelease", "TEST_SEED_ENV"]
