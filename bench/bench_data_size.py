"""Realistic synthetic sites (setting ``data_size="realistic"``): generation rate, disk and
RAM footprint, and the peak RSS of one site process training on one.

Usage: python bench/bench_data_size.py [--task skin2d] [--site site-1] [--root DIR] [--steps 20]
                                       [--workers 0]

1. Generates the site exactly as a job does (:class:`adpfl.training.site.SiteSession` at
   ``data_size="realistic"``: the preset's counts and size, in the keyed cache folder under
   ``--root``); a second call finds it there and only checks it (reuse).
2. Prints cases/s of the generation, the folder's size on disk, and the bytes the trainer's
   cache holds in RAM (every cached tensor of the training and validation sets).
3. In a fresh process: sets the site up (reads the cache folder, caches the deterministic
   transforms) and trains ``--steps`` optimizer steps; prints set-up seconds and the
   process's peak RSS (``ru_maxrss``). The peak is set by the cached data set, which one
   capped round already holds in full.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

from _machine import machine  # bench/ is on sys.path when a script runs


def _du(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def _session(task: str, site: str, steps: int):
    from adpfl.training import TrainConfig
    from adpfl.training.site import SiteConfig, SiteSession

    return SiteSession(site, SiteConfig(task=task, data_size="realistic", hd95=False),
                       TrainConfig(local_epochs=1, max_steps_per_round=steps, device="cpu"))


def child(task: str, site: str, root: str, steps: int) -> None:
    import torch

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    s = _session(task, site, steps)
    s.setup(root)
    setup = time.perf_counter() - t0
    ds_bytes = 0
    for ds in (s.trainer.train_ds, s.trainer.val_ds):
        for item in ds._cache:
            ds_bytes += sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
            ds_bytes += sum(v.nbytes for v in item.values() if hasattr(v, "nbytes") and not isinstance(v, torch.Tensor))
    t0 = time.perf_counter()
    stats = s.trainer.train(s.model)
    train = time.perf_counter() - t0
    print(json.dumps({"setup_s": setup, "cache_bytes": ds_bytes, "train_s": train, "steps": stats["steps"],
                      "num_train": s.trainer.num_train, "num_val": s.trainer.num_val,
                      "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="skin2d")
    ap.add_argument("--site", default="site-1")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "adpfl_bench_realistic"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = os.path.join(args.root, args.task)
    if args.child:
        child(args.task, args.site, root, args.steps)
        return
    from adpfl.data.sizes import synthetic_root
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.tasks.base import get_task

    print(f"machine: {machine()}")
    s = _session(args.task, args.site, args.steps)
    n_train, n_val = s.config.num_train, s.config.num_val
    shape = get_task(args.task).resolve_size(s.train_config.image_size)
    folder = synthetic_root(root, "realistic", n_train, n_val, shape, 0)
    for attempt in ("first call", "second call (reuse)"):
        t0 = time.perf_counter()
        ensure_site_data(args.task, folder, args.site, num_train=n_train, num_val=n_val, size=shape, seed=0)
        dt = time.perf_counter() - t0
        rate = f", {(n_train + n_val) / dt:.1f} cases/s" if attempt == "first call" else ""
        print(f"{args.task} realistic site {args.site} ({n_train} + {n_val} cases at {shape}), {attempt}: "
              f"{dt:.1f} s{rate}", flush=True)
    print(f"on disk: {_du(os.path.join(folder, args.site)) / 2**20:.0f} MiB in {folder}", flush=True)
    out = subprocess.run([sys.executable, __file__, "--child", "--task", args.task, "--site", args.site,
                          "--root", args.root, "--steps", str(args.steps)], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:])
        sys.exit(1)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"site process: set-up (read + cache deterministic transforms of {r['num_train']} + {r['num_val']} cases) "
          f"{r['setup_s']:.1f} s, cached tensors {r['cache_bytes'] / 2**20:.0f} MiB, {r['steps']} training steps "
          f"{r['train_s']:.1f} s; peak RSS {r['max_rss_kib'] / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
