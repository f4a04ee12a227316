"""Noise schedules: which (effective) noise multiplier ``z_t`` the next release uses.

:class:`AdaptiveNoiseSchedule` re-plans before every release from the ledger:

1. ``R = max(1, planned_rounds - round_index)`` rounds remain, this one included
   (``round_index`` is 0-based, as FLARE's current round).
2. ``z_even``: the constant multiplier that spends exactly the remaining budget
   ``target_epsilon - epsilon(ledger)`` over the ``R`` rounds (bisection on the
   accountant, history included).
3. Progress from PUBLIC signals only: ``s_t`` = the relative change of the global model
   ``||w_t - w_{t-1}|| / ||w_t||`` (the site receives both models). With
   ``r_t = s_t / max(s_0..s_t)`` in [0, 1] (1 while the model changes as fast as it ever
   did, towards 0 once it settles). Without ``global_change`` the round index gives
   the proxy ``r_t = (R - 1) / (planned_rounds - 1)`` (fraction of the plan left).
   The noise ratio of this round to the forecast future rounds is
   ``f_t = 1 + (max_factor - 1) * r_t``: the plan assumes the model will settle, so it
   reserves budget for later rounds while the model still changes fast (large,
   imprecise updates get more noise) and spends evenly once it has settled.
   ``z_t`` solves ``epsilon(ledger + [z_t] + [z_t / f_t] * (R - 1)) = target_epsilon``.
   This round is always the noisiest of its own plan, so ``z_t >= z_even``: the
   schedule never spends more than the even share of what is left (no greedy
   front-loading); the last planned round spends the remainder.
4. Clamps and feasibility: ``z_t >= min_factor * z_plan`` (floor on how little noise a
   round may get; ``z_plan`` spends the budget evenly over ``planned_rounds``) and
   ``z_t <= z_max`` (default ``max_factor * z_plan``). Feasibility is checked before each
   release: ``epsilon(ledger + [z_t] + [z_max] * (R - 1)) <= target_epsilon`` must hold
   (it does whenever ``z_t >= z_even``), so the budget never runs out before
   ``planned_rounds``; if even ``[z_max] * R`` overshoots, :class:`BudgetExhausted`.

The multipliers are *effective* ones (what the ledger accounts); the pipeline converts
them for the adaptive clipper's indicator. Gaussian only; Laplace entries already in
the ledger are subtracted from the budget. With ``accountant="prv"`` every bisection
step runs the PRV accountant (seconds per release); "rdp" is fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .analysis import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, RdpSearch, calibrate, epsilon_prv
from .config import PrivacyConfig, default_of
from .errors import BudgetExhausted, PrivacyConfigError
from .ledger import PrivacyLedger

_BUDGET_MARGIN = 1e-9  # relative; keeps float round-off of the accountant on the safe side


def _smallest_feasible(fn: Callable[[float], float], budget: float, hi: float, rtol: float) -> float:
    """Smallest z (to relative tolerance) with fn(z) <= budget, fn decreasing, fn(hi) <= budget."""
    return calibrate(fn, budget, upper=hi, rtol=rtol)


class FixedNoise:
    """Constant multiplier (DP-FL baseline); same interface as the adaptive schedule."""

    def __init__(self, noise_multiplier: float):
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise PrivacyConfigError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
        self.noise_multiplier = float(noise_multiplier)
        self.z_max = self.noise_multiplier

    def next_noise_multiplier(
        self, ledger: PrivacyLedger, round_index: int, global_change: float | None = None
    ) -> float:
        return self.noise_multiplier

    def describe(self) -> str:
        return f"fixed noise multiplier z={self.noise_multiplier:.4g}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # nothing adaptive to restore; the config's z stays authoritative


class AdaptiveNoiseSchedule:
    """Adaptive ``z_t`` under a fixed total budget (see module docstring)."""

    def __init__(
        self,
        target_epsilon: float,
        delta: float,
        planned_rounds: int,
        accountant: str = "rdp",
        min_factor: float = default_of(PrivacyConfig, "noise_min_factor"),
        max_factor: float = default_of(PrivacyConfig, "noise_max_factor"),
        z_max: float | None = None,
        rtol: float = 1e-4,
    ):
        if accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise PrivacyConfigError(f"target_epsilon must be positive and finite, got {target_epsilon}")
        if not (0.0 < delta < 1.0):
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
        if int(planned_rounds) != planned_rounds or planned_rounds < 1:
            raise PrivacyConfigError(f"planned_rounds must be a positive integer, got {planned_rounds}")
        if not (0.0 < min_factor <= 1.0):
            raise PrivacyConfigError(f"noise_min_factor must be in (0, 1], got {min_factor}")
        if not (max_factor >= 1.0 and math.isfinite(max_factor)):
            raise PrivacyConfigError(f"noise_max_factor must be >= 1, got {max_factor}")
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.planned_rounds = int(planned_rounds)
        self.accountant = accountant
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.rtol = float(rtol)
        empty = PrivacyLedger(delta=self.delta, track_prv=False)
        budget = self.target_epsilon * (1 - _BUDGET_MARGIN)
        fn_plan = self._eps_function(empty)
        cap = MAX_NOISE_MULTIPLIER
        if fn_plan([(cap, self.planned_rounds)]) > budget:
            raise PrivacyConfigError(
                f"target_epsilon={target_epsilon} is unreachable in planned_rounds={planned_rounds} at "
                f"delta={delta} with noise multiplier <= {cap:g} ({accountant})"
            )
        self.z_plan = _smallest_feasible(lambda z: fn_plan([(z, self.planned_rounds)]), budget, cap, self.rtol)
        self.z_max = float(z_max) if z_max is not None else self.max_factor * self.z_plan
        if not self.z_max >= self.z_plan:
            raise PrivacyConfigError(f"z_max={self.z_max} is below the even plan's multiplier {self.z_plan:.4g}")
        self._changes: dict[int, float] = {}
        self._last: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def _eps_function(self, ledger: PrivacyLedger) -> Callable[[list[tuple[float, int]]], float]:
        history = ledger.gaussian_multipliers()
        laplace = ledger.laplace_epsilon()
        if self.accountant == "rdp":
            search = RdpSearch(history, self.delta)
            return lambda extra: search.epsilon(extra) + laplace

        def prv(extra: list[tuple[float, int]]) -> float:
            seq = list(history)
            for z, n in extra:
                seq.extend([z] * n)
            return epsilon_prv(seq, self.delta) + laplace

        return prv

    def _progress_factor(
        self, round_index: int, global_change: float | None, remaining_rounds: int
    ) -> tuple[float, str]:
        """``f_t = 1 + (max_factor - 1) * r_t`` (see module docstring)."""
        if global_change is not None:
            g = float(global_change)
            if not (g >= 0 and math.isfinite(g)):
                raise PrivacyConfigError(f"global_change must be finite and >= 0, got {global_change}")
            self._changes[int(round_index)] = g
            ref = max(v for r, v in self._changes.items() if r <= round_index)
            ratio = g / ref if ref > 0 else 1.0
            source = "global_change"
        else:
            ratio = (remaining_rounds - 1) / max(1, self.planned_rounds - 1)
            source = "round_index"
        ratio = min(1.0, max(0.0, ratio))
        return 1.0 + (self.max_factor - 1.0) * ratio, source

    # ---------------------------------------------------------------- interface
    def next_noise_multiplier(
        self, ledger: PrivacyLedger, round_index: int, global_change: float | None = None
    ) -> float:
        """Effective multiplier for the release of round ``round_index`` (0-based)."""
        if abs(ledger.delta - self.delta) > 0:
            raise PrivacyConfigError(f"ledger delta={ledger.delta} differs from the schedule's delta={self.delta}")
        remaining_rounds = max(1, self.planned_rounds - int(round_index))
        budget = self.target_epsilon * (1 - _BUDGET_MARGIN)
        fn = self._eps_function(ledger)
        if fn([(self.z_max, remaining_rounds)]) > budget:
            raise BudgetExhausted(
                f"privacy budget exhausted: epsilon so far {fn([]):.4f}; even z_max={self.z_max:.4g} for the "
                f"{remaining_rounds} remaining round(s) would exceed target_epsilon={self.target_epsilon} "
                f"(delta={self.delta}, {self.accountant})"
            )
        z_even = _smallest_feasible(lambda z: fn([(z, remaining_rounds)]), budget, self.z_max, self.rtol)
        z_feasible = _smallest_feasible(
            lambda z: fn([(z, 1), (self.z_max, remaining_rounds - 1)]), budget, self.z_max, self.rtol
        )
        factor, source = self._progress_factor(round_index, global_change, remaining_rounds)
        if remaining_rounds > 1 and factor > 1.0:
            z_planned = _smallest_feasible(
                lambda z: fn([(z, 1), (z / factor, remaining_rounds - 1)]), budget, self.z_max * factor, self.rtol
            )
        else:
            z_planned = z_even
        z = min(max(z_planned, z_even, z_feasible, self.min_factor * self.z_plan), self.z_max)
        self._last = {
            "round": int(round_index),
            "remaining_rounds": remaining_rounds,
            "epsilon_spent": fn([]),
            "z_even": z_even,
            "z_feasible": z_feasible,
            "progress_factor": factor,
            "z_planned": z_planned,
            "progress_source": source,
            "z": z,
        }
        return float(z)

    def describe(self) -> str:
        head = (
            f"adaptive noise: target_epsilon={self.target_epsilon} delta={self.delta} "
            f"planned_rounds={self.planned_rounds} ({self.accountant}), z_plan={self.z_plan:.4g}, "
            f"z_max={self.z_max:.4g}, max_factor={self.max_factor}, floor {self.min_factor} * z_plan"
        )
        if not self._last:
            return head
        d = self._last
        return (
            f"{head}; round {d['round']}: spent {d['epsilon_spent']:.4f}, {d['remaining_rounds']} round(s) left, "
            f"z_even={d['z_even']:.4g}, factor={d['progress_factor']:.3f} ({d['progress_source']}), "
            f"z_planned={d['z_planned']:.4g}, z_feasible={d['z_feasible']:.4g} -> z={d['z']:.4g}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "global_changes": {str(k): v for k, v in self._changes.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._changes = {int(k): float(v) for k, v in state.get("global_changes", {}).items()}


__all__ = ["AdaptiveNoiseSchedule", "FixedNoise"]
