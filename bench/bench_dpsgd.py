"""Cost of record-level DP-SGD (Opacus) against plain local training, per task, one process.

Usage: python bench/bench_dpsgd.py [--tasks skin2d kidney3d brain3d] [--image-size 32]
                                   [--num-train 8] [--batch-size 4] [--rounds 2] [--device auto]
                                   [--networks standard dp]

For each task and network variant (setting ``network``: ``standard`` has transposed
convolutions, ``dp`` convolution + linear up-sampling; both get their per-sample gradients from
the samplers :mod:`adpfl.training.grad_samplers` registers): the executor's LocalTrainer and
DPSGDTrainer, both on that network, each train
``--rounds`` rounds of one epoch on the same synthetic site; reported: seconds per optimizer
step (median over rounds after one warm-up round), samples/s, the slowdown, the peak GPU
memory on CUDA, and the record-level epsilon DP-SGD spent. DP-SGD's Poisson batches vary in
size, so its throughput counts the samples it actually drew.
"""

import argparse
import statistics
import tempfile
import time

import torch

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.data.datalist import load_site_datalist
from adpfl.data.synthetic import ensure_site_data
from adpfl.privacy.config import DPSGDConfig
from adpfl.tasks.base import NETWORKS, get_task
from adpfl.tasks.network import TaskNetwork
from adpfl.training import LocalTrainer, TrainConfig
from adpfl.training.dpsgd import DPSGDTrainer


def run(trainer, model, rounds: int, device) -> dict:
    per_step, rates = [], []
    for i in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = trainer.train(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i == 0:
            continue  # warm-up (caching, functorch tracing)
        per_step.append(dt / max(1, out["steps"]))
        rates.append(out["samples"] / dt)
    return {"s_per_step": statistics.median(per_step), "samples_per_s": statistics.median(rates), "last": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["skin2d", "kidney3d", "brain3d"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--num-train", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--networks", nargs="+", default=["standard", "dp"], choices=NETWORKS)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as root:
        for task_name in args.tasks:
            task = get_task(task_name)
            ensure_site_data(task_name, root, "site-1", num_train=args.num_train, num_val=2,
                             size=args.image_size, seed=0)
            dl = load_site_datalist(root, "site-1", task=task_name)
            cfg = TrainConfig(local_epochs=1, batch_size=args.batch_size, image_size=args.image_size,
                              device=args.device, learning_rate=1e-3)
            for network in args.networks:
                compare(task, dl, cfg, network, args)


def compare(task, dl, cfg, network: str, args) -> None:
    plain = LocalTrainer(task, dl, cfg)
    device = plain.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    p = run(plain, TaskNetwork(task.name, network).to(device), args.rounds, device)
    mem_plain = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    dp = DPSGDTrainer(task, dl, cfg, DPSGDConfig(target_epsilon=8.0, delta=1e-5,
                                                 planned_rounds=args.rounds + 1, max_grad_norm=1.0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    d = run(dp, TaskNetwork(task.name, network).to(device), args.rounds, device)
    mem_dp = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    mem = "" if mem_plain is None else f"; peak GPU memory {mem_plain:.0f} -> {mem_dp:.0f} MiB"
    print(f"{task.name} network {network} ({args.image_size}^{task.spatial_dims}, batch {args.batch_size}, "
          f"{args.num_train} training cases): plain {p['s_per_step'] * 1000:.0f} ms/step "
          f"({p['samples_per_s']:.1f} samples/s), DP-SGD {d['s_per_step'] * 1000:.0f} ms/step "
          f"({d['samples_per_s']:.1f} samples/s): {d['s_per_step'] / p['s_per_step']:.2f}x per step{mem}; "
          f"record-level epsilon {d['last']['epsilon']:.3f} at delta 1e-5 "
          f"(z={dp.noise_multiplier:.3f}, q={dp.sample_rate:.3f})", flush=True)


if __name__ == "__main__":
    main()
