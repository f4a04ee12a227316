"""The update-level privacy of an in-process comparison run (modes ``dpfl`` and ``adpfl``).

What a simulator job does around each site's outgoing weight difference, without FLARE:

* at the site, the result filter's pure core (:class:`adpfl.flare.privacy_filter.ADPFilter`
  builds the same thing): the job's ``privacy`` settings as a
  :class:`~adpfl.privacy.config.PrivacyConfig`, one :class:`~adpfl.privacy.pipeline.PrivacyPipeline`
  per site (sparsify -> clip -> noise) with its update-level ledger on disk enforcing the
  job's epsilon (:class:`~adpfl.privacy.errors.BudgetExhausted`: the site refuses), and
  the public signals of the round's global model (``SiteSession.public_info``, as the
  executor hands them to its filter);
* at the server, the privacy widget's pure core
  (:class:`adpfl.flare.privacy_widget.PrivacyAccountingWidget`): each release's metadata
  checked (:func:`~adpfl.privacy.metadata.check_privacy_meta` against the job's noise
  floor and noise type; a bad one is rejected before aggregation), accounted again in
  the server's own ledger of the site (:func:`~adpfl.privacy.policy.account_update_release`),
  and the early stop when a site's next release would pass the budget
  (:func:`~adpfl.privacy.policy.projected_update_epsilon`).

The noise comes from the operating system's entropy, as in production.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

__all__ = ["UpdateLevelPrivacy"]


class UpdateLevelPrivacy:
    """Sites' filters and the server's accounting of one run (see the module docstring).

    Args:
        settings: the job's settings (``flare/jobs.py: job_settings``) of a dpfl/adpfl run.
        sites: the site names.
        ledger_folder: the sites' ledgers go to ``<ledger_folder>/<site>/<ledger_name>.json``.
        run_key: the key releases are accounted under (the filter's job id).
    """

    def __init__(self, settings: dict, sites: list[str], ledger_folder: Path, run_key: str):
        from adpfl.flare.jobs import _widget_args
        from adpfl.privacy.config import PrivacyConfig
        from adpfl.privacy.ledger import PrivacyLedger
        from adpfl.privacy.pipeline import PrivacyPipeline

        privacy = settings["privacy"]
        known = {f.name for f in dataclasses.fields(PrivacyConfig)}
        self.config = PrivacyConfig(**{k: v for k, v in privacy.items() if k in known}).validate()
        widget = _widget_args(privacy, settings["executor"])
        self.min_noise_multiplier = float(widget.get("min_noise_multiplier", 0.0))
        self.run_key = run_key
        self.pipelines = {}
        for site in sites:
            path = Path(ledger_folder) / site / f"{privacy.get('ledger_name') or 'privacy_ledger'}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            ledger = PrivacyLedger.load_or_create(str(path), delta=self.config.delta,
                                                  target_epsilon=self.config.target_epsilon)
            self.pipelines[site] = PrivacyPipeline(self.config, ledger, ledger_path=str(path))
        self.server = {site: PrivacyLedger(delta=self.config.delta, target_epsilon=None) for site in sites}
        self.reported: dict[str, float | None] = {}
        self.rejected: list[dict] = []
        self.stop_reason: str | None = None

    def release(self, site: str, diff: dict, round_index: int, public_info: dict | None) -> dict | None:
        """The site's protected release of ``diff`` as the server aggregates it (numpy, dense),
        or None when the server rejects it. BudgetExhausted propagates (the site refuses)."""
        from adpfl.privacy.metadata import check_privacy_meta
        from adpfl.privacy.policy import account_update_release

        update = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in diff.items()}
        public = public_info or {}
        scores = None
        if public.get("public_scores") is not None:
            scores = {k: torch.as_tensor(v) for k, v in public["public_scores"].items()}
        dense, meta = self.pipelines[site].release(update, round_index, public_scores=scores,
                                                   global_change=public.get("global_change"), job_id=self.run_key)
        try:
            meta = check_privacy_meta(dict(meta), self.config.delta, self.min_noise_multiplier,
                                      self.config.noise_type)
            account_update_release(self.server[site], meta, self.run_key)
        except Exception as e:  # the widget rejects (never aggregated), the run goes on
            self.rejected.append({"site": site, "round": round_index, "reason": str(e)})
            return None
        self.reported[site] = meta.get("epsilon_rdp")
        return {k: v.numpy() for k, v in dense.items()}

    def should_stop(self, round_index: int, planned_rounds: int) -> bool:
        """The widget's early stop after ``round_index``: a site's next release at its last
        noise level would pass the budget, and rounds remain."""
        from adpfl.privacy.policy import projected_update_epsilon

        if self.stop_reason is not None or round_index >= planned_rounds - 1:
            return self.stop_reason is not None
        hits = [(s, projected_update_epsilon(led, self.reported.get(s))) for s, led in sorted(self.server.items())
                if led.entries]
        hits = [(s, p) for s, p in hits if p > self.config.target_epsilon]
        if hits:
            why = ", ".join(f"{s} would reach epsilon {p:.4g}" for s, p in hits)
            self.stop_reason = (f"stopped after round {round_index}: next round exceeds target_epsilon="
                                f"{self.config.target_epsilon} at delta={self.config.delta} ({why})")
        return self.stop_reason is not None

    def report(self, refused: list[dict]) -> dict:
        """The run.json ``privacy`` of the run: per site the server's recomputed epsilon
        (site-level update DP), with the site's own ledger figure beside it."""
        from adpfl.privacy.policy import UNIT

        sites = {}
        for site, ledger in sorted(self.server.items()):
            own = self.pipelines[site].ledger
            sites[site] = {
                "releases": len(ledger.entries),
                "epsilon_rdp": ledger.epsilon("rdp") if ledger.entries else 0.0,
                "epsilon_prv": ledger.entries[-1].get("epsilon_prv") if ledger.entries else None,
                "site_ledger_epsilon_rdp": own.epsilon("rdp") if own.entries else 0.0,
                "clip_norm_final": float(self.pipelines[site].clip_norm),
                "per_round": [{k: e.get(k) for k in ("round", "epsilon_rdp", "epsilon_prv", "noise_multiplier",
                                                     "update_noise_multiplier", "clip_norm", "mechanism")}
                              for e in ledger.entries],
            }
        return {"unit": "update", "unit_text": UNIT, "delta": self.config.delta,
                "accountant": ("laplace: pure epsilon per round, basic composition" if self.config.noise_type ==
                               "laplace" else "opacus rdp (enforced); prv (reported)")
                + "; recomputed by the server from each release's metadata",
                "mechanism": self.config.noise_type, "target_epsilon": self.config.target_epsilon,
                "stopped_early": self.stop_reason is not None, "stop_reason": self.stop_reason,
                "rejected_contributions": self.rejected, "refused": refused, "sites": sites}
