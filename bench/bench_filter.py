"""Cost of one privacy release (PrivacyPipeline.release, the ADPFilter's work) vs update size.

Usage: python bench/bench_filter.py [--sizes 1e6 3e6 10e6 30e6] [--repeats 3] [--devices cpu cuda]
                                    [--round-time-s SECONDS]

Per size and setting (DP-FL: dense clip + noise; ADP-FL: the job defaults, keep 0.5 top-k
on public scores + adaptive clip + adaptive noise) it prints the median ms per release, the
memory-bandwidth floor and the ratio to it, the sparse wire encoding's extra ms (ADP-FL), and,
with --round-time-s, the release as a fraction of a round's wall time.

Floor: the time of one torch ``copy_`` of the update (reads and writes 4 bytes per
parameter) at the measured copy bandwidth: the least any release that reads the update and
writes a released update can cost. Accounting is RDP only (track_prv=False); PRV
bookkeeping is reported once separately since it does not grow with the update size.
"""

import argparse
import statistics
import time

import torch

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.flare.sparse import encode_release
from adpfl.modes import UPDATE_MODES
from adpfl.privacy import PrivacyConfig, PrivacyLedger, PrivacyPipeline

SETTINGS = {
    "dpfl": dict(mode="dpfl", keep_fraction=1.0, clip_norm=2.0, clip_learning_rate=0.0, noise_multiplier=None),
    "adpfl": dict(mode="adpfl", keep_fraction=0.5, mask_policy="topk_public", clip_norm=2.0, clip_learning_rate=0.2,
                  clip_indicator_noise=1.0, clip_percentile=0.5, noise_min_factor=0.5, noise_max_factor=1.5),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_update(n: int, device) -> dict:
    # a few conv-like tensors plus one big one, like a UNet's state dict
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(32, 16, 3, 3), (32,), (64, 32, 3, 3), (64,)]
    upd, used = {}, 0
    for i, s in enumerate(shapes):
        upd[f"block{i}.weight"] = torch.randn(s, generator=g) * 1e-3
        used += upd[f"block{i}.weight"].numel()
    upd["head.weight"] = torch.randn(n - used, generator=g) * 1e-3
    return {k: v.to(device) for k, v in upd.items()}


def copy_floor_ms(n: int, device, repeats: int) -> tuple:
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    ts = []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1000)
    ms = statistics.median(ts)
    gbps = 2 * 4 * n / (ms / 1000) / 1e9
    return ms, gbps


def time_release(setting: str, n: int, device, repeats: int, track_prv=False) -> tuple:
    cfg = PrivacyConfig(**SETTINGS[setting], target_epsilon=1e5, delta=1e-5, planned_rounds=repeats + 5,
                        track_prv=track_prv)
    pipe = PrivacyPipeline(cfg, PrivacyLedger(delta=1e-5))
    update = make_update(n, device)
    public = (
        {k: torch.rand_like(v) for k, v in update.items()}
        if SETTINGS[setting].get("mask_policy") == "topk_public"
        else None
    )
    pipe.release(update, 0, public_scores=public)  # warm-up
    _sync(device)
    ts, enc = [], []
    for r in range(1, repeats + 1):
        t0 = time.perf_counter()
        pipe.release(update, r, public_scores=public, global_change=0.01)
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1000)
    if setting == "adpfl":  # the filter's sparse encoding of the same release (on CPU, as the filter does)
        for r in range(repeats + 1, repeats + 1 + min(repeats, 2)):
            sp, _ = pipe.release_sparse(update, r, public_scores=public, global_change=0.01)
            _sync(device)
            t0 = time.perf_counter()
            encode_release(sp)
            enc.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts), (statistics.median(enc) if enc else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 3e6, 10e6, 30e6])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--round-time-s", type=float, default=0.0, help="a round's wall time, for the fraction column")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    hdr = (f"{'device':<6} {'params':>6} {'setting':<6} {'release ms':>10} {'floor ms':>9} {'GB/s':>6} "
           f"{'x floor':>8} {'encode ms':>9}")
    if args.round_time_s:
        hdr += f" {'of round':>9}"
    print(hdr)
    for dev_name in args.devices:
        device = torch.device(dev_name)
        for size in args.sizes:
            n = int(size)
            floor, gbps = copy_floor_ms(n, device, args.repeats)
            for setting in UPDATE_MODES:
                ms, enc = time_release(setting, n, device, args.repeats)
                line = (f"{dev_name:<6} {n / 1e6:>5.1f}M {setting:<6} {ms:>10.1f} {floor:>9.2f} {gbps:>6.1f} "
                        f"{ms / floor:>8.1f} {'-' if enc is None else f'{enc:.1f}':>9}")
                if args.round_time_s:
                    line += f" {(ms + (enc or 0)) / 1000 / args.round_time_s:>9.2%}"
                print(line, flush=True)
    ms_prv, _ = time_release("adpfl", int(args.sizes[0]), torch.device("cpu"), args.repeats, track_prv=True)
    ms_rdp, _ = time_release("adpfl", int(args.sizes[0]), torch.device("cpu"), args.repeats, track_prv=False)
    print(f"PRV tracking (filter default track_prv=True) adds {ms_prv - ms_rdp:.1f} ms per release "
          f"(adpfl, {args.sizes[0] / 1e6:.1f}M params, cpu: {ms_prv:.1f} vs {ms_rdp:.1f} ms)")


if __name__ == "__main__":
    main()
