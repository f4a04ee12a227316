"""Count noise coordinates beyond 5.8 standard deviations through the REAL release paths.

PyTorch's float32 Gaussian (Box-Muller on 24-bit uniforms) never exceeds ~5.768 sigma; a
true Gaussian puts P(|Z| > 5.8) = 6.63e-9 on each coordinate (about 6.6 per 1e9 draws). The
release paths now draw and add in float64 (adpfl.privacy.mechanisms.gaussian_noised); this
benchmark checks that the tail is there, end to end:

* ``pipeline``: ``PrivacyPipeline.release`` (the ADPFilter's pipeline), DP-FL, a zero update
  of ``--chunk`` coordinates per release, with its ledger file (locked reservation per
  release); the released float32 values divided by the metadata's ``noise_std``;
* ``dpsgd``: ``Float64NoiseDPOptimizer.add_noise`` (the DP-SGD trainer's Opacus optimizer)
  on a zero clipped gradient of ``--chunk`` coordinates, divided by ``z * max_grad_norm``;
* ``float32`` (only with ``--float32-reference``): plain ``torch.randn`` float32, the old draw.

It prints the machine line, per path the draws, the count beyond 5.8 sigma, the expected
count and its Poisson two-sided p-value, and the draws per second.

    python bench/bench_noise_tails.py [--draws 1e9] [--chunk 16777216] [--device cpu]
                                      [--paths pipeline dpsgd] [--float32-reference]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from _machine import machine  # bench/ is on sys.path when a script runs

THRESHOLD = 5.8


def _tail_probability(t: float) -> float:
    return math.erfc(t / math.sqrt(2.0))  # P(|Z| > t)


def _poisson_p_two_sided(k: int, mu: float) -> float:
    from scipy.stats import poisson

    lo = poisson.cdf(k, mu)
    hi = poisson.sf(k - 1, mu)
    return min(1.0, 2.0 * min(lo, hi))


def pipeline_chunks(chunk: int, device: str, ledger_path: str):
    from adpfl.privacy import PrivacyConfig, PrivacyLedger, PrivacyPipeline

    cfg = PrivacyConfig(mode="dpfl", clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, track_prv=False)
    pipe = PrivacyPipeline(cfg, PrivacyLedger(delta=1e-5, track_prv=False), ledger_path=ledger_path)
    zero = {"w": torch.zeros(chunk, device=device)}
    r = 0
    while True:
        out, meta = pipe.release(zero, r, job_id="bench")
        r += 1
        yield out["w"].abs_().div_(meta["noise_std"])


def dpsgd_chunks(chunk: int, device: str):
    from adpfl.privacy.mechanisms import make_generator
    from adpfl.training.dp_noise import Float64NoiseDPOptimizer

    p = torch.nn.Parameter(torch.zeros(chunk, device=device))
    z, c = 1.3, 0.7
    opt = Float64NoiseDPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=z, max_grad_norm=c,
                                  expected_batch_size=1, generator=make_generator(device))
    while True:
        p.summed_grad = torch.zeros(chunk, device=device)
        opt.add_noise()
        g = p.grad
        opt.zero_grad(set_to_none=True)  # clears Opacus' processed flag as after a step
        yield g.abs_().div_(z * c)


def float32_chunks(chunk: int, device: str):
    from adpfl.privacy.mechanisms import make_generator

    gen = make_generator(device)
    while True:
        yield torch.randn(chunk, generator=gen, device=device, dtype=torch.float32).abs_()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=float, default=1e9, help="draws per path")
    ap.add_argument("--chunk", type=int, default=1 << 24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paths", nargs="+", default=["pipeline", "dpsgd"], choices=["pipeline", "dpsgd"])
    ap.add_argument("--float32-reference", action="store_true", help="also count the old float32 draw")
    args = ap.parse_args()
    print(f"machine: {machine()}; device {args.device}")
    p_tail = _tail_probability(THRESHOLD)
    paths = list(args.paths) + (["float32"] if args.float32_reference else [])
    tmp = tempfile.mkdtemp(prefix="adpfl_tails_")
    for name in paths:
        if name == "pipeline":
            chunks = pipeline_chunks(args.chunk, args.device, os.path.join(tmp, "ledger.json"))
        elif name == "dpsgd":
            chunks = dpsgd_chunks(args.chunk, args.device)
        else:
            chunks = float32_chunks(args.chunk, args.device)
        n_chunks = math.ceil(args.draws / args.chunk)
        beyond, largest = 0, 0.0
        t0 = time.perf_counter()
        for _ in range(n_chunks):
            a = next(chunks)
            beyond += int(torch.count_nonzero(a > THRESHOLD))
            largest = max(largest, float(a.max()))
        dt = time.perf_counter() - t0
        draws = n_chunks * args.chunk
        mu = draws * p_tail
        print(f"{name}: {draws:.4g} draws, {beyond} beyond {THRESHOLD} sigma (true Gaussian expects {mu:.2f}; "
              f"Poisson two-sided p = {_poisson_p_two_sided(beyond, mu):.3g}), largest |z| {largest:.3f}, "
              f"{draws / dt / 1e6:.1f} M draws/s")


if __name__ == "__main__":
    main()
