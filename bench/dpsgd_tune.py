"""Tune and ablate record-level DP-SGD on a PUBLIC synthetic tuning split (no site trains on it).

Why a separate split: tuning a private model's hyper-parameters on the sites' own records
spends privacy that no ledger accounts for. This script trains only on synthetic sites drawn
with their own data seed (``--data-seed``, default 1000; the comparison's sites use seeds
0, 1, 2: same generator and domain shifts, disjoint images), so the configuration it picks
costs the sites nothing. Each run is one ``adpfl compare --inprocess`` run
(:func:`adpfl.experiments.inprocess.run_inprocess`: the job's settings, SiteSession, the
record ledger enforcing the record-level epsilon, Opacus RDP), on ``--sites`` public sites.
``--task`` picks the task (skin2d: one record = one image; kidney3d / brain3d: one patient);
``--num-train`` / ``--num-val`` / ``--image-size`` default to the task's ``realistic`` preset
counts (:data:`adpfl.data.sizes.PRESETS`) and, for the 3D tasks, 32^3. Each row reports the
mean Dice over regions and the Dice of the task's key region (kidney3d: kidney+tumour+cyst,
brain3d: WT, skin2d: lesion).

Stages:

* ``search``: NP-FL (the reference) and DP-SGD over learning rate x expected Poisson batch,
  each at the same number of epochs (``--epochs-per-round`` x ``--rounds``; the per-round step
  cap is set per batch size so compute is equal); ``--epochs E ...`` adds an epochs axis (total
  epochs over the ``--rounds`` rounds; rows named ``..._e<E>``, one NP-FL reference per E, and
  each DP row's Dice / NP-FL is against the NP-FL row of the same epochs);
* ``ablation``: the chosen configuration (``--base NAME`` of a search row, plus
  ``--base-extra``) and the same with one lever changed at a time: augmentation
  multiplicity and EMA of the weights (removed when the chosen one has them, else added),
  large batches / virtual steps (expected batch 32), the ``dp`` network (-> ``standard``),
  and adaptive clipping (ADP-SGD's quantile clip, mode ``adpsgd``, against the chosen DP-SGD);
* ``diagnose``: where the chosen DP-SGD row (``--base``) loses against NP-FL, split into three
  gaps: ``npfl_same_schedule`` (NP-FL on the base row's network, expected batch, learning rate
  and step count: the network + schedule gap against the NP-FL reference), ``clip_only``
  (DP-SGD with the base row's clipping and a record-level target epsilon of
  ``--clip-only-epsilon``, default 1e6, i.e. almost no noise: the clipping gap; a
  DIAGNOSTIC, not a private configuration) and ``chosen`` (the base row itself: the noise gap);
* ``levers``: the base row with the settings of each ``--row NAME KEY=VALUE ...`` on top
  (``mode=adpsgd`` / ``mode=npfl`` changes the mode; ``dpsgd_target_epsilon=E`` a row's epsilon).

``--initial-checkpoint NETWORK=PATH ...`` warm-starts every row from the public checkpoint of its
network (``adpfl pretrain-public``; NP-FL rows train the ``standard`` network, DP rows ``dp``): the
search then tunes DP-SGD *fine-tuning* from that checkpoint, still on the public split only (the
checkpoint's own public sites ``public-N`` are other site indices than the split's ``site-N``).
Round 0 of each row's Dice by round is the checkpoint alone.

Each finished run is kept as ``<out>/<stage>/<name>.json`` (re-running skips it) and the
stage's table is rewritten as ``<out>/<stage>.md``::

    python bench/dpsgd_tune.py --out results/record_tune --stage search
    python bench/dpsgd_tune.py --out results/record_tune --stage ablation --base b256_lr0.003
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine  # noqa: E402
from adpfl._io import read_json, write_json_atomic  # noqa: E402
from adpfl.data.sizes import PRESETS  # noqa: E402
from adpfl.experiments.compare import parse_kv, run_overrides  # noqa: E402
from adpfl.experiments.inprocess import run_inprocess  # noqa: E402

#: the fixed levers of every DP row (De et al. 2022): the dp network, virtual steps of 64
DP_BASE = {"network": "dp", "dpsgd_physical_batch_size": 64}


def steps_cap(batch: int, num_train: int, epochs_per_round: float) -> int:
    """Optimizer steps per round that cover ``epochs_per_round`` epochs at expected batch ``batch``."""
    return max(1, round(epochs_per_round * num_train / batch))


def search_configs(lrs, batches, num_train: int, epochs_per_round: float,
                   epochs: list[float] | None = None, rounds: int = 4,
                   npfl_extra: dict | None = None) -> dict[str, tuple[str, dict]]:
    """NP-FL and DP-SGD over lr x batch; with ``epochs`` (totals over ``rounds``), over that axis
    too (names ``..._e<E>``; each row's ``local_epochs`` covers its per-round epochs, the step cap
    stops it there). ``npfl_extra``: the NP-FL rows' own settings (batch, learning rate, ...)."""
    axis = [(epochs_per_round, "")] if not epochs else [(e / rounds, f"_e{e:g}") for e in epochs]
    cfgs = {}
    for epr, suffix in axis:
        fixed = {"local_epochs": max(1, math.ceil(epr))} if suffix else {}
        npfl = dict(fixed, **{"batch_size": 8, **(npfl_extra or {})})
        npfl.setdefault("max_steps_per_round", steps_cap(int(npfl["batch_size"]), num_train, epr))
        cfgs[f"npfl{suffix}"] = ("npfl", npfl)
        for b in batches:
            for lr in lrs:
                cfgs[f"b{b}_lr{lr:g}{suffix}"] = ("dpsgd", dict(DP_BASE, **fixed, batch_size=b, learning_rate=lr,
                                                                max_steps_per_round=steps_cap(b, num_train, epr)))
    return cfgs


def row_epochs(extra: dict, num_train: int, rounds: int) -> float:
    """Epochs in all that a row's settings train (its steps a round x expected batch over the
    rounds), to the nearest quarter epoch (the step caps round: 52 steps of 32 over 4 rounds are
    2.02 epochs). A round trains at most ``local_epochs`` epochs whatever its step cap, as the
    trainers do (``int(n / batch)`` steps an epoch)."""
    batch = int(extra["batch_size"])
    steps = int(extra["max_steps_per_round"])
    steps = min(steps, int(extra.get("local_epochs", 1)) * max(1, num_train // batch))
    return round(4 * rounds * steps * batch / num_train) / 4


def ablation_configs(base: dict, num_train: int, epochs_per_round: float) -> dict[str, tuple[str, dict]]:
    """The chosen configuration and one lever removed at a time (same epochs)."""
    cfgs = {"chosen": ("dpsgd", dict(base))}
    # a lever the chosen configuration has is taken away; one it lacks is added
    if int(base.get("dpsgd_augmult", 1)) > 1:
        cfgs["no_augmult"] = ("dpsgd", dict(base, dpsgd_augmult=1))
    else:
        cfgs["with_augmult2"] = ("dpsgd", dict(base, dpsgd_augmult=2))
    if float(base.get("dpsgd_ema_decay", 0.0)) > 0:
        cfgs["no_ema"] = ("dpsgd", dict(base, dpsgd_ema_decay=0.0))
    else:
        cfgs["with_ema0.8"] = ("dpsgd", dict(base, dpsgd_ema_decay=0.8))
    small = dict(base, batch_size=32, max_steps_per_round=steps_cap(32, num_train, epochs_per_round))
    small.pop("dpsgd_physical_batch_size", None)
    cfgs["small_batch_32"] = ("dpsgd", small)
    cfgs["standard_network"] = ("dpsgd", dict(base, network="standard"))
    cfgs["adaptive_clip_adpsgd"] = ("adpsgd", dict(base))
    return cfgs


def diagnose_configs(base: dict, clip_only_epsilon: float = 1e6) -> dict[str, tuple[str, dict]]:
    """The gap decomposition of a chosen DP-SGD row (see the module docstring): NP-FL with the
    row's network, batch, learning rate and steps; the row with (nearly) no noise; the row."""
    record_only = {k: v for k, v in base.items() if k.startswith("dpsgd_")}
    same = {k: v for k, v in base.items() if k not in record_only}
    return {"npfl_same_schedule": ("npfl", same),
            "clip_only": ("dpsgd", dict(base, dpsgd_target_epsilon=float(clip_only_epsilon))),
            "chosen": ("dpsgd", dict(base))}


def lever_configs(base: dict, rows: list[list[str]]) -> dict[str, tuple[str, dict]]:
    """``{name: (mode, base + the row's settings)}`` for each ``[NAME, KEY=VALUE, ...]`` of ``rows``."""
    cfgs = {}
    for row in rows:
        if not row:
            raise SystemExit("--row needs a name and KEY=VALUE settings")
        settings = parse_kv(row[1:])
        mode = str(settings.pop("mode", "dpsgd"))
        cfgs[row[0]] = (mode, dict(base, **settings))
    return cfgs


def with_initial_checkpoints(cfgs: dict[str, tuple[str, dict]],
                             checkpoints: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """Each row with ``initial_checkpoint`` = the checkpoint of its network (``network`` setting,
    default ``standard``); no checkpoints: the rows unchanged. A row whose network has none is an error."""
    if not checkpoints:
        return cfgs
    out = {}
    for name, (mode, extra) in cfgs.items():
        network = extra.get("network", "standard")
        if network not in checkpoints:
            raise SystemExit(f"--initial-checkpoint: row {name} trains the {network!r} network, but only "
                             f"{sorted(checkpoints)} checkpoint(s) were given (NETWORK=PATH)")
        out[name] = (mode, dict(extra, initial_checkpoint=str(checkpoints[network])))
    return out


def run_one(name: str, mode: str, extra: dict, args, stage_dir: Path) -> dict:
    path = stage_dir / f"{name}.json"
    if path.is_file():
        return read_json(path)
    # the row's own settings go to the executor of EVERY mode (as a record-executor they would
    # skip NP-FL, whose reference then trained a whole epoch per round, uncapped)
    executor = {"data_size": "realistic", "num_train": args.num_train, "num_val": args.num_val,
                "image_size": args.image_size, "local_epochs": max(1, math.ceil(args.epochs_per_round)),
                "hd95": True, **parse_kv(args.executor), **extra}
    # a row may carry its own record-level target (diagnose's clip_only row); compare sets it from spec
    epsilon = float(extra.get("dpsgd_target_epsilon", args.epsilon))
    spec = {"mode": mode, "seed": args.data_seed, "epsilon": None if mode == "npfl" else epsilon,
            "run_id": f"tune_{name}"}
    overrides = run_overrides(spec, args.rounds, executor, args.delta)
    run_dir = stage_dir / name
    if run_dir.exists():  # an unfinished attempt: its ledgers must not count against the rerun
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    res = run_inprocess(spec, args.task, args.rounds, args.sites, overrides, Path(args.data_root), run_dir)
    dice = [m.get("dice_mean") for m in res["final"].values()]
    key = [m.get(f"dice_{key_region(args.task)}") for m in res["final"].values()]
    hd = [m.get("hd95_lesion") for m in res["final"].values()]
    per_round, key_round = {}, {}
    for site_curves in res["curves"].values():
        for r, v in (site_curves.get("dice_mean") or {}).items():
            per_round.setdefault(int(r), []).append(v)
        for r, v in (site_curves.get(f"dice_{key_region(args.task)}") or {}).items():
            key_round.setdefault(int(r), []).append(v)
    rec = {"name": name, "mode": mode, "extra": extra, "epochs": row_epochs(extra, args.num_train, args.rounds),
           "dice": sum(dice) / len(dice),
           "dice_key": (sum(key) / len(key)) if all(k is not None for k in key) else None,
           "hd95": (sum(hd) / len(hd)) if all(h is not None for h in hd) else None,
           "dice_by_round": {r: sum(v) / len(v) for r, v in sorted(per_round.items())},
           "dice_key_by_round": {r: sum(v) / len(v) for r, v in sorted(key_round.items())},
           "epsilon": ({s: [p["epsilon_rdp"], p["epsilon_prv"]] for s, p in res["privacy"]["sites"].items()}
                       if res["privacy"] else None),
           "z": ({s: p["history"][-1][0] for s, p in res["privacy"]["sites"].items()} if res["privacy"] else None),
           "wall_s": time.perf_counter() - t0}
    write_json_atomic(path, rec, indent=1)
    return rec


def key_region(task: str) -> str:
    from adpfl.tasks.base import get_task

    return get_task(task).key_region


def _num(v) -> str:
    """An epsilon in the table; ``-`` where an accountant gave none (PRV at a diagnostic epsilon of 1e6)."""
    return "-" if v is None else f"{v:.3f}"


def npfl_references(npfl_rows: list[dict]) -> tuple[dict, dict]:
    """The NP-FL reference of each epoch count: ``({epochs: Dice}, {epochs: key-region Dice})`` of
    the NP-FL row with the highest final Dice among those of that many epochs (the search's and
    the stage's own), so a private row is never measured against a weaker NP-FL than was run."""
    best: dict = {}
    for rec in npfl_rows:
        e = rec.get("epochs")
        if e not in best or rec["dice"] > best[e]["dice"]:
            best[e] = rec
    return {e: r["dice"] for e, r in best.items()}, {e: r.get("dice_key") for e, r in best.items()}


def write_table(stage: str, rows: list[dict], args, out: Path, wall: float) -> Path:
    npfl_rows = [read_json(f) for f in sorted((out / "search").glob("npfl*.json"))]
    npfl_rows += [r for r in rows if r["mode"] == "npfl"]
    refs, refs_key = npfl_references(npfl_rows)
    epochs = sorted({r.get("epochs") for r in rows if r.get("epochs") is not None})
    unit = "image" if args.task == "skin2d" else "patient"
    size = "x".join([str(args.image_size)] * (2 if args.task == "skin2d" else 3))
    lines = [f"# DP-SGD {stage} on the public tuning split", "",
             f"Command: `python bench/dpsgd_tune.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {machine()}; shared 2-core VM (other jobs running), niceness {os.nice(0)}. Wall time of this "
             f"invocation {wall / 60:.1f} min (finished rows of earlier invocations are reused).", "",
             f"Data: the PUBLIC tuning split, synthetic {args.task} with data seed {args.data_seed} ({args.sites} "
             f"site(s), {args.num_train} training / {args.num_val} validation {unit}s at {size}); "
             "no comparison site (data seeds 0, 1, 2) trains on it, so this tuning spends none of their budget. "
             f"{args.rounds} rounds; epochs in all per row (its step cap x batch over the rounds): "
             f"{', '.join(f'{e:g}' for e in epochs)}; Dice / NP-FL against the best NP-FL row (highest final Dice) "
             "of the same epochs. "
             f"Privacy: record level (one {unit}), target epsilon {args.epsilon:g}, delta {args.delta:g}, "
             "enforced by the site's ledger (Opacus RDP; PRV reported). Final Dice: mean over regions; "
             f"key region: {key_region(args.task)}.", "",
             *(["Warm start: every row starts from the public checkpoint of its network ("
                + ", ".join(f"{k}: `{os.path.relpath(v)}`" for k, v in sorted(args.checkpoints.items()))
                + "); round 0 of Dice by round is the checkpoint alone.", ""] if args.checkpoints else []),
             f"| Config | Mode | Settings | Final Dice | Dice {key_region(args.task)} | HD95 lesion (px) | "
             "Dice / NP-FL | "
             f"{key_region(args.task)} / NP-FL | Dice by round | eps RDP / PRV per site | z | Wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if not r["epsilon"] else "; ".join(f"{s} {_num(a)} / {_num(b)}" for s, (a, b) in r["epsilon"].items())
        z = "-" if not r["z"] else ", ".join(f"{v:.3f}" for v in r["z"].values())
        ref = refs.get(r.get("epochs"))
        ref_key = refs_key.get(r.get("epochs"))
        ratio = f"{100 * r['dice'] / ref:.1f}%" if ref else "-"
        dk = r.get("dice_key")
        key_ratio = f"{100 * dk / ref_key:.1f}%" if (ref_key and dk is not None) else "-"
        dk_s = "-" if dk is None else f"{dk:.3f}"
        curve = " ".join(f"{v:.2f}" for v in r["dice_by_round"].values())
        if r.get("dice_key_by_round"):
            curve += " (key: " + " ".join(f"{v:.2f}" for v in r["dice_key_by_round"].values()) + ")"
        hd95 = "-" if r["hd95"] is None else f"{r['hd95']:.2f}"
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["extra"].items()))
        lines.append(f"| {r['name']} | {r['mode']} | {settings} | {r['dice']:.3f} | {dk_s} | {hd95} | {ratio} | "
                     f"{key_ratio} | {curve} | "
                     f"{eps} | {z} | {r['wall_s']:.0f} |")
    path = out / f"{stage}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/record_tune")
    ap.add_argument("--stage", choices=["search", "ablation", "diagnose", "levers"], default="search")
    ap.add_argument("--data-root", default="", help="default: <out>/data (synthetic sites generated there)")
    ap.add_argument("--data-seed", type=int, default=1000, help="the public split's seed (sites use 0, 1, 2)")
    ap.add_argument("--sites", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs-per-round", type=float, default=0.25)
    ap.add_argument("--task", choices=sorted(PRESETS["realistic"]), default="skin2d")
    ap.add_argument("--epochs", type=float, nargs="*", default=[],
                    help="search: epochs axis (total epochs over --rounds; rows ..._e<E>)")
    ap.add_argument("--num-train", type=int, default=None, help="default: the task's realistic preset")
    ap.add_argument("--num-val", type=int, default=None, help="default: the task's realistic preset")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epsilon", type=float, default=8.0, help="record-level target epsilon (one image)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--base", default="", help="ablation: the search row to start from")
    ap.add_argument("--base-extra", nargs="*", default=[], metavar="KEY=VALUE", help="ablation: added to --base")
    ap.add_argument("--executor", nargs="*", default=[], metavar="KEY=VALUE", help="executor settings of every row")
    ap.add_argument("--clip-only-epsilon", type=float, default=1e6,
                    help="diagnose: the clip_only row's record-level target epsilon (a diagnostic, not private)")
    ap.add_argument("--row", nargs="+", action="append", default=[], metavar="NAME_OR_KEY=VALUE",
                    help="levers: one row, NAME then KEY=VALUE settings on top of --base (repeatable)")
    ap.add_argument("--only", nargs="*", default=[], help="run only these config names")
    ap.add_argument("--initial-checkpoint", nargs="*", default=[], metavar="NETWORK=PATH",
                    help="warm start: each row from the public checkpoint of its network (adpfl pretrain-public)")
    ap.add_argument("--npfl-extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="search: settings of the NP-FL reference row (default batch 8, one round's epochs)")
    args = ap.parse_args()
    n_train, n_val, _ = PRESETS["realistic"][args.task]
    args.num_train = n_train if args.num_train is None else args.num_train
    args.num_val = n_val if args.num_val is None else args.num_val
    args.checkpoints = {k: str(Path(v).resolve()) for k, v in parse_kv(args.initial_checkpoint).items()}
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    args.data_root = args.data_root or str(out / "data")
    stage_dir = out / args.stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    if args.stage == "search":
        cfgs = search_configs(args.lrs, args.batches, args.num_train, args.epochs_per_round, args.epochs, args.rounds,
                              parse_kv(args.npfl_extra))
    else:
        if not args.base:
            raise SystemExit(f"--stage {args.stage} needs --base NAME (a finished search row)")
        base_path = out / "search" / f"{args.base}.json"
        if not base_path.is_file():
            raise SystemExit(f"--base {args.base}: {base_path} does not exist (run the search first)")
        base = dict(read_json(base_path)["extra"], **parse_kv(args.base_extra))
        if args.stage == "ablation":
            cfgs = ablation_configs(base, args.num_train, args.epochs_per_round)
        elif args.stage == "diagnose":
            cfgs = diagnose_configs(base, args.clip_only_epsilon)
        else:
            cfgs = lever_configs(base, args.row)
        if args.stage != "levers" and not args.base_extra and not (stage_dir / "chosen.json").is_file():
            # the chosen configuration IS the search row: its finished run is reused, not re-run
            write_json_atomic(stage_dir / "chosen.json", dict(read_json(base_path), name="chosen"), indent=1)
    cfgs = with_initial_checkpoints(cfgs, args.checkpoints)
    print(f"{machine()}\n{args.stage}: {len(cfgs)} configs -> {stage_dir}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for name, (mode, extra) in cfgs.items():
        if args.only and name not in args.only:
            continue
        rec = run_one(name, mode, extra, args, stage_dir)
        rows.append(rec)
        print(f"{name}: Dice {rec['dice']:.3f} (key region {rec.get('dice_key')}), "
              f"by round {json.dumps(rec['dice_by_round'])}, "
              f"eps {rec['epsilon']}, {rec['wall_s']:.0f} s", flush=True)
        write_table(args.stage, rows, args, out, time.perf_counter() - t0)
    print((out / f"{args.stage}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
