"""Before/after of the scoring conventions (issue 18) on synthetic validation sets.

Trains one site's LocalTrainer briefly per task, then scores the same model twice:

- before: the old validation (resampled grid, distances in voxels, MONAI DiceMetric with
  ``ignore_empty=True`` -- cases with an empty ground truth left out --, HD95 dropped
  whenever a mask is empty, a region with no case reported 0.0);
- after: ``LocalTrainer.evaluate`` (adpfl.metrics: every case scored with the challenge's
  empty-case rules, on the original grid in mm, plus the challenge metrics).

    python bench/scoring_conventions.py --tasks kidney3d brain3d --epochs 3
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import warnings

import torch


def old_evaluate(trainer, model):
    """The pre-issue-18 validation, kept here only to measure the difference."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from adpfl.tasks.base import labels_to_regions

    dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean_batch")
    model.eval()
    with torch.no_grad():
        for i in range(len(trainer.val_ds)):
            d = trainer.val_ds[i]
            x = torch.as_tensor(d["image"])[None]
            y = torch.as_tensor(d["label"])[None]
            pred = trainer._predict(model, x).float().argmax(dim=1, keepdim=True)
            p, g = labels_to_regions(pred, trainer.task), labels_to_regions(y.round().long(), trainer.task)
            dice(p, g)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hd(p, g)
    d, h = dice.aggregate(), hd.aggregate()
    out = {}
    for i, r in enumerate(trainer.task.regions):
        out[f"dice_{r}"] = float(d[i]) if math.isfinite(float(d[i])) else 0.0
        out[f"hd95_{r}"] = float(h[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["kidney3d", "brain3d"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--num-train", type=int, default=6)
    ap.add_argument("--num-val", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "adpfl_bench_scoring"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training.loop import LocalTrainer, TrainConfig

    for name in args.tasks:
        root = os.path.join(args.data_root, name)
        ensure_site_data(name, root, "site-1", num_train=args.num_train, num_val=args.num_val, size=args.size, seed=0)
        dl = load_site_datalist(root, "site-1", task=name)
        task = get_task(name)
        trainer = LocalTrainer(task, dl, TrainConfig(local_epochs=args.epochs, batch_size=2, image_size=args.size,
                                                     device="cpu", amp=False))
        model = TaskNetwork(name)
        trainer.train(model)
        before, after = old_evaluate(trainer, model), trainer.evaluate(model)
        print(f"\n{name}: dice_mean before {sum(before[f'dice_{r}'] for r in task.regions) / len(task.regions):.3f}, "
              f"after {after['dice_mean']:.3f}" + "".join(f"; {k} {after[k]:.3f}" for k in after
                                                         if k.endswith("_mean") and k != "dice_mean"))
        print(f"\n{name}: {args.num_val} synthetic validation cases, {args.epochs} local epochs at {args.size}")
        print(f"{'region':>18} {'Dice before':>11} {'after':>7} {'HD95 before (vox)':>18} "
              f"{'after (mm)':>10}  challenge")
        for r in task.regions:
            extra = "  ".join(f"{fam}={after[f'{fam}_{r}']:.3f}" for fam in ("lesion_dice", "lesion_hd95", "sdice")
                              if f"{fam}_{r}" in after)
            print(f"{r:>18} {before[f'dice_{r}']:11.3f} {after[f'dice_{r}']:7.3f} "
                  f"{before[f'hd95_{r}']:18.2f} {after[f'hd95_{r}']:10.2f}  {extra}")


if __name__ == "__main__":
    main()
