"""End-to-end audits of the two release paths, intact and deliberately broken.

    python bench/privacy_audit.py [--releases 1000] [--adpfl-releases 150] [--filters DP-FL ADP-FL]
                                  [--runs 5] [--out docs/results/privacy_audit]

(a) The FLARE result filter ``ADPFilter.process`` with a FLContext and ledgers on disk
    (``adpfl.evaluation.filter_audit``): DP-FL (z = 2, C = 1) and ADP-FL (random mask,
    keep 0.5, fixed clip, schedule planned so z is about 2), ``--releases`` /
    ``--adpfl-releases`` per side.
(b) The DP-SGD trainer ``DPSGDTrainer.train`` on n = 40 synthetic skin records, batch 40
    (q = 1), one SGD step per run, z = 2, C = 1, ``--runs`` runs x 200 Dirac-gradient
    canaries, top-100 guesses (``adpfl.evaluation.dpsgd_audit``).
Each intact path must give a lower bound <= its claimed epsilon; each broken one (noise
scaled by 1/4 behind the accountant, clipping skipped; ``tests/audit_breakage.py``) must
give a bound above it. Writes ``audit.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--releases", type=int, default=1000)
    ap.add_argument("--adpfl-releases", type=int, default=150)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--filters", nargs="*", default=["DP-FL", "ADP-FL"], help="filter audits to run")
    ap.add_argument("--adpfl-breakages", action="store_true",
                    help="also audit ADP-FL broken (needs >= 600 releases per side to catch noise / 4)")
    ap.add_argument("--out", default="docs/results/privacy_audit")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from _machine import machine
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.evaluation.dpsgd_audit import audit_dpsgd_trainer
    from adpfl.evaluation.filter_audit import audit_filter
    from adpfl.privacy.analysis import epsilon_rdp
    from audit_breakage import BREAKAGES

    print("machine:", machine(), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    per_filter = 100
    filters = {
        "DP-FL z=2, C=1": dict(mode="dpfl", noise_multiplier=2.0, clip_norm=1.0, clip_learning_rate=0.0, delta=1e-5),
        "ADP-FL keep 0.5 random, C=1": dict(
            mode="adpfl", keep_fraction=0.5, mask_policy="random", clip_norm=1.0, clip_learning_rate=0.0,
            # planned over twice the releases each filter makes: the schedule may spend ahead of
            # the even share (noise_min_factor), and must never refuse inside the audit
            target_epsilon=epsilon_rdp([2.0] * 2 * per_filter, 1e-5), planned_rounds=2 * per_filter, delta=1e-5),
    }
    lines = ["| path | configuration | breakage | claimed epsilon (one release / one round; delta 1e-5, Opacus RDP) "
             "| empirical lower bound (95 %) | cap | trials | caught | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def row(path, conf, brk, r, trials):
        caught = r["epsilon_lb"] > r["epsilon_claimed"]
        lines.append(f"| {path} | {conf} | {brk} | {r['epsilon_claimed']:.3f} | {r['epsilon_lb']:.3f} "
                     f"| {r['epsilon_cap']:.2f} | {trials} | {'**yes**' if caught else 'no'} | {r['seconds']:.0f} |")
        print(lines[-1], flush=True)

    for conf, args in filters.items():
        if conf.split(" ")[0] not in a.filters:
            continue
        for brk, make in [("none", None), *BREAKAGES["update"].items()]:
            if conf.startswith("ADP") and (brk == "clipping skipped" or (make and not a.adpfl_breakages)):
                continue
            # the adaptive schedule re-plans at every release (about 0.2 s each here): fewer trials
            n = a.releases if conf.startswith("DP-FL") else a.adpfl_releases
            with tempfile.TemporaryDirectory() as tmp:
                if make is None:
                    r = audit_filter(args, n, ledger_dir=tmp, releases_per_filter=per_filter)
                else:
                    with make():
                        r = audit_filter(args, n, ledger_dir=tmp, releases_per_filter=per_filter)
            row("ADPFilter.process", conf, brk, r, f"{r['releases']} releases, ledger {r['ledger_entries']} entries")
    with tempfile.TemporaryDirectory() as root:
        ensure_site_data("skin2d", root, "site-1", num_train=40, num_val=2, seed=0, size=16)
        dl = load_site_datalist(root, "site-1", task="skin2d")
        for brk, make in [("none", None), *BREAKAGES["dpsgd"].items()]:
            t0 = time.perf_counter()
            if make is None:
                r = audit_dpsgd_trainer(dl, runs=a.runs)
            else:
                with make():
                    r = audit_dpsgd_trainer(dl, runs=a.runs)
            r["seconds"] = time.perf_counter() - t0
            row("DPSGDTrainer.train", f"n={r['n_train']}, q={r['sample_rate']:g}, z=2, C=1, 16x16, 1 step", brk, r,
                f"{r['canaries']} canaries ({r['canaries_in']} in), {r['correct']}/{r['guesses']} correct")
    (out / "audit.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
