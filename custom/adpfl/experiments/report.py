"""Report of an ``adpfl compare`` results folder: tables (Markdown + CSV) and plots.

Everything is computed from the ``runs/*/run.json`` files alone, so ``adpfl report --out
DIR`` regenerates it at any time. Figures per method (NP-FL; DP-FL and ADP-FL per epsilon),
mean +- std over seeds:

- final Dice per region and its mean (each seed: mean over sites of the final global
  model's cross-site validation), HD95 per region likewise, and the task's challenge
  metrics (lesion-wise Dice/HD95, Surface Dice or thresholded Jaccard) likewise; every
  figure follows the task's scoring convention (:mod:`adpfl.metrics`, named in the
  report's header); a figure over no case reads "no cases";
- rounds to reach 90 % of NP-FL's final Dice (same seed): the first round r whose global
  model (validated at the start of round r, mean over sites; the final model counts as
  round R) reaches it; "not reached" if no seed reaches it;
- round-to-round stability of the global Dice after the first round: the mean absolute
  change between consecutive rounds and the largest drop (:func:`round_stability`);
- epsilon actually spent: max over sites, RDP and PRV (from the server's privacy report);
- plots: Dice vs round (convergence), final Dice vs epsilon (frontier, NP-FL as a
  horizontal line), epsilon vs round per site.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adpfl._io import read_json
from adpfl.metrics.conventions import FAMILY_LABELS, SCORING, describe
from adpfl.modes import GRID_VARIANTS, MODE_LABELS, MODES, RECORD_MODES, UPDATE_MODES

REACH_FRACTION = 0.9


# ---------------------------------------------------------------------------- loading
def load_runs(out_dir) -> list[dict]:
    runs = []
    for p in sorted(Path(out_dir).glob("runs/*/run.json")):
        runs.append(read_json(p))  # a corrupt file is an error naming it
    return runs


def method_key(run: dict) -> tuple[str, float | None]:
    return run["mode"], (None if run["mode"] == "npfl" else float(run["epsilon"]))


def method_label(key) -> str:
    mode, eps = key
    return MODE_LABELS.get(mode, mode) if eps is None else f"{MODE_LABELS.get(mode, mode)} eps={eps:g}"


def _sort_key(key):
    mode, eps = key
    return (MODES.index(mode) if mode in MODES else len(MODES), eps if eps is not None else -1.0)


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)]


def _mean(xs) -> float:
    xs = _finite(xs)
    return float(np.mean(xs)) if xs else float("nan")


def _std(xs) -> float:
    xs = _finite(xs)
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else (0.0 if xs else float("nan"))


# ---------------------------------------------------------------------------- per run
def final_metric(run: dict, metric: str) -> float:
    """Mean over sites of one final metric (e.g. dice_mean, dice_lesion, hd95_lesion)."""
    return _mean(site.get(metric) for site in run.get("final", {}).values())


def dice_curve(run: dict, metric: str = "dice_mean") -> dict[int, float]:
    """{round: mean over sites of val_global/<metric>} plus the final model at round R."""
    per_round: dict[int, list[float]] = {}
    for site_series in run.get("curves", {}).values():
        for step, value in (site_series.get(metric) or {}).items():
            per_round.setdefault(int(step), []).append(value)
    curve = {r: _mean(v) for r, v in sorted(per_round.items())}
    final = final_metric(run, metric)
    if math.isfinite(final):
        curve[int(run.get("rounds", max(curve, default=-1) + 1))] = final
    return curve


def rounds_to_reach(curve: dict[int, float], threshold: float) -> int | None:
    for r in sorted(curve):
        if math.isfinite(curve[r]) and curve[r] >= threshold:
            return r
    return None


def round_stability(curve: dict[int, float]) -> tuple[float, float]:
    """(mean |Dice_r - Dice_{r-1}|, largest drop max(Dice_{r-1} - Dice_r, 0)) over the
    consecutive rounds r >= 2 of a run's global-Dice curve (round 0 -> 1 is the first
    learning step, not instability; the final model counts as round R). NaN for both
    when the curve has fewer than two rounds after round 1."""
    vals = [curve[r] for r in sorted(curve) if r >= 1 and math.isfinite(curve[r])]
    steps = [b - a for a, b in zip(vals, vals[1:])]
    if not steps:
        return float("nan"), float("nan")
    return float(np.mean(np.abs(steps))), float(max(max(-d for d in steps), 0.0))


def epsilon_spent(run: dict, kind: str = "epsilon_rdp") -> float:
    """Max over sites of the epsilon spent (0 for NP-FL's none)."""
    priv = run.get("privacy")
    if not priv:
        return float("nan")
    return max(_finite(s.get(kind) for s in priv.get("sites", {}).values()) or [float("nan")])


def epsilon_by_round(run: dict, kind: str = "epsilon_rdp") -> dict[str, dict[int, float]]:
    priv = run.get("privacy") or {}
    out = {}
    for site, info in (priv.get("sites") or {}).items():
        out[site] = {int(e["round"]): e.get(kind) for e in info.get("per_round", []) if e.get(kind) is not None}
    return out


def regions_of(runs: Sequence[dict]) -> list[str]:
    return sorted({r for run in runs for r in run.get("regions", [])})


#: challenge metric families shown after Dice and HD95, in this order
CHALLENGE_FAMILIES = ("lesion_dice", "lesion_hd95", "sdice", "tjaccard")


def metric_keys(runs: Sequence[dict], regions: Sequence[str]) -> list[str]:
    """Every per-region metric of the table: Dice, HD95, then the challenge metrics the runs report."""
    present = {k for run in runs for site in run.get("final", {}).values() for k in site}
    keys = [f"dice_{g}" for g in regions] + [f"hd95_{g}" for g in regions]
    for fam in CHALLENGE_FAMILIES:
        if any(f"{fam}_{g}" in present for g in regions):
            keys += [f"{fam}_{g}" for g in regions]
    return keys


def metric_label(key: str) -> str:
    for fam in sorted(FAMILY_LABELS, key=len, reverse=True):
        if key.startswith(fam + "_"):
            return f"{FAMILY_LABELS[fam]} {key[len(fam) + 1:]}"
    return key


# ---------------------------------------------------------------------------- aggregation
def summarize(runs: Sequence[dict]) -> dict:
    """Per method: mean/std over seeds of every figure of the table (see module docstring)."""
    regions = regions_of(runs)
    keys = metric_keys(runs, regions)
    npfl_final = {run["seed"]: final_metric(run, "dice_mean") for run in runs if run["mode"] == "npfl"}
    npfl_mean = _mean(npfl_final.values())
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(method_key(run), []).append(run)
    rows = []
    for key in sorted(groups, key=_sort_key):
        group = sorted(groups[key], key=lambda r: r["seed"])
        row = {"method": method_label(key), "mode": key[0], "epsilon": key[1], "seeds": [r["seed"] for r in group]}
        for metric in ["dice_mean"] + keys:
            vals = [final_metric(r, metric) for r in group]
            row[metric] = (_mean(vals), _std(vals))
        reached = []
        for r in group:
            ref = npfl_final.get(r["seed"], npfl_mean)
            reached.append(rounds_to_reach(dice_curve(r), REACH_FRACTION * ref) if math.isfinite(ref) else None)
        row["rounds_to_90"] = reached
        stab = [round_stability(dice_curve(r)) for r in group]
        row["round_abs_change"] = (_mean(a for a, _ in stab), _std(a for a, _ in stab))
        row["round_max_drop"] = (_mean(d for _, d in stab), _std(d for _, d in stab))
        for kind in ("epsilon_rdp", "epsilon_prv"):
            vals = [epsilon_spent(r, kind) for r in group] if key[0] != "npfl" else []
            row[kind] = (_mean(vals), _std(vals)) if vals else None
        row["target_epsilon"] = key[1]
        row["wall_time_s"] = _mean(r.get("wall_time_s") for r in group)
        known = npfl_mean and math.isfinite(npfl_mean)
        row["dice_fraction_of_npfl"] = row["dice_mean"][0] / npfl_mean if known else float("nan")
        rows.append(row)
    return {"regions": regions, "metric_keys": keys, "rows": rows, "npfl_dice": npfl_mean,
            "statements": _statements(rows)}


def _statements(rows: list[dict]) -> list[str]:
    """For each epsilon where DP-FL keeps < 90 % of NP-FL's Dice: ADP-FL's fraction."""
    out = []
    by = {(r["mode"], r["epsilon"]): r for r in rows}
    if not any(r["mode"] == "npfl" for r in rows):
        return ["No NP-FL run: fractions of NP-FL's Dice cannot be stated."]
    for (mode, eps), row in sorted(by.items(), key=lambda kv: _sort_key(kv[0])):
        if mode != "dpfl":
            continue
        frac = row["dice_fraction_of_npfl"]
        if math.isfinite(frac) and frac < REACH_FRACTION:
            adp = by.get(("adpfl", eps))
            if adp is not None:
                out.append(
                    f"At epsilon={eps:g}, DP-FL keeps {frac:.1%} of NP-FL's final Dice (< 90 %); "
                    f"ADP-FL keeps {adp['dice_fraction_of_npfl']:.1%}."
                )
            else:
                out.append(f"At epsilon={eps:g}, DP-FL keeps {frac:.1%} of NP-FL's final Dice (< 90 %); no ADP-FL run.")
    if not out and any(r["mode"] == "dpfl" for r in rows):
        out.append("DP-FL keeps >= 90 % of NP-FL's final Dice at every epsilon compared.")
    for (mode, eps), row in sorted(by.items(), key=lambda kv: _sort_key(kv[0])):
        frac = row["dice_fraction_of_npfl"]
        if mode in RECORD_MODES and math.isfinite(frac):
            out.append(f"Record-level epsilon={eps:g} (one record, {len(row['seeds'])} seeds): "
                       f"{MODE_LABELS[mode].split(' (')[0]} keeps {frac:.1%} of NP-FL's final Dice.")
    out.extend(_record_statements(by))
    return out


def _record_statements(by: dict) -> list[str]:
    """Per record-level epsilon: does ADP-SGD beat DP-SGD by more than the seed spread?"""
    out = []
    for (mode, eps), adp in sorted(by.items(), key=lambda kv: _sort_key(kv[0])):
        dp = by.get(("dpsgd", eps))
        if mode != "adpsgd" or dp is None:
            continue
        (ma, sa), (md, sd) = adp["dice_mean"], dp["dice_mean"]
        n = min(len(adp["seeds"]), len(dp["seeds"]))
        spread = max(sa, sd)
        if n < 2 or not all(math.isfinite(v) for v in (ma, md, spread)):
            verdict = "too few seeds to compare with the seed spread"
        elif ma - md > spread:
            verdict = f"ADP-SGD beats DP-SGD by {ma - md:.3f}, more than the seed spread ({spread:.3f})"
        else:
            verdict = (f"ADP-SGD does NOT beat DP-SGD by more than the seed spread (difference {ma - md:+.3f}, "
                       f"spread {spread:.3f})")
        out.append(f"Record-level epsilon={eps:g} (one record, {n} seeds): ADP-SGD Dice {ma:.3f} +- {sa:.3f}, "
                   f"DP-SGD {md:.3f} +- {sd:.3f}: {verdict}.")
    return out


# ---------------------------------------------------------------------------- formatting
def _pm(v, digits=3, missing="no cases") -> str:
    if v is None:
        return "-"
    m, s = v
    if not math.isfinite(m):
        return missing
    return f"{m:.{digits}f} +- {s:.{digits}f}"


def _reach(vals: list[int | None]) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "not reached"
    txt = f"{np.mean(got):.1f} +- {np.std(got, ddof=1) if len(got) > 1 else 0.0:.1f}"
    return txt if len(got) == len(vals) else f"{txt} ({len(got)}/{len(vals)} seeds; others not reached)"


def table_columns(regions: Sequence[str], keys: Sequence[str] | None = None) -> list[str]:
    keys = list(keys) if keys is not None else [f"dice_{g}" for g in regions] + [f"hd95_{g}" for g in regions]
    return (
        ["method", "target_epsilon", "seeds", "dice_mean"]
        + keys
        + ["rounds_to_90pct_npfl", "round_abs_change", "round_max_drop", "epsilon_rdp_max_site",
           "epsilon_prv_max_site", "dice_fraction_of_npfl",
           "wall_time_s"]
    )


def record_unit(task: str) -> str:
    """The record of the task's record-level DP: one training image (2D) or one patient (3D)."""
    from adpfl.tasks.base import get_task

    try:
        return "one patient" if get_task(task).spatial_dims == 3 else "one training image"
    except (KeyError, ValueError):
        return "one training record"


def markdown(summary: dict, title: str = "ADP-FL comparison", task: str = "") -> str:
    regions, rows = summary["regions"], summary["rows"]
    keys = summary.get("metric_keys") or [f"dice_{g}" for g in regions] + [f"hd95_{g}" for g in regions]
    hdr = (["Method", "Seeds", "Dice (mean)"] + [metric_label(k) for k in keys]
           + ["Rounds to 90% NP-FL", "Round-to-round abs. change / largest drop", "eps RDP (max site)",
              "eps PRV (max site)", "Dice / NP-FL"])
    lines = [f"# {title}", "", "Mean +- std over seeds; per seed, Dice/HD95 are means over sites of the final global "
             "model's validation; epsilon is the spend of the most-spent site (site-level update DP, at the run's "
             f"delta; for DP-SGD/ADP-SGD rows: record-level DP, {record_unit(task)}, a different unit that is not "
             "comparable with, and never added to, the update-level figures).", ""]
    if task in SCORING:
        lines += ["## Scoring", ""] + [f"- {d}" for d in describe(task)] + [
            "- Model selection and 'rounds to 90 % of NP-FL' use Dice (mean), the mean over regions of the "
            "voxel-wise Dice above.", ""]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        cells = [r["method"], str(len(r["seeds"])), _pm(r["dice_mean"])]
        cells += [_pm(r[k], 2 if "hd95" in k else 3) for k in keys]
        cells += [_reach(r["rounds_to_90"]), f"{_pm(r['round_abs_change'])} / {_pm(r['round_max_drop'])}",
                  _pm(r["epsilon_rdp"], 4 if _small(r["epsilon_rdp"]) else 1),
                  _pm(r["epsilon_prv"], 4 if _small(r["epsilon_prv"]) else 1, missing="not computed"),
                  "n/a" if not math.isfinite(r["dice_fraction_of_npfl"]) else f"{r['dice_fraction_of_npfl']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Privacy / utility", ""] + [f"- {s}" for s in summary["statements"]]
    lines += ["", "Rounds to 90 % of NP-FL: first round r whose global model (validated by the sites at the start of "
              "round r; the final model counts as the last round) reaches 90 % of the same seed's NP-FL final Dice.",
              "", "Round-to-round stability: over the rounds after the first, the mean absolute change of the "
              "global model's Dice (mean over sites) between consecutive rounds, and the largest drop; "
              "mean +- std over seeds.",
              "", "Plots: `plots/convergence.png`, `plots/frontier.png` (update level), `plots/frontier_record.png` "
              "(record level, when there are such runs), `plots/epsilon_by_round.png`.", ""]
    return "\n".join(lines)


def _small(v) -> bool:
    return v is not None and math.isfinite(v[0]) and abs(v[0]) < 100


def write_csv(summary: dict, path: Path) -> None:
    regions = summary["regions"]
    keys = summary.get("metric_keys") or [f"dice_{g}" for g in regions] + [f"hd95_{g}" for g in regions]
    cols = table_columns(regions, keys)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = []
        for c in cols:
            header += [c] if c in ("method", "target_epsilon", "seeds", "rounds_to_90pct_npfl",
                                   "dice_fraction_of_npfl", "wall_time_s") else [f"{c}_mean", f"{c}_std"]
        w.writerow(header)
        for r in summary["rows"]:
            line = [r["method"], "" if r["epsilon"] is None else r["epsilon"], len(r["seeds"])]
            for m in ["dice_mean"] + keys:
                line += [("" if not math.isfinite(v) else v) for v in r[m]]  # "" = no cases
            line.append(_reach(r["rounds_to_90"]))
            for k in ("round_abs_change", "round_max_drop"):
                line += [("" if not math.isfinite(v) else v) for v in r[k]]
            for k in ("epsilon_rdp", "epsilon_prv"):
                line += list(r[k]) if r[k] is not None else ["", ""]
            line += [r["dice_fraction_of_npfl"], r["wall_time_s"]]
            w.writerow(line)


# ---------------------------------------------------------------------------- plots
def plot_all(runs: Sequence[dict], summary: dict, folder: Path, task: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(method_key(run), []).append(run)
    keys = sorted(groups, key=_sort_key)
    paths = []

    # 1. convergence
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in keys:
        curves = [dice_curve(r) for r in groups[key]]
        steps = sorted({s for c in curves for s in c})
        m = np.array([_mean(c.get(s) for c in curves) for s in steps])
        sd = np.array([_std(c.get(s) for c in curves) for s in steps])
        line, = ax.plot(steps, m, marker="o", label=method_label(key), linestyle="-" if key[0] != "dpfl" else "--")
        if len(curves) > 1:
            ax.fill_between(steps, m - sd, m + sd, alpha=0.15, color=line.get_color())
    if math.isfinite(summary["npfl_dice"]):
        ax.axhline(REACH_FRACTION * summary["npfl_dice"], color="grey", lw=0.8, ls=":", label="90% of NP-FL final")
    ax.set_xlabel("round (global model at the start of the round; last = final model)")
    ax.set_ylabel("Dice (mean over regions and sites)")
    ax.set_title("Convergence")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / "convergence.png"))

    # 2. frontier, one plot per privacy unit (never on one epsilon axis)
    units = [(UPDATE_MODES + tuple(GRID_VARIANTS), "target epsilon per site (site-level update DP)",
              "frontier.png"),
             (RECORD_MODES, f"target epsilon per site (record-level DP: {record_unit(task)})", "frontier_record.png")]
    for modes, xlabel, name in units:
        if name != "frontier.png" and not any(r["mode"] in modes for r in summary["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for mode in modes:
            rows = [r for r in summary["rows"] if r["mode"] == mode]
            if rows:
                ax.errorbar([r["epsilon"] for r in rows], [r["dice_mean"][0] for r in rows],
                            yerr=[r["dice_mean"][1] for r in rows], marker="o", capsize=3, label=MODE_LABELS[mode])
        if math.isfinite(summary["npfl_dice"]):
            ax.axhline(summary["npfl_dice"], color="k", lw=1, label="NP-FL")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final Dice (mean)")
        ax.set_title("Privacy-utility frontier")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(fig, folder / name))

    # 3. epsilon vs round per site
    private = [k for k in keys if k[0] != "npfl"]
    n = max(1, len(private))
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, private):
        per_site: dict[str, dict[int, list[float]]] = {}
        for run in groups[key]:
            for site, series in epsilon_by_round(run).items():
                for rnd, v in series.items():
                    per_site.setdefault(site, {}).setdefault(rnd, []).append(v)
        for site in sorted(per_site):
            rs = sorted(per_site[site])
            ax.plot(rs, [_mean(per_site[site][x]) for x in rs], marker=".", label=site)
        ax.axhline(key[1], color="r", lw=0.8, ls=":", label="target")
        ax.set_title(method_label(key), fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon RDP (cumulative)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(private):]:
        ax.axis("off")
        if not private:
            ax.text(0.5, 0.5, "no private runs", ha="center")
    paths.append(_save(fig, folder / "epsilon_by_round.png"))
    return paths


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def per_site_epsilon(runs: Sequence[dict]) -> list[str]:
    """Markdown lines: every private run's epsilon spent at each site, with its unit and delta."""
    rows = []
    for run in sorted(runs, key=lambda r: (_sort_key(method_key(r)), r["seed"])):
        priv = run.get("privacy") or {}
        unit = "one training record" if priv.get("unit") == "record" else "one site's update"
        for site, info in sorted((priv.get("sites") or {}).items()):
            rdp, prv = info.get("epsilon_rdp"), info.get("epsilon_prv")
            rows.append(f"| {run['run_id']} | {site} | {unit} | {priv.get('delta')} | "
                        f"{'-' if rdp is None else f'{rdp:.4f}'} | {'-' if prv is None else f'{prv:.4f}'} |")
    if not rows:
        return []
    return ["## Epsilon spent per site", "",
            "Accountant: Opacus RDP (enforced by the site's ledger); PRV reported.", "",
            "| Run | Site | Unit | delta | eps RDP | eps PRV |", "|---|---|---|---|---|---|"] + rows + [""]


# ---------------------------------------------------------------------------- entry
def write_report(out_dir) -> dict:
    """Write report.md, summary.csv and plots/*.png of a results folder; returns their paths."""
    out = Path(out_dir)
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"no runs/*/run.json under {out}")
    summary = summarize(runs)
    task = runs[0].get("task", "")
    md = markdown(summary, title=f"ADP-FL comparison: {task}, {runs[0].get('rounds')} rounds, "
                                 f"{runs[0].get('sites')} sites, delta={runs[0].get('delta')}", task=task)
    md += "\n" + "\n".join(per_site_epsilon(runs))
    (out / "report.md").write_text(md)
    write_csv(summary, out / "summary.csv")
    plots = plot_all(runs, summary, out / "plots", task=task)
    return {"markdown": str(out / "report.md"), "csv": str(out / "summary.csv"), "plots": plots, "summary": summary}
