"""The site's privacy pipeline on an outgoing model update (sparsify -> clip -> noise).

Modes (same code, different settings):

* ``"dpfl"``: no sparsification, fixed clip ``C``, fixed multiplier ``z`` (given, or
  calibrated from ``target_epsilon`` over ``planned_rounds``).
* ``"adpfl"``: sparsify (``keep_fraction``, ``mask_policy``), adaptive clip (Andrew et
  al.; ``clip_learning_rate=0`` keeps it fixed) and adaptive noise (:class:`AdaptiveNoiseSchedule`).

Conventions: replace-one sensitivity ``2 * C_t``; noise std ``sigma_t = z_u * 2 * C_t``
on every kept coordinate (``z_u`` is the update's own multiplier; the ledger accounts
the effective ``z_t`` that also covers the adaptive clipper's noisy indicator);
unkept coordinates are exactly 0 in the release. Laplace (pure DP, L1 clip, scale
``b = z_u * 2 * C``, ``epsilon_round = 1 / z``): fixed ``z`` (``planned_rounds /
target_epsilon``); in adpfl the clip ``C_t`` adapts (L1 norms, Laplace indicator,
:mod:`adpfl.privacy.adaptive`), so the noise scale follows the percentile clip threshold.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .adaptive import AdaptiveClipper, update_noise_multiplier_for
from .config import PrivacyConfig
from .errors import BudgetExhausted, PrivacyConfigError, PrivacyError
from .ledger import PrivacyLedger
from .mechanisms import (
    FlatSpec,
    GeneratorFactory,
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
from .metadata import NO_MASK
from .reservation import RESERVATION_KEY, reserve_update_release, rollback_update_release
from .schedule import AdaptiveNoiseSchedule, FixedNoise

SENSITIVITY_CONVENTION = "replace-one, sensitivity = 2 * clip_norm"


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

    def __init__(
        self,
        config: PrivacyConfig,
        ledger: PrivacyLedger,
        ledger_path: str | os.PathLike | None = None,
        generator_factory: GeneratorFactory | None = None,
    ):
        """Args:
            config: the settings (validated here).
            ledger: the site's update-level ledger; every release is recorded in it.
            ledger_path: where the ledger is saved after each release (None: not saved).
            generator_factory: ``(device, round_index) -> torch.Generator`` for the mask and
                noise of a release. None (production): a fresh generator seeded from the OS
                entropy per release. Tests and experiments inject fixed noise here (e.g.
                :func:`adpfl.privacy.mechanisms.seeded_generators`); such releases carry
                ``seeded=True`` in their metadata. There is no job setting for it.
        """
        self.config = config.validate()
        self.generator_factory = generator_factory
        self.ledger = ledger
        self.ledger_path = None if ledger_path is None else os.fspath(ledger_path)
        if abs(ledger.delta - config.delta) > 0:
            raise PrivacyConfigError(f"delta={config.delta} differs from the privacy ledger's delta={ledger.delta}")
        if config.target_epsilon is not None:
            ledger.target_epsilon = float(config.target_epsilon)
        ledger.accountant = config.accountant
        ledger.track_prv = config.track_prv
        self.mechanism = config.noise_type
        if config.mode == "dpfl" or self.mechanism == "laplace":  # Laplace: even pure-DP spend per round
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
                learning_rate=config.clip_learning_rate,
                indicator_noise_std=config.clip_indicator_noise,
                min_clip_norm=config.clip_min,
                max_clip_norm=config.clip_max,
                noise=self.mechanism,
            )
            if not config.clip_indicator_noise > self.schedule.z_max:
                raise PrivacyConfigError(
                    f"clip_indicator_noise={config.clip_indicator_noise} must exceed the largest effective noise "
                    f"multiplier the schedule may use ({self.schedule.z_max:.4g}); recommended >= "
                    f"{3 * self.schedule.z_max:.3g}, or clip_learning_rate=0 for a fixed clip"
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
            raise PrivacyConfigError(
                f"saved privacy state is for mode={state.get('mode')!r}, config has {self.config.mode!r}"
            )
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
        if self.ledger.has_round(round_index, job_id):
            raise PrivacyError(
                f"round {round_index} of job {job_id!r} was already released; a second noisy release would cost "
                "privacy again (resend the cached release instead)"
            )
        # 1. noise level and budget check, before touching the update
        clip_norm = self.clip_norm
        keep_fraction = float(cfg.keep_fraction) if cfg.mode == "adpfl" else 1.0
        policy = cfg.mask_policy if keep_fraction < 1.0 else NO_MASK
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
            z_update = (update_noise_multiplier_for(z_eff, cfg.clip_indicator_noise, self.mechanism)
                        if self.clipper else z_eff)
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
        # 2. flatten and validate
        flat, spec = flatten_update(update)
        bad = first_nonfinite_key(flat, spec)
        if bad is not None:
            raise PrivacyError(f"update entry {bad!r} contains NaN or Inf; refusing to release")
        numel = spec.numel
        seeded = self.generator_factory is not None
        gen = self.generator_factory(flat.device, round_index) if seeded else make_generator(flat.device)
        # 3. mask (drawn first, from fresh randomness or public scores only)
        if keep_fraction < 1.0:
            scores = None
            if policy == "topk_public":
                if public_scores is None:
                    raise PrivacyConfigError(
                        "mask_policy='topk_public' needs public_scores (e.g. the last global change)"
                    )
                missing = [k for k in spec.keys if k not in public_scores]
                if missing:
                    raise PrivacyConfigError(f"public_scores lacks update entries: {missing[:5]}")
                scores = torch.cat(
                    [public_scores[k].detach().reshape(-1).to(flat.device, torch.float32) for k in spec.keys]
                )
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

__all__ = ["PrivacyPipeline", "SENSITIVITY_CONVENTION", "SparseRelease"]
