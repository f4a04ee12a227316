"""End-to-end audit of record-level DP-SGD as shipped: the real :class:`DPSGDTrainer`.

One-run auditing with many canaries (Steinke, Nasr and Jagielski 2023, "Privacy auditing
with one (1) training run"), in the white-box gradient-canary threat model (Nasr et al.
2021): each canary is a record whose per-sample gradient is a Dirac spike of height
``canary_norm`` on its own coordinate of the UNet's largest weight tensor. Each of ``m``
canaries is independently put in the training set with probability 1/2; an included
canary joins every optimizer step with the trainer's Poisson rate ``q`` (drawn here, as
the trainer's sampler draws the real records). The canary rows are appended to Opacus'
per-sample gradients *before* the optimizer clips them, so the shipped clipping, float64
noise, expected-batch scaling, SGD step and RDP accounting all act on them. The score of a
canary is how far the trained model moved down its coordinate (``theta_0 - theta_1``).

Lower bound: guess "in" for the ``k`` highest scores (``k`` fixed before the run); with
``v`` correct guesses, any mechanism that is (eps, delta)-DP for each canary gives
``P[v correct] <= P[Binomial(k, e^eps / (1 + e^eps)) >= v] + 2 m delta`` (their
Theorem 5.2), so ``eps_lb`` is the largest ``eps`` whose tail stays below ``alpha - 2 m
delta``. Unit: record-level DP (one training record), at the trainer's delta, against the
trainer's own Opacus RDP epsilon for the steps it took. Several independent runs (each
with its own canaries) pool into one guess set: each canary is still in only one run.

Broken configurations (noise lowered behind the accountant, clipping skipped) are injected
by the test or bench harness by monkeypatching, never through a trainer setting.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import torch
from scipy.stats import binom

import adpfl.training.dpsgd as dpsgd_module
from adpfl.privacy.config import DPSGDConfig
from adpfl.tasks.base import get_task
from adpfl.training.dp_noise import RecordDPOptimizer
from adpfl.training.loop import TrainConfig

__all__ = ["audit_dpsgd_trainer", "one_run_epsilon_lower_bound"]


def one_run_epsilon_lower_bound(correct: int, guesses: int, canaries: int, delta: float,
                                alpha: float = 0.05) -> float:
    """Largest eps with ``P[Binom(guesses, e^eps/(1+e^eps)) >= correct] + 2*canaries*delta
    <= alpha`` (0 when even eps = 0 is not rejected)."""
    budget = alpha - 2.0 * canaries * delta
    if budget <= 0 or guesses == 0:
        return 0.0

    def tail(eps: float) -> float:
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(correct - 1, guesses, p))

    if tail(0.0) > budget:
        return 0.0
    lo, hi = 0.0, 50.0
    if tail(hi) <= budget:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) <= budget else (lo, mid)
    return lo


def _canary_optimizer(param_index: int, coords: torch.Tensor, height: float, q: float, gen: torch.Generator):
    """A RecordDPOptimizer subclass (the trainer's optimizer) that appends one Dirac gradient row per included
    canary (each joining the step with probability ``q``) before Opacus clips."""

    class CanaryDPOptimizer(RecordDPOptimizer):
        def clip_and_accumulate(self):
            joined = coords[torch.rand(len(coords), generator=gen) < q]
            if len(joined):
                for i, p in enumerate(self.params):
                    rows = torch.zeros((len(joined), *p.shape), dtype=p.grad_sample.dtype)
                    if i == param_index:
                        rows.view(len(joined), -1)[torch.arange(len(joined)), joined] = height
                    p.grad_sample = torch.cat([p.grad_sample, rows.to(p.grad_sample.device)])
            super().clip_and_accumulate()

    return CanaryDPOptimizer


@contextlib.contextmanager
def _optimizer_class(cls):
    saved = dpsgd_module.RecordDPOptimizer
    dpsgd_module.RecordDPOptimizer = cls
    try:
        yield
    finally:
        dpsgd_module.RecordDPOptimizer = saved


@contextlib.contextmanager
def _seeded_trainer_noise(seed: int | None):
    if seed is None:
        yield
        return
    saved = dpsgd_module.make_generator
    counter = iter(range(seed, seed + 10**6))
    dpsgd_module.make_generator = lambda device, s=None: saved(device, next(counter))
    try:
        yield
    finally:
        dpsgd_module.make_generator = saved


def audit_dpsgd_trainer(
    datalist: dict,
    noise_multiplier: float = 2.0,
    max_grad_norm: float = 1.0,
    batch_size: int = 40,
    steps: int = 1,
    image_size: int = 16,
    canaries_per_run: int = 200,
    runs: int = 5,
    guesses: int = 100,
    canary_norm: float = 10.0,
    delta: float = 1e-5,
    alpha: float = 0.05,
    seed: int = 0,
    noise_seed: int | None = None,
) -> dict[str, Any]:
    """Train ``runs`` rounds of ``steps`` DP-SGD steps (SGD, learning rate 1) with the real
    trainer on ``datalist``'s skin2d training records, each round from the same initial
    UNet with ``canaries_per_run`` fresh canaries (half in, on average), then bound epsilon
    from the top-``guesses`` canary scores over all runs. Returns the bound, the trainer's
    claimed epsilon for one round (Opacus RDP at ``delta``), ``q``, ``n`` and timings.
    ``noise_seed`` (tests only) seeds the trainer's sampling and noise generators (None: the
    production path, OS entropy every round)."""
    task = get_task("skin2d")
    cfg = TrainConfig(local_epochs=1, batch_size=batch_size, learning_rate=1.0, max_steps_per_round=steps,
                      image_size=image_size, device="cpu", amp=False)
    dp = DPSGDConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta, optimizer="sgd")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = dpsgd_module.dpsgd_network(task)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    pidx = max(range(len(params)), key=lambda i: params[i].numel())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    in_all, score_all = [], []
    claimed, q, n, t0 = float("nan"), float("nan"), 0, time.perf_counter()
    for _run in range(int(runs)):
        coords = torch.randperm(params[pidx].numel(), generator=gen)[:canaries_per_run]
        member = torch.rand(canaries_per_run, generator=gen) < 0.5
        trainer = dpsgd_module.DPSGDTrainer(task, datalist, cfg, dp)
        q, n = trainer.sample_rate, trainer.num_train
        model.load_state_dict(theta0)
        with _optimizer_class(_canary_optimizer(pidx, coords[member], canary_norm, q, gen)), \
                _seeded_trainer_noise(None if noise_seed is None else int(noise_seed) + 1000 * _run):
            out = trainer.train(model)
        claimed = float(out["epsilon"])
        moved = (theta0[names[pidx]] - model.state_dict()[names[pidx]]).reshape(-1)[coords]
        in_all.append(member.numpy())
        score_all.append(moved.detach().double().numpy())
    member = np.concatenate(in_all)
    score = np.concatenate(score_all)
    top = np.argsort(-score)[: int(guesses)]
    correct = int(member[top].sum())
    m = len(member)
    return {
        "epsilon_lb": one_run_epsilon_lower_bound(correct, len(top), m, delta, alpha),
        "epsilon_claimed": claimed,
        "accountant": "Opacus RDP",
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "sample_rate": q,
        "n_train": n,
        "steps": steps,
        "canaries": m,
        "canaries_in": int(member.sum()),
        "guesses": len(top),
        "correct": correct,
        "epsilon_cap": one_run_epsilon_lower_bound(len(top), len(top), m, delta, alpha),
        "seconds": time.perf_counter() - t0,
    }
