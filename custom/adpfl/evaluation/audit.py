"""Empirical privacy audit of the update-level Gaussian release (a distinguishing game).

Game (replace-one neighbours, the sensitivity the ledger accounts): the site's update is
either ``u = C * e`` (dataset D) or ``u' = -C * e`` (dataset D'), two updates of norm C
in opposite directions, so ``||u - u'|| = 2C``, the worst case of the replace-one
sensitivity ``2C``. Each trial releases ``clip(u) + N(0, sigma^2 I)`` with the pipeline's
std formula ``sigma = z * 2 * C`` (or a deliberately wrong ``sigma / under_noise``). The
attacker's statistic is the projection of the release on the canary direction ``e``.

Lower bound: for a threshold ``t``, ``TPR = P[s > t | D]`` and ``FPR = P[s > t | D']``;
any (epsilon, delta)-DP mechanism satisfies ``TPR <= e^eps * FPR + delta`` and, for the
complementary test, ``1 - FPR <= e^eps * (1 - TPR) + delta``. With Clopper-Pearson
bounds at confidence ``1 - alpha`` (one-sided ``alpha/2`` each for the two rates):
``eps_lb = max(log((TPR_lo - delta) / FPR_hi), log((TNR_lo - delta) / FNR_hi))``.
The threshold and direction are chosen on the first half of the trials and the bound is
evaluated on the held-out second half, so the max over thresholds does not bias it.
The bound is capped by the trial count: with ``n`` held-out trials per side and zero false
positives, ``FPR_hi = 1 - (alpha/2)^(1/n)``, hence ``eps_lb <= log(n / log(2/alpha))``.

The mechanism is dimension-free for this statistic; releases are generated in full
(``dim`` coordinates, chunked) with :func:`adpfl.privacy.mechanisms.clip_l2` and
:func:`add_gaussian_noise`, and :func:`pipeline_projection_std` checks against
:class:`PrivacyPipeline.release` that the std formula used here is the one it applies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import beta

from adpfl.privacy.analysis import epsilon_rdp
from adpfl.privacy.mechanisms import add_gaussian_noise, clip_l2, make_generator

__all__ = [
    "AuditResult",
    "audit_gaussian_release",
    "clopper_pearson",
    "epsilon_lower_bound",
    "pipeline_projection_std",
    "trial_cap",
]


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval for k successes in n trials."""
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def trial_cap(n: int, alpha: float = 0.05) -> float:
    """Largest epsilon lower bound that ``n`` held-out trials per side can show."""
    return math.log(1.0 / clopper_pearson(0, n, alpha)[1])


def _eps(tp_lo: float, fp_hi: float, delta: float) -> float:
    if tp_lo - delta <= 0 or fp_hi <= 0:
        return 0.0
    return max(0.0, math.log((tp_lo - delta) / fp_hi))


def _best_threshold(s_pos: np.ndarray, s_neg: np.ndarray, delta: float) -> tuple[float, int]:
    """Threshold and direction (+1: predict D when s > t; -1: when s < t) maximising the
    point-estimate epsilon on these scores (guarded by a minimum count of 5 positives)."""
    pos, neg = np.sort(s_pos), np.sort(s_neg)
    n_p, n_n = len(pos), len(neg)
    cand = np.quantile(np.concatenate([pos, neg]), np.linspace(0.0, 1.0, 2001))
    best = (-np.inf, 0.0, 1)
    for direction in (1, -1):
        if direction == 1:
            tp = n_p - np.searchsorted(pos, cand, side="right")
            fp = n_n - np.searchsorted(neg, cand, side="right")
        else:
            tp = np.searchsorted(pos, cand, side="left")
            fp = np.searchsorted(neg, cand, side="left")
        tpr = tp / n_p
        fpr = np.maximum(fp, 1) / n_n  # pessimistic: avoid infinite point estimates
        ok = tp >= 5
        with np.errstate(divide="ignore", invalid="ignore"):
            val = np.where(ok & (tpr > delta), np.log(np.maximum(tpr - delta, 1e-300) / fpr), -np.inf)
        i = int(np.argmax(val))
        if val[i] > best[0]:
            best = (float(val[i]), float(cand[i]), direction)
    return best[1], best[2]


def epsilon_lower_bound(s_pos: np.ndarray, s_neg: np.ndarray, delta: float, alpha: float = 0.05) -> dict[str, Any]:
    """Held-out Clopper-Pearson epsilon lower bound from scores under D (``s_pos``) and
    D' (``s_neg``), both directions of the game (D vs D' and D' vs D)."""
    s_pos, s_neg = np.asarray(s_pos, float), np.asarray(s_neg, float)
    hp, hn = len(s_pos) // 2, len(s_neg) // 2
    best = {"epsilon_lb": 0.0}
    # direction of the claim: "D looks like D'" and the swapped roles
    for a, b, swap in ((s_pos, s_neg, False), (s_neg, s_pos, True)):
        t, d = _best_threshold(a[:hp if not swap else hn], b[:hn if not swap else hp], delta)
        ea, eb = a[hp if not swap else hn:], b[hn if not swap else hp:]
        tp = int(np.sum(ea > t)) if d == 1 else int(np.sum(ea < t))
        fp = int(np.sum(eb > t)) if d == 1 else int(np.sum(eb < t))
        tp_lo, _ = clopper_pearson(tp, len(ea), alpha)
        _, fp_hi = clopper_pearson(fp, len(eb), alpha)
        eps = _eps(tp_lo, fp_hi, delta)
        if eps >= best["epsilon_lb"]:
            best = {"epsilon_lb": eps, "threshold": t, "direction": d, "swapped": swap,
                    "tp": tp, "fp": fp, "n_eval": len(ea), "tpr_lo": tp_lo, "fpr_hi": fp_hi}
    return best


@dataclass
class AuditResult:
    noise_multiplier: float  # z the ledger accounts
    under_noise: float  # actual std = claimed std / under_noise
    clip_norm: float
    noise_std_claimed: float
    noise_std_used: float
    trials: int  # per side
    dim: int
    delta: float
    alpha: float
    epsilon_accounted: float  # ledger's claim for one release (RDP)
    epsilon_lb: float
    epsilon_cap: float  # best possible lower bound with these held-out trials
    detail: dict[str, Any]

    @property
    def violation(self) -> bool:
        return self.epsilon_lb > self.epsilon_accounted

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["violation"] = self.violation
        return d


def _release_projections(u: torch.Tensor, e: torch.Tensor, clip_norm: float, std: float, trials: int,
                         gen: torch.Generator, chunk: int) -> np.ndarray:
    clipped, _ = clip_l2(u, clip_norm)
    out = []
    done = 0
    while done < trials:
        m = min(chunk, trials - done)
        rel = add_gaussian_noise(clipped.expand(m, -1).contiguous(), std, gen)  # (m, dim) releases
        out.append((rel @ e).numpy())
        done += m
    return np.concatenate(out)


def audit_gaussian_release(
    noise_multiplier: float,
    clip_norm: float = 1.0,
    trials: int = 200_000,
    delta: float = 1e-5,
    under_noise: float = 1.0,
    dim: int = 64,
    alpha: float = 0.05,
    seed: int | None = None,
    chunk: int = 50_000,
) -> AuditResult:
    """Run the distinguishing game ``trials`` times per side on one Gaussian release at
    ``noise_multiplier`` (std ``z * 2 * clip_norm``, divided by ``under_noise`` to simulate
    a broken mechanism) and return the empirical lower bound next to the accounted epsilon
    of one release (Opacus RDP, sample rate 1, as the ledger records it)."""
    gen = make_generator("cpu", seed)
    e = torch.randn(dim, generator=gen, dtype=torch.float64)
    e = e / torch.linalg.vector_norm(e)
    u_d = clip_norm * e  # an update of norm C (already within the clip)
    u_dp = -clip_norm * e  # its replace-one neighbour: the canary, opposite direction
    std_claimed = float(noise_multiplier) * 2.0 * float(clip_norm)
    std_used = std_claimed / float(under_noise)
    s_pos = _release_projections(u_d, e, clip_norm, std_used, trials, gen, chunk)
    s_neg = _release_projections(u_dp, e, clip_norm, std_used, trials, gen, chunk)
    lb = epsilon_lower_bound(s_pos, s_neg, delta, alpha)
    return AuditResult(
        noise_multiplier=float(noise_multiplier),
        under_noise=float(under_noise),
        clip_norm=float(clip_norm),
        noise_std_claimed=std_claimed,
        noise_std_used=std_used,
        trials=int(trials),
        dim=int(dim),
        delta=float(delta),
        alpha=float(alpha),
        epsilon_accounted=float(epsilon_rdp([float(noise_multiplier)], delta)),
        epsilon_lb=float(lb["epsilon_lb"]),
        epsilon_cap=trial_cap(trials - trials // 2, alpha),
        detail=lb,
    )


def pipeline_projection_std(noise_multiplier: float, clip_norm: float = 1.0, releases: int = 300, dim: int = 1000,
                            delta: float = 1e-5) -> dict[str, float]:
    """Release a norm-C update ``releases`` times through :class:`PrivacyPipeline` (dpfl
    mode, OS-entropy noise, a fresh ledger per release) and return the empirical std of
    the projection on the update's direction next to ``z * 2 * C`` (the formula the audit
    uses) and the pipeline's reported ``noise_std``."""
    from adpfl.privacy.config import PrivacyConfig
    from adpfl.privacy.ledger import PrivacyLedger
    from adpfl.privacy.pipeline import PrivacyPipeline

    e = torch.randn(dim, dtype=torch.float64)
    e = (e / torch.linalg.vector_norm(e)).float()
    cfg = PrivacyConfig(mode="dpfl", noise_multiplier=float(noise_multiplier), clip_norm=float(clip_norm),
                        delta=delta, track_prv=False)
    proj, reported = [], float("nan")
    for r in range(int(releases)):
        pipe = PrivacyPipeline(cfg, PrivacyLedger(delta=delta, track_prv=False))
        rel, meta = pipe.release({"w": clip_norm * e}, round_index=r)
        proj.append(float(rel["w"].double() @ e.double()))
        reported = float(meta["noise_std"])
    proj_arr = np.asarray(proj)
    return {"empirical_std": float(proj_arr.std(ddof=1)), "mean": float(proj_arr.mean()),
            "formula_std": float(noise_multiplier) * 2.0 * float(clip_norm), "reported_noise_std": reported}
