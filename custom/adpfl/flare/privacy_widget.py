"""Server-side privacy accounting: one ledger per site, TensorBoard curves, the report,
and a clean early stop when a site's budget would be exceeded next round.

The widget *mirrors* the sites' accounting (each site enforces its own budget in its
result filter); it recomputes every epsilon with Opacus from the released noise
multipliers, so a site's claim is checked rather than trusted. It also rejects, before
aggregation, contributions whose privacy metadata is missing or breaks the job's policy.
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Dict, List, Optional

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from adpfl.flare.privacy_meta import PRIVACY_META_KEY, check_privacy_meta
from adpfl.privacy.accounting import PrivacyLedger

UNIT = (
    "site-level update DP: each site's whole model update per round is the protected unit "
    "(replace-one neighbours, L2 sensitivity = 2 * clip_norm, sample rate 1, one release per round)"
)
UNCOVERED = [
    "training/validation metrics each site reports (loss, Dice, HD95) are not privatized",
    "the global model's validation Dice on each site (model selection) is not privatized",
    "participation (which sites answered in which round) is visible to the server",
]


class PrivacyAccountingWidget(Widget):
    def __init__(
        self,
        target_epsilon: float = 10.0,
        delta: float = 1e-5,
        planned_rounds: int = 0,
        noise_type: str = "gaussian",
        min_noise_multiplier: float = 0.0,
        report_name: str = "privacy_report.json",
        stop_on_budget: bool = True,
    ):
        """Args:
        target_epsilon: the per-site budget (site-level update DP) the job plans for.
        delta: the job's delta (every site must account at this delta).
        planned_rounds: rounds the budget was planned over (for the report).
        noise_type: gaussian or laplace (what the job's sites release).
        min_noise_multiplier: contributions claiming a smaller noise multiplier are rejected.
        report_name: file written into the job's run folder.
        stop_on_budget: end the run cleanly when a site's next release would exceed the budget.
        """
        super().__init__()
        if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if noise_type not in ("gaussian", "laplace"):
            raise ValueError(f"noise_type must be gaussian or laplace, got {noise_type!r}")
        if min_noise_multiplier < 0:
            raise ValueError(f"min_noise_multiplier must be >= 0, got {min_noise_multiplier!r}")
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.planned_rounds = int(planned_rounds)
        self.noise_type = noise_type
        self.min_noise_multiplier = float(min_noise_multiplier)
        self.report_name = report_name
        self.stop_on_budget = stop_on_budget
        self._lock = threading.RLock()
        self._ledgers: Dict[str, PrivacyLedger] = {}
        self._site_reported: Dict[str, dict] = {}
        self._rejected: List[dict] = []
        self._stopped_early = False
        self._stop_reason: Optional[str] = None
        self._seeded = False
        self._mask_uncovered_sites = set()
        self._report_path: Optional[str] = None

    # ------------------------------------------------------------------ events
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
            self._report_path = os.path.join(run_dir, self.report_name)
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._on_contribution(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            self._on_round_done(fl_ctx)
        elif event_type == EventType.END_RUN:
            with self._lock:
                self._write_report()

    def _on_contribution(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if result is None:
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
        if not site:
            peer = fl_ctx.get_peer_context()
            site = peer.get_identity_name() if peer else "unknown"
        try:
            dxo = from_shareable(result)
            meta = check_privacy_meta(dxo.get_meta_prop(PRIVACY_META_KEY), self.delta, self.min_noise_multiplier)
            if meta["mechanism"] != self.noise_type:
                raise ValueError(f"released with {meta['mechanism']}, the job's noise_type is {self.noise_type}")
        except Exception as e:
            self._reject(result, site, current_round, str(e), fl_ctx)
            return
        # the round the site released for (a late result of an earlier round arrives while
        # the server is already in the next one; it was released, so it is accounted)
        release_round = meta.get("round", result.get_header(AppConstants.CURRENT_ROUND, current_round))
        with self._lock:
            ledger = self._ledgers.setdefault(site, PrivacyLedger(delta=self.delta, target_epsilon=None))
            if ledger.has_round(int(release_round), fl_ctx.get_job_id()):
                self._reject(result, site, current_round, f"a second release for round {release_round}", fl_ctx)
                return
            entry = ledger.record(
                round=int(release_round),
                noise_multiplier=float(meta["noise_multiplier"]),
                update_noise_multiplier=float(meta.get("update_noise_multiplier", meta["noise_multiplier"])),
                clip_norm=float(meta["clip_norm"]),
                keep_fraction=float(meta["keep_fraction"]),
                mask_policy=str(meta["mask_policy"]),
                mask_covered=bool(meta["mask_covered"]),
                mechanism=meta["mechanism"],
                job_id=fl_ctx.get_job_id(),
            )
            entry["site_reported_epsilon_rdp"] = meta.get("epsilon_rdp")
            ledger.entries[-1] = entry
            self._site_reported[site] = meta
            if meta.get("seeded"):
                self._seeded = True
            if not meta["mask_covered"]:
                self._mask_uncovered_sites.add(site)
            # a site's own total (it may include earlier jobs) can never be below what this job spent
            reported = meta.get("epsilon_rdp")
            if isinstance(reported, (int, float)) and reported + 1e-6 < entry["epsilon_rdp"]:
                self.log_warning(
                    fl_ctx,
                    f"{site} reports epsilon_rdp={reported:.4g}, below this job's own accounting "
                    f"{entry['epsilon_rdp']:.4g}; the report keeps the server's figure",
                )

    def _reject(self, result, site, current_round, why: str, fl_ctx: FLContext) -> None:
        # flipping the return code makes the aggregator disregard the contribution
        result.set_return_code(ReturnCode.BAD_TASK_DATA)
        self.log_error(fl_ctx, f"rejected the contribution of {site} in round {current_round}: {why}")
        with self._lock:
            self._rejected.append({"site": site, "round": current_round, "reason": why})

    def _site_total(self, site: str) -> float:
        """Best known cumulative epsilon of a site: this job's (server-computed) spend plus
        whatever the site reports it had spent before this job."""
        ledger = self._ledgers[site]
        own = ledger.epsilon("rdp")
        reported = self._site_reported.get(site, {}).get("epsilon_rdp")
        if isinstance(reported, (int, float)) and math.isfinite(reported):
            return max(own, float(reported))
        return own

    def _on_round_done(self, fl_ctx: FLContext) -> None:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        with self._lock:
            summary = []
            stop_sites = []
            for site in sorted(self._ledgers):
                ledger = self._ledgers[site]
                if not ledger.entries:
                    continue
                last = ledger.entries[-1]
                eps_rdp = ledger.epsilon("rdp")
                prv = last.get("epsilon_prv")
                for tag, value in (
                    ("epsilon_rdp", eps_rdp),
                    ("epsilon_prv", prv),
                    ("epsilon_exact", last.get("epsilon_exact")),
                    ("noise_multiplier", last["noise_multiplier"]),
                    ("clip_norm", last["clip_norm"]),
                    ("keep_fraction", last["keep_fraction"]),
                ):
                    if value is not None and math.isfinite(value):
                        self._tb(fl_ctx, f"privacy/{site}/{tag}", value, int(current_round))
                total = self._site_total(site)
                summary.append(f"{site} eps={total:.4g} (z={last['noise_multiplier']:.3g}, C={last['clip_norm']:.3g})")
                # would one more release at the last noise level exceed the budget?
                prior = max(0.0, total - eps_rdp)
                projected = prior + ledger.projected_epsilon(last["noise_multiplier"], "rdp", last["mechanism"])
                if projected > self.target_epsilon:
                    stop_sites.append((site, projected))
            self.log_info(
                fl_ctx,
                f"privacy after round {current_round} (delta={self.delta}, target {self.target_epsilon}): "
                + ("; ".join(summary) if summary else "no private releases"),
            )
            self._write_report()
            if stop_sites and self.stop_on_budget and not self._stopped_early:
                planned_last = self.planned_rounds - 1 if self.planned_rounds else None
                if planned_last is None or int(current_round) < planned_last:
                    why = ", ".join(f"{s} would reach epsilon {p:.4g}" for s, p in stop_sites)
                    self._stopped_early = True
                    self._stop_reason = (
                        f"stopped after round {current_round}: next round exceeds target_epsilon="
                        f"{self.target_epsilon} at delta={self.delta} ({why})"
                    )
                    self.log_warning(fl_ctx, self._stop_reason)
                    self._write_report()
                    signal = fl_ctx.get_run_abort_signal()
                    if signal is not None:
                        signal.trigger(self._stop_reason)

    def _tb(self, fl_ctx: FLContext, tag: str, value: float, step: int) -> None:
        dxo = create_analytic_dxo(tag=tag, value=float(value), data_type=AnalyticsDataType.SCALAR, global_step=step)
        send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx)

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        sites = {}
        for site, ledger in sorted(self._ledgers.items()):
            last = ledger.entries[-1] if ledger.entries else {}
            sites[site] = {
                "releases": len(ledger.entries),
                "epsilon_rdp": ledger.epsilon("rdp") if ledger.entries else 0.0,
                "epsilon_prv": last.get("epsilon_prv"),
                "epsilon_exact": last.get("epsilon_exact"),
                "site_reported_total_epsilon_rdp": self._site_reported.get(site, {}).get("epsilon_rdp"),
                "mask_covered": site not in self._mask_uncovered_sites,
                "ledger": ledger.entries,
            }
        return {
            "unit": UNIT,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "planned_rounds": self.planned_rounds,
            "noise_type": self.noise_type,
            "accountants": {
                "epsilon_rdp": "Opacus RDPAccountant (enforced)",
                "epsilon_prv": "Opacus PRVAccountant (null where z < 0.1: Opacus's PRV numerics fail there)",
                "epsilon_exact": "exact composed-Gaussian conversion at sample rate 1 (mu-GDP, Balle & Wang)",
            },
            "noise_multiplier_convention": "noise std = update_noise_multiplier * 2 * clip_norm; "
            "noise_multiplier is the effective one accounted (update noise combined with the adaptive "
            "clipping's indicator noise)",
            "sites": sites,
            "rejected_contributions": self._rejected,
            "stopped_early": self._stopped_early,
            "stop_reason": self._stop_reason,
            "seeded_noise": self._seeded,
            "mask_not_covered_sites": sorted(self._mask_uncovered_sites),
            "not_covered": UNCOVERED,
        }

    def _write_report(self) -> None:
        if not self._report_path:
            return
        tmp = self._report_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.report(), f, indent=2, default=float)
        os.replace(tmp, self._report_path)
