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

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from adpfl.privacy.config import NOISE_TYPES, DPSGDConfig, PrivacyConfig
from adpfl.privacy.ledger import PrivacyLedger
from adpfl.privacy.metadata import (
    PRIVACY_META_KEY,
    RECORD_PRIVACY_META_KEY,
    check_privacy_meta,
    check_record_meta,
)
from adpfl.privacy.policy import (
    RECORD_UNIT,
    UNCOVERED,
    UNIT,
    account_update_release,
    check_record_budget,
    projected_record_epsilon,
    projected_update_epsilon,
    record_limit,
    site_total_epsilon,
)
from adpfl.privacy.record import record_prv

_D = PrivacyConfig()  # update-level defaults (one source: adpfl.privacy.config)
_R = DPSGDConfig()  # record-level defaults


class PrivacyAccountingWidget(Widget):
    def __init__(
        self,
        target_epsilon: float | None = _D.target_epsilon,
        delta: float = _D.delta,
        planned_rounds: int | None = _D.planned_rounds,
        noise_type: str = _D.noise_type,
        min_noise_multiplier: float = 0.0,
        report_name: str = "privacy_report.json",
        stop_on_budget: bool = True,
        update_level: bool = True,
        record_level: bool = False,
        record_target_epsilon: float | None = _R.target_epsilon,
        record_delta: float = _R.delta,
    ):
        """Args:
        target_epsilon: the per-site budget (site-level update DP) the job plans for.
        delta: the job's delta (every site must account at this delta).
        planned_rounds: rounds the budget was planned over (for the report).
        noise_type: gaussian or laplace (what the job's sites release).
        min_noise_multiplier: contributions claiming a smaller noise multiplier are rejected.
        report_name: file written into the job's run folder.
        stop_on_budget: end the run cleanly when a site's next release would exceed the budget.
        update_level: the job's sites release through the update-level filter; contributions
            without valid update-level metadata are rejected (False: DP-SGD-only jobs).
        record_level: the job's sites train with DP-SGD; contributions without valid
            record-level metadata, or whose record-level epsilon (recomputed here with Opacus
            from the reported (z, q, steps) history) exceeds ``record_target_epsilon``, are rejected.
        record_target_epsilon / record_delta: the record-level budget and its delta.
        """
        super().__init__()
        if not (update_level or record_level):
            raise ValueError("the privacy widget needs update_level or record_level (or both)")
        if record_level and not (isinstance(record_target_epsilon, (int, float)) and record_target_epsilon > 0):
            raise ValueError(f"record_target_epsilon must be > 0, got {record_target_epsilon!r}")
        if record_level and not (isinstance(record_delta, (int, float)) and 0 < record_delta < 1):
            raise ValueError(f"record_delta must be in (0, 1), got {record_delta!r}")
        if update_level and not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
        if min_noise_multiplier < 0:
            raise ValueError(f"min_noise_multiplier must be >= 0, got {min_noise_multiplier!r}")
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = float(delta)
        self.planned_rounds = None if planned_rounds is None else int(planned_rounds)
        self.noise_type = noise_type
        self.min_noise_multiplier = float(min_noise_multiplier)
        self.report_name = report_name
        self.stop_on_budget = stop_on_budget
        self.update_level = bool(update_level)
        self.record_level = bool(record_level)
        self.record_target_epsilon = None if record_target_epsilon is None else float(record_target_epsilon)
        self.record_delta = float(record_delta)
        self._record: dict[str, dict] = {}
        self._lock = threading.RLock()
        self._ledgers: dict[str, PrivacyLedger] = {}
        self._site_reported: dict[str, dict] = {}
        self._rejected: list[dict] = []
        self._stopped_early = False
        self._stop_reason: str | None = None
        self._seeded = False
        self._mask_uncovered_sites = set()
        self._report_path: str | None = None

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
            record = None
            if self.record_level:
                record = check_record_meta(dxo.get_meta_prop(RECORD_PRIVACY_META_KEY), self.record_delta)
                check_record_budget(record, self.record_target_epsilon)
            meta = None
            if self.update_level:
                meta = check_privacy_meta(dxo.get_meta_prop(PRIVACY_META_KEY), self.delta, self.min_noise_multiplier,
                                          self.noise_type)
        except Exception as e:
            self._reject(result, site, current_round, str(e), fl_ctx)
            return
        if record is not None:
            self._on_record(site, record, fl_ctx)
        if meta is None:
            return
        # the round the site released for (a late result of an earlier round arrives while
        # the server is already in the next one; it was released, so it is accounted)
        release_round = meta.get("round", result.get_header(AppConstants.CURRENT_ROUND, current_round))
        with self._lock:
            ledger = self._ledgers.setdefault(site, PrivacyLedger(delta=self.delta, target_epsilon=None))
            if ledger.has_round(int(release_round), fl_ctx.get_job_id()):
                self._reject(result, site, current_round, f"a second release for round {release_round}", fl_ctx)
                return
            entry = account_update_release(ledger, dict(meta, round=int(release_round)), fl_ctx.get_job_id())
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

    def _on_record(self, site: str, record: dict, fl_ctx: FLContext) -> None:
        claimed = record.get("epsilon_rdp")
        with self._lock:
            info = self._record.setdefault(site, {"rounds": []})
            info["rounds"].append(int(record["round"]))
            # the cumulative figure after each round (adpfl run's round lines and curves)
            info.setdefault("epsilon_rdp_by_round", {})[str(int(record["round"]))] = record["epsilon_recomputed"]
            info.update(
                mechanism=record["mechanism"],
                epsilon_rdp=record["epsilon_recomputed"],
                site_reported_epsilon_rdp=claimed,
                noise_multiplier=float(record["noise_multiplier"]),
                sample_rate=float(record["sample_rate"]),
                max_grad_norm=float(record["max_grad_norm"]),
                steps_per_round=int(record["steps_per_round"]),
                steps=sum(int(h[2]) for h in record["history"]),
                history=[list(h) for h in record["history"]],
            )
        if isinstance(claimed, (int, float)) and not math.isclose(claimed, record["epsilon_recomputed"], rel_tol=1e-6):
            self.log_warning(
                fl_ctx,
                f"{site} reports record-level epsilon {claimed:.6g}, recomputed {record['epsilon_recomputed']:.6g}; "
                "the report keeps the recomputed figure",
            )

    def _reject(self, result, site, current_round, why: str, fl_ctx: FLContext) -> None:
        # flipping the return code makes the aggregator disregard the contribution
        result.set_return_code(ReturnCode.BAD_TASK_DATA)
        self.log_error(fl_ctx, f"rejected the contribution of {site} in round {current_round}: {why}")
        with self._lock:
            self._rejected.append({"site": site, "round": current_round, "reason": why})

    def _site_total(self, site: str) -> float:
        return site_total_epsilon(self._ledgers[site], self._site_reported.get(site, {}).get("epsilon_rdp"))

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
                projected = projected_update_epsilon(ledger, self._site_reported.get(site, {}).get("epsilon_rdp"))
                if projected > self.target_epsilon:
                    stop_sites.append(("update", site, projected))
            if self.update_level:
                self.log_info(
                    fl_ctx,
                    f"privacy after round {current_round} (update-level, delta={self.delta}, target "
                    f"{self.target_epsilon}): " + ("; ".join(summary) if summary else "no private releases"),
                )
            if self.record_level:
                rec_summary = []
                for site in sorted(self._record):
                    info = self._record[site]
                    self._tb(fl_ctx, f"privacy_record/{site}/epsilon_rdp", info["epsilon_rdp"], int(current_round))
                    rec_summary.append(f"{site} eps={info['epsilon_rdp']:.4g} (z={info['noise_multiplier']:.3g}, "
                                       f"q={info['sample_rate']:.3g})")
                    projected = projected_record_epsilon(
                        info["history"], info["noise_multiplier"], info["sample_rate"], info["steps_per_round"],
                        self.record_delta,
                    )
                    if projected > record_limit(self.record_target_epsilon):
                        stop_sites.append(("record", site, projected))
                self.log_info(
                    fl_ctx,
                    f"privacy after round {current_round} (record-level DP-SGD, delta={self.record_delta}, target "
                    f"{self.record_target_epsilon}; not added to any update-level figure): "
                    + ("; ".join(rec_summary) if rec_summary else "no DP-SGD results"),
                )
            self._write_report()
            if stop_sites and self.stop_on_budget and not self._stopped_early:
                planned_last = self.planned_rounds - 1 if self.planned_rounds else None
                if planned_last is None or int(current_round) < planned_last:
                    parts = []
                    for level, budget, delta in (("update", self.target_epsilon, self.delta),
                                                 ("record", self.record_target_epsilon, self.record_delta)):
                        hits = [(s, p) for lv, s, p in stop_sites if lv == level]
                        if hits:
                            name = "target_epsilon" if level == "update" else "record_target_epsilon"
                            why = ", ".join(f"{s} would reach epsilon {p:.4g}" for s, p in hits)
                            parts.append(f"next round exceeds {name}={budget} at delta={delta} ({why})")
                    self._stopped_early = True
                    self._stop_reason = f"stopped after round {current_round}: " + "; ".join(parts)
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
        record = None
        if self.record_level:
            record = {
                "unit": RECORD_UNIT,
                "delta": self.record_delta,
                "target_epsilon": self.record_target_epsilon,
                "accountant": "Opacus RDPAccountant over the (z, q, steps) history each site reports, "
                "recomputed by the server (the site's own claim is kept beside it); epsilon_prv: Opacus "
                "PRVAccountant over the same history (reported, the tighter figure)",
                "sites": {site: dict(info, epsilon_prv=record_prv(info.get("history", []), self.record_delta))
                          for site, info in sorted(self._record.items())},
            }
        return {
            "unit": UNIT if self.update_level else None,
            "update_level": self.update_level,
            "record_level": record,
            "units_note": "update-level and record-level epsilons protect different units and are never added",
            "delta": self.delta if self.update_level else None,
            "target_epsilon": self.target_epsilon if self.update_level else None,
            "planned_rounds": self.planned_rounds,
            "noise_type": self.noise_type if self.update_level else None,
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
