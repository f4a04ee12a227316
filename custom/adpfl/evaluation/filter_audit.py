"""End-to-end audit of the update-level release path as shipped: the FLARE result filter.

Unlike :mod:`adpfl.evaluation.audit` (the bare Gaussian mechanism), every trial here is a
real :meth:`adpfl.flare.privacy_filter.ADPFilter.process` call with a FLARE ``FLContext``:
a WEIGHT_DIFF Shareable goes in, the filter reserves the spend in its ledger on disk
(a temporary folder), sparsifies (ADP-FL), clips, noises, and the reply leaves as FLARE
would send it (dense, or in the sparse wire format, decoded here as the server does).

Game (replace-one neighbours): in even rounds the site's update is ``u = a * e`` (dataset
D), in odd rounds ``u' = -a * e`` (D'), ``e`` a fixed unit canary direction over ``dim``
coordinates, ``a = canary_norm`` (far above the clip, so that intact clipping cuts the
kept part of both to norm ``C_t``: distance ``2 C_t``, the accounted sensitivity). With
``align_public=True`` the context carries fixed public scores (as the executor hands the
last global change to the filter) and ``e`` lives on the coordinates they rank highest, so
a ``topk_public`` mask keeps all of it: the canary an attacker who sees the public global
models would plant.

Statistic (the attacker sees the release and its public metadata): the kept coordinates
(unkept ones are exactly 0 on the wire), ``y_t = <release_kept, e_kept> / ||e_kept||``,
which is ``+-m_t + N(0, sigma_t^2)`` on the intact path, ``m_t = min(C_t, a ||e_kept||)``,
and the log-likelihood ratio of the two sides, ``s_t = 2 m_t y_t / sigma_t^2`` with ``C_t``
and ``sigma_t`` (``clip_norm``, ``noise_std``) read from the release's metadata. This is
the optimal test of every single release (Neyman-Pearson) and weighs releases by their
own noise: the adaptive schedule changes ``z_t`` from release to release (by up to its
``noise_max_factor``), which blurs the plain projection ``<release, e>`` (kept as the
``projection`` diagnostic, not used for the bound); a random mask also scales the
projection by ``||e_kept||``. Each release is one run of the mechanism, so the held-out
Clopper-Pearson bound of :func:`adpfl.evaluation.audit.epsilon_lower_bound` over the
releases is a lower bound on the epsilon of **one release**, which is compared with the
per-release epsilon of the smallest noise multiplier the filter reported (Opacus RDP,
sample rate 1, at the filter's delta): every release is at least that private, so the
mixture is too. Unit: update-level DP (the site's whole update of one round).

Broken configurations are injected by the caller (the test or bench harness monkeypatches
:mod:`adpfl.privacy.pipeline`), never through a filter setting; the audit must then report
a lower bound above the claim.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from adpfl.evaluation.audit import epsilon_lower_bound, trial_cap
from adpfl.flare.privacy_filter import ADPFilter
from adpfl.flare.sparse import decode_sparse, is_sparse
from adpfl.privacy.analysis import epsilon_rdp
from adpfl.privacy.ledger import PrivacyLedger
from adpfl.privacy.mechanisms import keep_count, seeded_generators
from adpfl.privacy.metadata import PRIVACY_META_KEY
from adpfl.privacy.public_signals import PUBLIC_INFO_PROP

__all__ = ["audit_filter", "site_context"]

CANARY_KEY = "canary.weight"


def site_context(site: str = "site-1", job: str = "audit-job") -> FLContext:
    """A bare FLContext naming the site and job, as the filter reads them (no engine:
    the ledger folder comes from the filter's ``ledger_dir``)."""
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=True)
    return ctx


def _shareable(update: dict[str, np.ndarray], round_index: int):
    s = DXO(data_kind=DataKind.WEIGHT_DIFF, data=update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1}).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_index)
    return s


def _canary(dim: int, keep_fraction: float, align_public: bool, rng: np.random.Generator):
    """Unit canary direction and the public info the context carries (None: no public scores)."""
    if not align_public:
        e = rng.standard_normal(dim)
        return e / np.linalg.norm(e), None
    scores = rng.random(dim).astype(np.float32) + 0.01  # fixed public scores, no ties
    top = np.argsort(-scores)[: keep_count(dim, keep_fraction)]
    e = np.zeros(dim)
    e[top] = rng.standard_normal(len(top))
    public = {"round": 0, "global_change": None, "public_scores": {CANARY_KEY: scores}}
    return e / np.linalg.norm(e), public


def audit_filter(
    filter_args: dict[str, Any],
    releases_per_side: int = 1000,
    canary_norm: float = 20.0,
    dim: int = 64,
    alpha: float = 0.05,
    seed: int = 0,
    ledger_dir: str | None = None,
    releases_per_filter: int = 100,
    noise_seed: int | None = None,
    align_public: bool = False,
) -> dict[str, Any]:
    """Run ``2 * releases_per_side`` releases of ``ADPFilter(**filter_args)`` (ledgers under
    ``ledger_dir`` or a fresh temporary folder) on the canary game of the module docstring.
    A new filter with a new ledger (its own site name) takes over every
    ``releases_per_filter`` releases: the ledger file is rewritten at every release, so one
    ledger of thousands of entries would make the audit quadratic in time.

    Returns the empirical lower bound (``epsilon_lb``, 95 % CP held-out, likelihood-ratio
    statistic), the same bound from the plain projection on ``e`` (``epsilon_lb_projection``,
    a diagnostic), the per-release claim (``epsilon_claimed``: the single-release epsilon of
    the smallest multiplier the filter reported), the trial cap, the ledger's entry count
    and cumulative epsilon as stored on disk (summed over the ledgers; the largest
    cumulative epsilon), and the wall time. ``noise_seed`` (tests only) injects fixed noise
    through the filter's generator factory, as ``tests/test_privacy_filter.py`` does
    (releases are then flagged ``seeded``); None: the production path, OS entropy at every
    release. Raises RuntimeError if any release is refused.
    """
    rng = np.random.default_rng(seed)
    keep = float(filter_args.get("keep_fraction", 1.0)) if filter_args.get("mode") == "adpfl" else 1.0
    e, public = _canary(int(dim), keep, bool(align_public), rng)
    own_tmp = tempfile.TemporaryDirectory() if ledger_dir is None else None
    folder = own_tmp.name if own_tmp is not None else ledger_dir
    try:
        args = dict(filter_args, ledger_dir=folder, device="cpu", track_prv=False)
        llr = {0: [], 1: []}
        proj = {0: [], 1: []}
        zs, deltas, ledgers, kept_norms = [], set(), [], []
        t0 = time.perf_counter()
        for r in range(2 * int(releases_per_side)):
            if r % int(releases_per_filter) == 0:
                flt = ADPFilter(**args)
                if noise_seed is not None:
                    # one stream per filter and round (rounds restart at 0 in every filter)
                    flt._generator_factory = seeded_generators(int(noise_seed) * 100_003 + len(ledgers))
                ctx = site_context(site=f"site-{len(ledgers) + 1}")
                ledgers.append(flt)
            if public is not None:
                ctx.set_prop(PUBLIC_INFO_PROP, public, private=True, sticky=False)
            side = r % 2
            u = (canary_norm if side == 0 else -canary_norm) * e
            # each filter has its own ledger and plans its own rounds: rounds count from 0 per filter
            reply = flt.process(_shareable({CANARY_KEY: u.astype(np.float32)}, r % int(releases_per_filter)), ctx)
            if reply.get_return_code() != ReturnCode.OK:
                raise RuntimeError(f"the filter refused release {r} (return code {reply.get_return_code()})")
            dxo = from_shareable(reply)
            data = decode_sparse(dxo.data) if is_sparse(dxo.data) else dxo.data
            released = np.asarray(data[CANARY_KEY], dtype=np.float64).reshape(-1)
            meta = dxo.get_meta_prop(PRIVACY_META_KEY)
            kept = released != 0.0  # unkept coordinates are exactly 0 in the release
            e_kept = np.where(kept, e, 0.0)
            norm = float(np.linalg.norm(e_kept))
            y = float(released @ e_kept) / norm if norm > 0 else 0.0
            # the canary's kept part after clipping has norm min(C_t, a ||e_kept||) (an adaptive
            # clip may grow past it); its mean under D / D' is +- that along e_kept
            mean = min(float(meta["clip_norm"]), canary_norm * norm)
            llr[side].append(2.0 * mean * y / float(meta["noise_std"]) ** 2)
            proj[side].append(float(released @ e))
            kept_norms.append(norm)
            zs.append(float(meta["noise_multiplier"]))
            deltas.add(float(meta["delta"]))
        seconds = time.perf_counter() - t0
        (delta,) = deltas
        stored = [PrivacyLedger.load(f._ledger_path) for f in ledgers]
        lb = epsilon_lower_bound(np.asarray(llr[0]), np.asarray(llr[1]), delta, alpha)
        lb_proj = epsilon_lower_bound(np.asarray(proj[0]), np.asarray(proj[1]), delta, alpha)
        return {
            "mode": args.get("mode"),
            "releases": 2 * int(releases_per_side),
            "noise_multiplier_min": min(zs),
            "noise_multiplier_max": max(zs),
            "epsilon_claimed": float(epsilon_rdp([min(zs)], delta)),
            "epsilon_lb": float(lb["epsilon_lb"]),
            "epsilon_lb_projection": float(lb_proj["epsilon_lb"]),
            "epsilon_cap": trial_cap(int(releases_per_side) - int(releases_per_side) // 2, alpha),
            "delta": delta,
            "kept_canary_norm_mean": float(np.mean(kept_norms)),
            "ledger_entries": sum(len(led.entries) for led in stored),
            "ledger_epsilon_max": max(float(led.epsilon()) for led in stored),
            "seconds": seconds,
            "detail": lb,
        }
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
