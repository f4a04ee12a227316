"""``adpfl compare --inprocess``: one comparison run as an in-process FedAvg, no FLARE simulator.

Why: on a small CPU machine the simulator's fixed cost (process start-up, FLARE's
messaging, three client processes) dominates tiny runs, and the record-level grid has many
of them. This runner uses the SAME components as a simulator job: the job definition's
settings (``flare/jobs.py: job_settings``), the FLARE executor's own construction of the
site configs (``SegmentationExecutor(...)._session_args``) and the same
:class:`~adpfl.training.site.SiteSession` per site (data, trainer, record-level ledger,
reservations, metadata), and the server's aggregation rule of the job: the mean of the
sites' weight differences, equally weighted for private modes and weighted by local steps
for NP-FL (``InTimeAccumulateWeightedAggregator(weigh_by_local_iter=not private)``). Each
site's record-level metadata goes through the server widget's check
(:func:`adpfl.privacy.metadata.check_record_meta`, epsilon recomputed from the history)
before its difference is averaged. What it leaves out: FLARE's transport, the
best-model selection (the final global model is scored, as the simulator's
``SRV_FL_global_model.pt``). The update-level modes (``dpfl``, ``adpfl``) send each site's
difference through the result filter's pipeline and the widget's accounting
(:mod:`adpfl.experiments.inprocess_update`) before it is averaged.

The run.json it writes has the simulator runner's layout plus ``"runner": "inprocess"``
and, per site, the record-level epsilon by Opacus RDP (enforced) and PRV (reported), or
the update-level epsilon (site-level update DP) as the server recomputes it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from adpfl.modes import RECORD_MODES, UPDATE_MODES, job_mode

__all__ = ["run_inprocess"]


def _session_args(settings: dict):
    from adpfl.flare.executor import SegmentationExecutor

    return SegmentationExecutor(**settings["executor"])._session_args


def run_inprocess(spec: dict, task: str, rounds: int, sites: int, overrides: dict, data_root: Path,
                  run_dir: Path) -> dict:
    """Run one comparison run in this process; returns the run.json fields of its result."""
    from adpfl.flare.jobs import job_settings
    from adpfl.privacy.errors import BudgetExhausted
    from adpfl.privacy.metadata import check_record_meta
    from adpfl.privacy.record import record_prv
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training.site import SiteSession

    mode = job_mode(spec["mode"])
    if mode not in ("npfl",) + UPDATE_MODES + RECORD_MODES:
        raise ValueError(f"--inprocess runs npfl, {UPDATE_MODES} and {RECORD_MODES}, not {mode}")
    settings = job_settings(task, mode, **overrides)
    if settings["num_rounds"] != rounds:
        raise ValueError("num_rounds of the settings disagree with --rounds")
    private = mode in RECORD_MODES + UPDATE_MODES
    torch.manual_seed(int(spec["seed"]))
    names = [f"site-{i + 1}" for i in range(sites)]
    sessions = []
    for site in names:
        s = SiteSession(site, *_session_args(settings))
        s.setup(str(data_root / task), ledger_folder=str(run_dir / "ledgers") if mode in RECORD_MODES else None)
        sessions.append(s)
    update_level = None
    if mode in UPDATE_MODES:
        from adpfl.experiments.inprocess_update import UpdateLevelPrivacy

        update_level = UpdateLevelPrivacy(settings, names, run_dir / "ledgers", spec["run_id"])
    # the server's initial model is the job's network variant (setting `network`), as its persistor's,
    # from the public warm-start checkpoint when the job names one (setting `initial_checkpoint`)
    network = settings["executor"].get("network") or "standard"
    init = TaskNetwork(task, network, initial_checkpoint=settings["executor"].get("initial_checkpoint"))
    glob = {k: v.detach().cpu().numpy().copy() for k, v in init.state_dict().items()}
    curves: dict[str, dict[str, dict[str, float]]] = {s: {} for s in names}
    rejected, refused = [], []
    t0 = time.perf_counter()
    for r in range(rounds):
        diffs, weights = [], []
        for site, s in zip(names, sessions):
            s.load_global(glob, r if update_level else None)  # r: the round's public signals (filter)
            try:
                # only global models are scored (as the simulator's curves): no local validation pass
                res = s.train_round(glob, r, job_id=spec["run_id"], validate_local=False)
            except BudgetExhausted as e:  # the site refuses; the round goes on without it
                refused.append({"site": site, "round": r, "reason": str(e)})
                continue
            for k, v in res.global_metrics.items():
                if isinstance(v, (int, float)):
                    curves[site].setdefault(k, {})[str(r)] = float(v)
            if res.diff is None:
                continue
            if update_level is not None:
                try:
                    res.diff = update_level.release(site, res.diff, r, s.public_info)
                except BudgetExhausted as e:  # the site's filter refuses: nothing leaves
                    refused.append({"site": site, "round": r, "reason": str(e)})
                    continue
                if res.diff is None:  # rejected by the server's check
                    continue
            elif private:
                try:
                    check_record_meta(res.record_meta, float(settings["executor"]["dpsgd_delta"]))
                except ValueError as e:
                    rejected.append({"site": site, "round": r, "reason": str(e)})
                    continue
            diffs.append(res.diff)
            weights.append(1.0 if private else float(res.steps))
        if diffs:
            total = float(sum(weights))
            glob = {k: (glob[k] + sum(w * d[k] for w, d in zip(weights, diffs)) / total).astype(glob[k].dtype)
                    for k in glob}
        if update_level is not None and update_level.should_stop(r, rounds):
            break
    final = {}
    for site, s in zip(names, sessions):
        s.load_global(glob)
        final[site] = {k: (float(v) if isinstance(v, (int, float)) else None) for k, v in s.validate().items()}
    regions = sorted({k[5:] for m in final.values() for k in m if k.startswith("dice_") and k != "dice_mean"})
    privacy = None if update_level is None else update_level.report(refused)
    if mode in RECORD_MODES:
        delta = float(settings["executor"]["dpsgd_delta"])
        per_site = {}
        for site, s in zip(names, sessions):
            hist = s.record_ledger.history()
            prv = record_prv(hist, delta)
            per_round = [{"round": e["round"], "epsilon_rdp": e["epsilon_rdp"], "epsilon_prv": None,
                          "noise_multiplier": e["noise_multiplier"], "sample_rate": e["sample_rate"],
                          "steps": e["steps"]} for e in s.record_ledger.entries]
            per_site[site] = {"releases": len(per_round), "epsilon_rdp": s.record_ledger.epsilon(),
                              "epsilon_prv": prv, "history": [list(h) for h in hist],
                              "clip_norm_final": float(s.trainer.clip), "per_round": per_round}
        privacy = {"unit": "record", "delta": delta, "accountant": "opacus rdp (enforced); prv (reported)",
                   "target_epsilon": float(settings["executor"]["dpsgd_target_epsilon"]),
                   "stopped_early": False, "stop_reason": None, "rejected_contributions": rejected,
                   "refused": refused, "sites": per_site}
    return {"runner": "inprocess", "settings": settings, "curves": curves, "final": final, "regions": regions,
            "privacy": privacy, "wall_time_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
