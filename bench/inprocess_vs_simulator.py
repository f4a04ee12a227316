"""Does ``adpfl compare --inprocess`` reproduce a simulator run? Reads two comparison folders
of the same grid (one run by the simulator, one ``--inprocess``) and prints, per mode: the final
mean Dice of each seed under both runners, the seed-to-seed spread (std over seeds) of each,
the mean in-process minus simulator difference, and every site's epsilon under both (unit,
delta and accountant as each run.json states them).

The grid's seed sets the data (``data_seed``) and, in process, the initial model: so the
seed-to-seed spread mixes both. ``--init-seeds N`` measures the spread that separates two
runners on the SAME data: every simulator run is repeated in process N times on its own data
folder with N other torch seeds (initial model, shuffling, augmentation; the privacy noise is
fresh anyway), and the simulator's Dice is placed in that distribution (z = (simulator - mean)
/ std).

    python bench/inprocess_vs_simulator.py --simulator results/ivs_sim --inprocess results/ivs_inproc \
        --init-seeds 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from adpfl.experiments.report import final_metric, load_runs


def _by_key(folder: str) -> dict:
    return {(r["mode"], r["seed"]): r for r in load_runs(Path(folder))}


def _eps(run: dict) -> dict[str, float]:
    sites = (run.get("privacy") or {}).get("sites") or {}
    return {s: info.get("epsilon_rdp") for s, info in sorted(sites.items())}


def compare(sim_folder: str, inproc_folder: str) -> list[str]:
    sim, inp = _by_key(sim_folder), _by_key(inproc_folder)
    keys = sorted(set(sim) & set(inp))
    lines = ["| mode | seed | Dice simulator | Dice in-process | in-process - simulator | eps per site, simulator "
             "| eps per site, in-process | max abs eps difference | unit, delta |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for mode in sorted({m for m, _ in keys}):
        seeds = [s for m, s in keys if m == mode]
        ds, di = [], []
        for seed in seeds:
            a, b = sim[(mode, seed)], inp[(mode, seed)]
            x, y = final_metric(a, "dice_mean"), final_metric(b, "dice_mean")
            ds.append(x)
            di.append(y)
            priv = b.get("privacy") or {}
            unit = "-" if not priv else f"{priv.get('unit') or 'update'}, {priv.get('delta')}"
            ea, eb = _eps(a), _eps(b)
            fmt = lambda e: " / ".join(f"{v:.6g}" for v in e.values()) or "-"  # noqa: E731
            gap = max((abs(ea[k] - eb[k]) for k in ea if k in eb), default=None) if set(ea) == set(eb) else None
            gap = "-" if gap is None else f"{gap:.3g}"
            lines.append(f"| {mode} | {seed} | {x:.4f} | {y:.4f} | {y - x:+.4f} | {fmt(ea)} | {fmt(eb)} | {gap} "
                         f"| {unit} |")
        if len(seeds) > 1:
            diff = statistics.mean(di) - statistics.mean(ds)
            summary.append(f"{mode}: mean Dice simulator {statistics.mean(ds):.4f} (std over seeds "
                           f"{statistics.stdev(ds):.4f}), in-process {statistics.mean(di):.4f} (std "
                           f"{statistics.stdev(di):.4f}); mean difference {diff:+.4f}")
    return lines + [""] + summary


def init_spread(sim_folder: str, n: int) -> list[str]:
    """In-process repeats of each simulator run on its own data with ``n`` other torch seeds."""
    import torch

    from adpfl._io import read_json
    from adpfl.experiments.compare import GRID_VARIANTS, parse_kv, run_overrides, variant_privacy
    from adpfl.experiments.inprocess import run_inprocess

    torch.set_num_threads(1)
    folder = Path(sim_folder)
    cfg = read_json(folder / "compare.json")
    lines = ["| mode | data seed | Dice simulator | in-process over init seeds: mean +- std (min .. max) | z |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for (mode, seed), run in sorted(_by_key(sim_folder).items()):
            dice = []
            for k in range(n):
                spec = {"mode": mode, "seed": 1000 + k, "epsilon": run["epsilon"], "run_id": f"{mode}_init{k}"}
                ov = run_overrides(spec, cfg["rounds"], dict(cfg["executor"]), cfg["delta"],
                                   parse_kv([f"{a}={b}" for a, b in (cfg.get("record_executor") or {}).items()]))
                ov["executor"]["data_seed"] = seed  # the simulator run's data; only the torch seed differs
                if mode in GRID_VARIANTS:
                    ov["privacy"].update(variant_privacy(mode, cfg["task"], ov))
                res = run_inprocess(spec, cfg["task"], cfg["rounds"], cfg["sites"], ov, folder / "data" / f"seed{seed}",
                                    Path(tmp) / spec["run_id"] / str(seed))
                dice.append(statistics.mean(v["dice_mean"] for v in res["final"].values()))
            x = final_metric(run, "dice_mean")
            m, sd = statistics.mean(dice), statistics.stdev(dice)
            lines.append(f"| {mode} | {seed} | {x:.4f} | {m:.4f} +- {sd:.4f} ({min(dice):.4f} .. {max(dice):.4f}) | "
                         f"{(x - m) / sd:+.2f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulator", required=True, help="comparison folder run by the simulator")
    ap.add_argument("--inprocess", required=True, help="the same grid run with --inprocess")
    ap.add_argument("--init-seeds", type=int, default=0, help="in-process repeats per simulator run (0: none)")
    args = ap.parse_args()
    print("\n".join(compare(args.simulator, args.inprocess)), flush=True)
    if args.init_seeds > 1:
        print("\n".join([""] + init_spread(args.simulator, args.init_seeds)))


if __name__ == "__main__":
    main()
