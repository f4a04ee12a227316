"""Time one privacy release of a 6.5M-parameter update on CPU (adpfl config).

Usage: python bench/bench_filter_cpu.py [--params 6500000] [--repeats 10]
Prints the median ms per release (tensor work + RDP schedule/accounting; PRV tracking
is timed separately since it is bookkeeping that grows with distinct multipliers).
"""

import argparse
import statistics
import time

import torch

from adpfl.privacy import PrivacyConfig, PrivacyLedger, PrivacyPipeline


def make_update(n: int) -> dict:
    shapes = [(64, 32, 3, 3, 3), (64,), (128, 64, 3, 3, 3), (128,)]
    upd, used = {}, 0
    for i, s in enumerate(shapes):
        t = torch.randn(s) * 1e-3
        upd[f"block{i}.weight"] = t
        used += t.numel()
    upd["head.weight"] = torch.randn(n - used) * 1e-3
    return upd


def bench(n: int, repeats: int, track_prv: bool, keep: float) -> list[float]:
    cfg = PrivacyConfig(mode="adpfl", keep_fraction=keep, mask_policy="random", clip_norm=1.0,
                        clip_learning_rate=0.2, clip_indicator_noise=30.0, target_epsilon=8.0, delta=1e-5,
                        planned_rounds=50, track_prv=track_prv)
    pipe = PrivacyPipeline(cfg, PrivacyLedger(delta=1e-5))
    update = make_update(n)
    pipe.release(update, round_index=0)  # warm-up
    times = []
    for r in range(1, repeats + 1):
        t0 = time.perf_counter()
        pipe.release(update, round_index=r)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=6_500_000)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, params {args.params}")
    for keep in (0.1, 1.0):
        t = bench(args.params, args.repeats, track_prv=False, keep=keep)
        print(f"adpfl keep_fraction={keep}: median {statistics.median(t):.1f} ms per release "
              f"(min {min(t):.1f}, max {max(t):.1f}; RDP accounting, track_prv=False)")
    t = bench(args.params, args.repeats, track_prv=True, keep=0.1)
    print(f"adpfl keep_fraction=0.1 with PRV tracking: median {statistics.median(t):.1f} ms per release")


if __name__ == "__main__":
    main()
