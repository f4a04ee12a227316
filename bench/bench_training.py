"""Training throughput of the Executor's LocalTrainer vs a plain MONAI loop, one process.

Usage: python bench/bench_training.py [--task skin2d] [--image-size 64] [--num-train 16]
                                      [--batch-size 8] [--epochs 2] [--trials 7] [--no-amp] [--threads 0]
                                      [--plain-loader thread|dataloader] [--no-compute-bound]

Both train the same UNet (TaskNetwork(task)), loss (DiceCELoss), optimizer (Adam), batch
size and AMP setting (AMP only on CUDA, as in LocalTrainer) on the same cases with the same
augmentation:

* LocalTrainer: its CacheDataset (deterministic transforms cached; the 3D patch sampler per
  item) and the task's random flips / quarter turns / intensity jitter on each collated batch
  (``adpfl.tasks.batch_augment``).
* plain MONAI loop: what a MONAI user writes: one ``Compose`` of the same cached chain and
  then the same random augmentation as MONAI's per-item transforms
  (``BatchAugment.monai_transforms()``: RandFlipd, RandRotate90d, RandScaleIntensityd,
  RandShiftIntensityd; MONAI's default metadata tracking), in a ``CacheDataset`` read by
  MONAI's ``ThreadDataLoader`` (``--plain-loader dataloader``: MONAI's ``DataLoader``), with
  ``copy_cache=False`` (the faster setting; none of these transforms writes in place).
* compute bound (unless ``--no-compute-bound``): batches materialised once in memory, no
  augmentation at all: only the training step; the ceiling of any loop.

The trials interleave (trainer, plain, compute, trainer, plain, ...) after a warm-up of each,
so load on a shared machine hits every arm alike; each trial gives one trainer / plain ratio
and the median over trials is the figure (target >= 0.95), printed with its spread, in wall
time and in process CPU time (user + system of this process, all its threads: with
``--threads 1`` the work each loop does, disturbed far less by other work on the machine).
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
from monai.data import CacheDataset, DataLoader, ThreadDataLoader
from monai.losses import DiceCELoss
from monai.transforms import Compose

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.data.datalist import load_site_datalist
from adpfl.data.synthetic import ensure_site_data
from adpfl.tasks.base import get_task
from adpfl.tasks.network import TaskNetwork
from adpfl.training import LocalTrainer, TrainConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _load() -> str:
    return "load average " + " / ".join(f"{v:.2f}" for v in os.getloadavg())


class PlainLoop:
    """The reference: MONAI loss, Adam, optional AMP, a MONAI data loader with per-item augmentation."""

    def __init__(self, model, batches_or_loader, lr, device, amp):
        self.model = model.to(device).train()
        self.data = batches_or_loader
        self.device, self.amp = device, amp
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def epochs(self, n) -> tuple:
        samples = 0
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            for batch in self.data:
                x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                self.opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=self.amp):
                    loss = self.loss_fn(self.model(x), y)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                samples += x.shape[0]
        _sync(self.device)
        return samples, time.perf_counter() - t0, time.process_time() - c0


def trainer_epochs(trainer, model, device) -> tuple:
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = trainer.train(model)
    _sync(device)
    return stats["samples"], time.perf_counter() - t0, time.process_time() - c0


def _spread(values) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"min {min(values):.3f}, IQR {q[0]:.3f}-{q[2]:.3f}, max {max(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="skin2d")
    ap.add_argument("--image-size", type=int, default=None, help="default: 64 for skin2d, the task's for 3D")
    ap.add_argument("--num-train", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--plain-loader", choices=["thread", "dataloader"], default="thread")
    ap.add_argument("--no-compute-bound", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size or (64 if args.task == "skin2d" else None)
    print(f"machine: {machine()}")
    print(f"at start: {_load()}")
    torch.manual_seed(0)
    task = get_task(args.task)
    root = tempfile.mkdtemp(prefix="adpfl_bench_train_")
    ensure_site_data(args.task, root, "site-1", num_train=args.num_train, num_val=2, size=size, seed=0)
    datalist = load_site_datalist(root, "site-1", task=args.task)
    cfg = TrainConfig(local_epochs=args.epochs, batch_size=args.batch_size, learning_rate=1e-3,
                      amp=not args.no_amp, image_size=size, device=args.device)
    trainer = LocalTrainer(task, datalist, cfg)
    device, amp = trainer.device, trainer.use_amp
    resolved = task.resolve_size(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_tf = Compose(list(task.train_transforms(resolved).transforms)
                           + task.batch_augment(resolved).monai_transforms())
        plain_ds = CacheDataset(datalist["training"], transform=plain_tf, cache_rate=1.0, progress=False,
                                copy_cache=False)
    loader_cls = ThreadDataLoader if args.plain_loader == "thread" else DataLoader
    plain_loader = loader_cls(plain_ds, batch_size=args.batch_size, shuffle=True, num_workers=0,
                              pin_memory=device.type == "cuda")
    m_tr, m_pl, m_cb = TaskNetwork(args.task), TaskNetwork(args.task), TaskNetwork(args.task)
    m_pl.load_state_dict(m_tr.state_dict())
    m_cb.load_state_dict(m_tr.state_dict())
    plain = PlainLoop(m_pl, plain_loader, 1e-3, device, amp)
    arms = {"trainer": lambda: trainer_epochs(trainer, m_tr, device), "plain": lambda: plain.epochs(args.epochs)}
    if not args.no_compute_bound:
        # one pass of the plain loader, frozen: the same data, no per-epoch augmentation
        batches = [(b["image"].as_tensor().clone() if hasattr(b["image"], "as_tensor") else b["image"].clone(),
                    b["label"].as_tensor().clone() if hasattr(b["label"], "as_tensor") else b["label"].clone())
                   for b in plain_loader]
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        bound = PlainLoop(m_cb, batches, 1e-3, device, amp)
        arms["compute"] = lambda: bound.epochs(args.epochs)
    print(f"task {args.task}, image size {resolved}, patch {task.patch_size}, {args.num_train} cases, batch "
          f"{args.batch_size}, {args.epochs} epochs per trial, device {device}, AMP {amp}, plain loader "
          f"{loader_cls.__name__}")
    for run in arms.values():  # warm-up
        run()
    rate = {k: [] for k in arms}
    cpu = {k: [] for k in arms}
    for t in range(args.trials):
        for name, run in arms.items():
            s, sec, c = run()
            rate[name].append(s / sec)
            cpu[name].append(s / c)
        print(f"trial {t + 1}: " + ", ".join(f"{k} {rate[k][-1]:.2f} samples/s ({cpu[k][-1]:.2f} per CPU s)"
                                             for k in arms)
              + f"; trainer/plain {rate['trainer'][-1] / rate['plain'][-1]:.3f} wall, "
                f"{cpu['trainer'][-1] / cpu['plain'][-1]:.3f} CPU", flush=True)
    for ref in [k for k in arms if k != "trainer"]:
        wall = [a / b for a, b in zip(rate["trainer"], rate[ref])]
        per_cpu = [a / b for a, b in zip(cpu["trainer"], cpu[ref])]
        print(f"LocalTrainer / {ref}: median over {args.trials} interleaved trials {statistics.median(wall):.3f} wall "
              f"({_spread(wall)}); per CPU second {statistics.median(per_cpu):.3f} ({_spread(per_cpu)})")
    print("median samples/s: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in rate.items())
          + " (target: LocalTrainer / plain >= 0.95)")
    print(f"at end: {_load()}")


if __name__ == "__main__":
    main()
