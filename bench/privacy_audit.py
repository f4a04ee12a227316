"""End-to-end audits of the two release paths, intact and deliberately broken.

    python bench/privacy_audit.py [--releases 1000] [--adpfl-releases 2000] [--clip-releases 300]
                                  [--filters DP-FL ADP-FL ADP-FL-public]
                                  [--runs 5] [--skip-dpsgd] [--out docs/results/privacy_audit]

(a) The FLARE result filter ``ADPFilter.process`` with a FLContext and ledgers on disk
    (``adpfl.evaluation.filter_audit``, likelihood-ratio statistic), three configurations:
    ``DP-FL`` (z = 2, C = 1, ``--releases`` per side); ``ADP-FL`` (random mask, keep 0.5,
    fixed clip C = 1, adaptive noise schedule planned so its z runs from about 3.0 down to
    2.14); ``ADP-FL-public`` (the jobs' own ADP-FL policy: ``topk_public`` mask with the
    canary on the publicly top-ranked coordinates, adaptive clip percentile 0.5, learning
    rate 0.2, starting at C = 1; indicator noise 10 because it must exceed the schedule's
    largest z; same schedule) -- ``--adpfl-releases`` per side for both;
    ``--clip-releases`` per side for every clipping-skipped audit.
(b) The DP-SGD trainer ``DPSGDTrainer.train`` as shipped, Poisson subsampling included
    (``adpfl.evaluation.dpsgd_audit``): the tiny dataset (n = 40 synthetic skin records, 16x16)
    plus ``--canaries`` canary records per run (half in), expected batch 16 over the declared
    public count (q about 0.11), ``--rounds`` rounds of one SGD step each, each round reserved
    and settled in a record ledger on disk; claimed = the ledger's epsilon for the whole run
    (target 2, delta 1e-5, Opacus RDP); ``--runs`` runs pooled, top ``--guesses`` guesses.
    ``--modes dpsgd adpsgd``: fixed calibrated noise, and ADP-SGD (adaptive per-sample clip,
    progress-driven noise schedule). ``--name`` names the result file.
``--simulate`` instead runs the same held-out bound on a numpy simulation of the canary game
(likelihood-ratio statistic, noise / 4, z uniform in the schedule's range or fixed) and
prints how often it catches at several release counts (the trial counts of the tests and
of this bench were chosen with it).
Each intact path must give a lower bound <= its claimed epsilon; each broken one (noise
scaled by 1/4 behind the accountant, clipping skipped; ``tests/audit_breakage.py``) must
give a bound above it. Noise from the OS (not seeded). Writes ``audit.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    ap.add_argument("--releases", type=int, default=1000, help="DP-FL releases per side")
    ap.add_argument("--adpfl-releases", type=int, default=2000, help="ADP-FL releases per side")
    ap.add_argument("--clip-releases", type=int, default=300,
                    help="releases per side of the clipping-skipped audits (the breakage is gross)")
    ap.add_argument("--runs", type=int, default=4, help="DP-SGD audit runs pooled (each with its own canaries)")
    ap.add_argument("--canaries", type=int, default=200, help="canary records per DP-SGD audit run")
    ap.add_argument("--rounds", type=int, default=20, help="rounds (one step each) of a DP-SGD audit run")
    ap.add_argument("--guesses", type=int, default=80, help="top scores guessed 'in' (fixed before the runs)")
    ap.add_argument("--modes", nargs="*", default=["dpsgd", "adpsgd"], help="record-level trainers to audit")
    ap.add_argument("--name", default="audit.md", help="result file name inside --out")
    ap.add_argument("--filters", nargs="*", default=["DP-FL", "ADP-FL", "ADP-FL-public"], help="filter audits to run")
    ap.add_argument("--skip-dpsgd", action="store_true")
    ap.add_argument("--simulate", action="store_true", help="only the numpy catch-rate simulation")
    ap.add_argument("--simulate-dpsgd", action="store_true",
                    help="only the numpy simulation of the subsampled DP-SGD canary game (noise / 4)")
    ap.add_argument("--out", default="docs/results/privacy_audit")
    a = ap.parse_args(argv)
    if a.simulate:
        return simulate()
    if a.simulate_dpsgd:
        return simulate_dpsgd()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from _machine import run_header
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.evaluation.dpsgd_audit import audit_dpsgd_trainer
    from adpfl.evaluation.filter_audit import audit_filter
    from adpfl.privacy.analysis import epsilon_rdp
    from audit_breakage import BREAKAGES

    head = run_header("privacy_audit.py", argv)
    print(head, flush=True)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    per_filter = 50
    # planned over twice the releases each filter makes: the schedule may spend ahead of the
    # even share (noise_min_factor), and must never refuse inside the audit
    schedule = dict(target_epsilon=epsilon_rdp([2.0] * 2 * per_filter, 1e-5), planned_rounds=2 * per_filter)
    filters = {
        "DP-FL": ("DP-FL z=2, C=1", dict(mode="dpfl", noise_multiplier=2.0, clip_norm=1.0, clip_learning_rate=0.0,
                                         delta=1e-5), False),
        "ADP-FL": ("ADP-FL keep 0.5 random, C=1 fixed, adaptive z",
                   dict(mode="adpfl", keep_fraction=0.5, mask_policy="random", clip_norm=1.0, clip_learning_rate=0.0,
                        delta=1e-5, **schedule), False),
        "ADP-FL-public": ("ADP-FL keep 0.5 topk_public (canary on the public top-k), adaptive clip, adaptive z",
                          dict(mode="adpfl", keep_fraction=0.5, mask_policy="topk_public", clip_norm=1.0,
                               clip_percentile=0.5, clip_learning_rate=0.2, clip_indicator_noise=10.0, delta=1e-5,
                               **schedule), True),
    }
    lines = ["| path | configuration | breakage | z reported (min-max) | claimed epsilon (filter: one release; "
             "DP-SGD: the record ledger, whole run; delta 1e-5, Opacus RDP) | empirical lower bound (95 %) "
             "| projection-statistic bound (diagnostic) "
             "| cap | trials | caught | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(path, conf, brk, r, trials, zr="2", proj="-"):
        caught = r["epsilon_lb"] > r["epsilon_claimed"]
        lines.append(f"| {path} | {conf} | {brk} | {zr} | {r['epsilon_claimed']:.3f} | {r['epsilon_lb']:.3f} | {proj} "
                     f"| {r['epsilon_cap']:.2f} | {trials} | {'**yes**' if caught else 'no'} | {r['seconds']:.0f} |")
        print(lines[-1], flush=True)

    for key in a.filters:
        conf, args, aligned = filters[key]
        for brk, make in [("none", None), *BREAKAGES["update"].items()]:
            n = a.releases if key == "DP-FL" else a.adpfl_releases
            n = min(n, a.clip_releases) if brk == "clipping skipped" else n
            with tempfile.TemporaryDirectory() as tmp, (make() if make else contextlib.nullcontext()):
                r = audit_filter(args, n, ledger_dir=tmp, releases_per_filter=per_filter, align_public=aligned)
            zr = f"{r['noise_multiplier_min']:.2f}-{r['noise_multiplier_max']:.2f}"
            row("ADPFilter.process", conf, brk, r, f"{r['releases']} releases, ledger {r['ledger_entries']} entries",
                zr, f"{r['epsilon_lb_projection']:.3f}")
    if a.skip_dpsgd:
        return _write(out, head, lines, t_start, a.name)
    with tempfile.TemporaryDirectory() as root:
        ensure_site_data("skin2d", root, "site-1", num_train=40, num_val=2, seed=0, size=16)
        dl = load_site_datalist(root, "site-1", task="skin2d")
        for mode in a.modes:
            for brk, make in [("none", None), *BREAKAGES["dpsgd"].items()]:
                with (make() if make else contextlib.nullcontext()):
                    r = audit_dpsgd_trainer(dl, adaptive=mode == "adpsgd", runs=a.runs, rounds=a.rounds,
                                            canaries_per_run=a.canaries, guesses_in=a.guesses, guesses_out=0)
                name = "ADP-SGD (adaptive clip + noise schedule)" if mode == "adpsgd" else "DP-SGD (calibrated z)"
                conf = (f"{name}, n={r['n_real']} real + {a.canaries} canary records per run, "
                        f"q={r['sample_rate']:.3g}, {r['steps']} steps ({r['rounds']} rounds), target eps 2, "
                        "C=1 start, 16x16")
                row("DPSGDTrainer.train", conf, brk, r,
                    f"{r['canaries']} canaries ({r['canaries_in']} in), {r['correct']}/{r['guesses']} correct; "
                    f"ledger {r['ledger_entries']} entries per run",
                    f"{r['noise_multiplier_min']:.2f}-{r['noise_multiplier_max']:.2f}")
    return _write(out, head, lines, t_start, a.name)


def simulate(reps: int = 200, seed: int = 0) -> int:
    """Catch rate of the held-out bound under noise / 4 in the canary game, simulated: per
    release ``y ~ N(+-1, (z * 2 / 4)^2)``, statistic ``2 y / sigma^2`` (sigma = z * 2, as
    reported), claim = epsilon of the smallest z (Opacus RDP, delta 1e-5)."""
    import numpy as np

    from adpfl.evaluation.audit import epsilon_lower_bound
    from adpfl.privacy.analysis import epsilon_rdp

    rng = np.random.default_rng(seed)
    for zlo, zhi, counts in ((2.14, 2.99, (600, 1000, 1500, 2000)), (2.0, 2.0, (500, 600, 1000))):
        claim = float(epsilon_rdp([zlo], 1e-5))
        for n in counts:
            caught = 0
            for _ in range(reps):
                s = []
                for sign in (1.0, -1.0):
                    sigma = 2.0 * rng.uniform(zlo, zhi, n)
                    y = sign + rng.standard_normal(n) * sigma * 0.25
                    s.append(2.0 * y / sigma**2)
                caught += epsilon_lower_bound(s[0], s[1], 1e-5)["epsilon_lb"] > claim
            print(f"z in [{zlo}, {zhi}], claim {claim:.3f}: {n} releases per side, noise / 4 caught in "
                  f"{caught / reps:.0%} of {reps} simulated audits", flush=True)
    return 0


def simulate_dpsgd(reps: int = 40, seed: int = 0) -> int:
    """The subsampled DP-SGD canary game in numpy, under noise / 4: per round an in-canary
    moves by ``Bernoulli(q) + N(0, (z / 4)^2)`` clipped joins (an out-canary by the noise
    only), z calibrated to epsilon 2 over T steps at rate q (Opacus RDP, delta 1e-5); the
    audit's statistic (Poisson-mixture log-likelihood ratio at ``factor`` times the claimed
    noise) and bound. Prints the mean / min bound and how often it exceeds the claim."""
    import numpy as np
    from opacus.accountants.utils import get_noise_multiplier

    from adpfl.evaluation.dpsgd_audit import mixture_log_ratio, one_run_epsilon_lower_bound

    rng = np.random.default_rng(seed)
    for q, steps, m, guesses, factor in ((0.114, 20, 800, 80, 1.0), (0.114, 20, 800, 80, 0.5),
                                         (0.114, 20, 200, 40, 1.0), (0.114, 20, 200, 40, 0.5),
                                         (0.114, 20, 200, 40, 0.25)):
        z = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
        lbs = []
        for _ in range(reps):
            member = rng.random(m) < 0.5
            joins = (rng.random((m, steps)) < q) & member[:, None]
            u = joins + rng.normal(0.0, z / 4, (m, steps))
            s = mixture_log_ratio(u, 1, q, (factor * z) ** 2).sum(axis=1)
            top = np.argsort(-s)[:guesses]
            lbs.append(one_run_epsilon_lower_bound(int(member[top].sum()), guesses, m, 1e-5))
        lbs = np.asarray(lbs)
        print(f"q {q}, {steps} steps, z {z:.2f} (claim 2.0), {m} canaries, top {guesses}, "
              f"statistic noise factor {factor}: bound mean {lbs.mean():.2f}, min {lbs.min():.2f}, "
              f"above the claim in {(lbs > 2.0).mean():.0%} "
              f"of {reps} simulated audits", flush=True)
    return 0


def _write(out: Path, head: str, lines: list[str], t_start: float, name: str = "audit.md") -> int:
    tail = f"wall {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f}"
    print(tail, flush=True)
    (out / name).write_text(head + "\n\n" + "\n".join(lines) + "\n\n" + tail + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
