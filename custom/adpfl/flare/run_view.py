"""What ``adpfl run`` shows a person while a run goes: one line per round, and a PNG of
Dice and epsilon per round per site at the end. No FLARE import: it reads the run folder's
``run_progress.json`` (:mod:`adpfl.flare.progress`, per-round Dice) and
``privacy_report.json`` (:mod:`adpfl.flare.privacy_widget`, per-site epsilon) as they are
rewritten after every round. Written by hand: FLARE prints log records, not a round table.

Dice of round k is each site's validation Dice of the global model it received in round k
(the model after k rounds; round 0: the initial model); epsilon of round k is the site's
cumulative epsilon after its release in round k, in the report's unit, delta and accountant.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

from adpfl._io import read_json

PLOT_NAME = "rounds.png"


def _read(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):  # being replaced right now: read again at the next poll
        return None


def _epsilon_at(report: dict | None, rnd: int) -> tuple[dict, dict]:
    """Per-site cumulative epsilon after round ``rnd``: (update-level, record-level)."""
    update, record = {}, {}
    if not report:
        return update, record
    if report.get("update_level", True):
        for site, info in (report.get("sites") or {}).items():
            spent = [e["epsilon_rdp"] for e in info.get("ledger") or [] if int(e.get("round", -1)) <= rnd]
            if spent:
                update[site] = float(spent[-1])
    rec = report.get("record_level") or {}
    for site, info in (rec.get("sites") or {}).items():
        by_round = {int(k): v for k, v in (info.get("epsilon_rdp_by_round") or {}).items() if int(k) <= rnd}
        if by_round:
            record[site] = float(by_round[max(by_round)])
    return update, record


def _report_round(report: dict | None) -> int | None:
    """The last round the privacy report holds (any site, either unit); None: none yet."""
    rounds = []
    for info in ((report or {}).get("sites") or {}).values():
        rounds += [int(e.get("round", -1)) for e in info.get("ledger") or []]
    for info in (((report or {}).get("record_level") or {}).get("sites") or {}).values():
        rounds += [int(k) for k in info.get("epsilon_rdp_by_round") or {}]
    return max(rounds) if rounds else None


def round_rows(progress: dict | None, report: dict | None) -> list[dict]:
    """One row per completed round: round, per-site and mean Dice, per-site epsilon, time.
    ``epsilon_as_of`` is the report's last round when it does not reach the row's round yet
    (its epsilons are then the earlier, smaller spend), else None."""
    rows = []
    latest = _report_round(report)
    for entry in (progress or {}).get("history") or []:
        rnd = int(entry["round"])
        dice = {s: float(v) for s, v in (entry.get("dice") or {}).items()}
        update, record = _epsilon_at(report, rnd)
        rows.append({
            "round": rnd,
            "dice": dice,
            "mean_dice": sum(dice.values()) / len(dice) if dice else None,
            "epsilon": update,
            "record_epsilon": record,
            "epsilon_as_of": latest if latest is not None and latest < rnd else None,
            "time": entry.get("time"),
        })
    return rows


def privacy_legend(report: dict | None) -> str:
    """The unit, delta and accountant of the epsilons in the round lines."""
    if not report:
        return "eps: none (this mode trains without differential privacy)"
    parts = []
    if report.get("update_level", True):
        parts.append(f"site-level update DP (replace-one), delta={report.get('delta')}, RDP")
    rec = report.get("record_level")
    if rec:
        parts.append(f"record-level DP-SGD (one image/patient), delta={rec.get('delta')}, RDP")
    return "eps per site: " + "; ".join(parts)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_row(row: dict, num_rounds: int, elapsed: float, rounds_done: int, rounds_left: int) -> str:
    """``round k/N  Dice 0.712  eps site-1 12.3 ...  1m02s elapsed, ETA 3m10s``."""
    dice = "  n/a" if row["mean_dice"] is None else f"{row['mean_dice']:.3f}"
    eps = row["epsilon"] or row["record_epsilon"]
    if row["epsilon"] and row["record_epsilon"]:
        eps_text = ("update " + " ".join(f"{s} {v:.4g}" for s, v in sorted(row["epsilon"].items())) + "; record "
                    + " ".join(f"{s} {v:.4g}" for s, v in sorted(row["record_epsilon"].items())))
    elif eps:
        eps_text = " ".join(f"{s} {v:.4g}" for s, v in sorted(eps.items()))
    else:
        eps_text = "-"
    if row.get("epsilon_as_of") is not None and eps:
        eps_text += f" (privacy report as of round {row['epsilon_as_of'] + 1})"
    eta = elapsed / rounds_done * rounds_left if rounds_done else None
    return (f"round {row['round'] + 1}/{num_rounds}  Dice {dice}  eps {eps_text}  "
            f"{fmt_duration(elapsed)} elapsed, ETA {fmt_duration(eta)}")


def final_dice(run_dir: Path) -> dict:
    """Per-site Dice of the final global model (the run's final validation), if recorded."""
    cv = _read(Path(run_dir) / "cross_site_val" / "cross_val_results.json") or {}
    out = {}
    for site, models in cv.items():
        m = (models or {}).get("SRV_FL_global_model.pt") or {}
        if isinstance(m.get("dice_mean"), (int, float)):
            out[site] = float(m["dice_mean"])
    return out


def plot_rounds(rows: list[dict], final: dict, path: str | os.PathLike, title: str = "",
                legend: str = "") -> str | None:
    """Dice (top) and epsilon (bottom, ``legend`` names its unit) per site against rounds
    completed; None if no rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({s for r in rows for s in r["dice"]} | set(final)
                   | {s for r in rows for s in list(r["epsilon"]) + list(r["record_epsilon"])})
    fig, (ax_d, ax_e) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    last = rows[-1]["round"] + 1
    for site in sites:
        pts = [(r["round"], r["dice"][site]) for r in rows if site in r["dice"]]
        if site in final:
            pts.append((last, final[site]))
        if pts:
            ax_d.plot(*zip(*pts), marker="o", label=site)
        for key, style in (("epsilon", "-"), ("record_epsilon", "--")):
            e = [(r["round"] + 1, r[key][site]) for r in rows if site in r[key]]
            if e:
                ax_e.plot(*zip(*e), style, marker="o", label=site if key == "epsilon" else f"{site} (record)")
    ax_d.set_ylabel("validation Dice of the global model")
    ax_d.set_ylim(0, 1)
    ax_d.legend(fontsize=8)
    ax_e.set_ylabel("epsilon spent (RDP)")
    ax_e.set_xlabel("rounds completed")
    from matplotlib.ticker import MaxNLocator

    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax_e.lines:
        ax_e.legend(fontsize=8)
    else:
        ax_e.text(0.5, 0.5, "no differential privacy", ha="center", va="center", transform=ax_e.transAxes)
    if title:
        ax_d.set_title(title)
    if legend:
        ax_e.set_title(legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def watch(proc: subprocess.Popen, run_dir_of, num_rounds: int, print_line=print, poll: float = 1.0,
          settle: float = 30.0, private: bool = True) -> int:
    """Print one line per completed round of the run ``proc`` is doing until it exits;
    returns its exit code. ``run_dir_of()`` gives the run folder (or raises
    FileNotFoundError before it exists). In a ``private`` run a round is printed once the
    privacy report holds it too (the two widgets write after the same event, in either
    order), or ``settle`` seconds after its progress record (no site released that round)."""
    t0 = time.time()
    printed, legend_done, seen_at = set(), False, {}
    while True:
        running = proc.poll() is None
        try:
            rd = Path(run_dir_of())
        except FileNotFoundError:
            rd = None
        if rd is not None:
            progress = _read(rd / "run_progress.json")
            report = _read(rd / "privacy_report.json")
            rows = round_rows(progress, report)
            start = int((progress or {}).get("start_round") or 0)
            for row in rows:
                if row["round"] in printed:
                    continue
                seen_at.setdefault(row["round"], time.time())
                # an epsilon of an earlier round is not this round's: wait for the report too
                has_eps = bool(row["epsilon"] or row["record_epsilon"]) and row.get("epsilon_as_of") is None
                if private and not has_eps and running and time.time() - seen_at[row["round"]] < settle:
                    break  # the report of this round may not be written yet
                if not legend_done:
                    print_line(privacy_legend(report) + "; Dice: mean over sites, of the model the round starts from")
                    legend_done = True
                done = row["round"] + 1 - start
                print_line(format_row(row, num_rounds, time.time() - t0, done, num_rounds - row["round"] - 1))
                printed.add(row["round"])
        if not running:
            return proc.returncode
        time.sleep(poll)
