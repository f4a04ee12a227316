"""Training throughput of the Executor's LocalTrainer vs a plain MONAI loop, one process.

Usage: python bench/bench_training.py [--task skin2d] [--image-size 64] [--num-train 16]
                                      [--batch-size 8] [--epochs 2] [--trials 3] [--no-amp] [--threads 0]

Both train the same UNet (TaskNetwork(task)), loss (DiceCELoss), optimizer (Adam), batch
size and AMP setting (AMP only on CUDA, as in LocalTrainer) on the same data: the
trainer's cached training set, materialised in memory once as the plain loop's batches.
The trials alternate (trainer, plain, trainer, plain, ...) after a warm-up of each; the
ratio is median trainer samples/s over median plain samples/s (target >= 0.95). Also printed:
the same ratio in process CPU time (user + system of this process, all its threads), which a
machine shared with other work disturbs far less than wall time; with ``--threads 1`` it
counts the work each loop does.
"""

import argparse
import statistics
import tempfile
import time

import torch
from monai.losses import DiceCELoss

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.data.datalist import load_site_datalist
from adpfl.data.synthetic import ensure_site_data
from adpfl.tasks.base import get_task
from adpfl.tasks.network import TaskNetwork
from adpfl.training import LocalTrainer, TrainConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_epochs(model, batches, epochs, lr, device, amp) -> tuple:
    """The reference loop: MONAI loss, Adam, optional AMP; data already in memory."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    samples = 0
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", enabled=amp):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            samples += x.shape[0]
    _sync(device)
    return samples, time.perf_counter() - t0, time.process_time() - c0


def trainer_epochs(trainer, model, device) -> tuple:
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = trainer.train(model)
    _sync(device)
    return stats["samples"], time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="skin2d")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    root = tempfile.mkdtemp(prefix="adpfl_bench_train_")
    ensure_site_data(args.task, root, "site-1", num_train=args.num_train, num_val=2, size=args.image_size, seed=0)
    datalist = load_site_datalist(root, "site-1", task=args.task)
    cfg = TrainConfig(local_epochs=args.epochs, batch_size=args.batch_size, learning_rate=1e-3,
                      amp=not args.no_amp, image_size=args.image_size, device=args.device)
    trainer = LocalTrainer(get_task(args.task), datalist, cfg)
    device = trainer.device
    amp = trainer.use_amp
    # the same data, in memory: one pass of the trainer's own loader (same transforms, same batch size)
    batches = [(b["image"].clone(), b["label"].clone())
               for b in trainer._loader(True, trainer.train_ds, args.batch_size)]
    if device.type == "cuda":
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    m_tr, m_pl = TaskNetwork(args.task), TaskNetwork(args.task)
    m_pl.load_state_dict(m_tr.state_dict())
    print(f"task {args.task}, image size {args.image_size}, {args.num_train} cases, batch {args.batch_size}, "
          f"{args.epochs} epochs per trial, device {device}, AMP {amp}")
    trainer_epochs(trainer, m_tr, device)  # warm-up
    plain_epochs(m_pl, batches, 1, 1e-3, device, amp)
    tr, pl, tr_cpu, pl_cpu = [], [], [], []
    for t in range(args.trials):
        s, sec, cpu = trainer_epochs(trainer, m_tr, device)
        tr.append(s / sec)
        tr_cpu.append(s / cpu)
        s, sec, cpu = plain_epochs(m_pl, batches, args.epochs, 1e-3, device, amp)
        pl.append(s / sec)
        pl_cpu.append(s / cpu)
        print(f"trial {t + 1}: LocalTrainer {tr[-1]:.2f} samples/s, plain MONAI loop {pl[-1]:.2f} samples/s "
              f"(per CPU second: {tr_cpu[-1]:.2f} vs {pl_cpu[-1]:.2f})", flush=True)
    a, b = statistics.median(tr), statistics.median(pl)
    ac, bc = statistics.median(tr_cpu), statistics.median(pl_cpu)
    print(f"median: LocalTrainer {a:.2f} samples/s, plain loop {b:.2f} samples/s, ratio {a / b:.3f}; "
          f"per CPU second {ac:.2f} vs {bc:.2f}, ratio {ac / bc:.3f} (target >= 0.95)")

if __name__ == "__main__":
    main()
