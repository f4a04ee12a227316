"""Loss-threshold membership inference on the final global model: NP-FL vs DP-SGD (eps 8).

    python bench/mia_eval.py [--rounds 5] [--size 32] [--train 40]

In-process FedAvg (no FLARE; the trainers the FLARE executor runs): 3 synthetic skin2d
sites, ``--train`` records each, ``--rounds`` rounds of 2 local epochs, batch 8. NP-FL trains
with ``LocalTrainer``; DP-SGD with ``DPSGDTrainer`` at record-level epsilon 8 (delta 1e-5,
Opacus RDP, calibrated over the rounds, max_grad_norm 1), one trainer per site kept across
rounds. Attack (Yeom et al. 2018): score = -DiceCE loss of the final global model on one
image (no augmentation); members = every site's training images, non-members = the same
number of fresh images from the same generator (the sites' validation lists). AUC = the
probability that a random member scores above a random non-member (0.5: no leakage).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P[score(member) > score(non-member)] + 0.5 P[tie] (the Mann-Whitney AUC)."""
    m, n = np.asarray(members)[:, None], np.asarray(non_members)[None, :]
    return float((m > n).mean() + 0.5 * (m == n).mean())


def per_image_scores(model, trainer, entries) -> np.ndarray:
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    tf = trainer.task.val_transforms(trainer.config.image_size)
    model.eval()
    out = []
    with torch.no_grad():
        for e in entries:
            d = tf(dict(e))
            x, y = d["image"][None].float(), d["label"][None].float()
            out.append(-float(loss_fn(model(x), y)))
    return np.asarray(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=40)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from _machine import machine
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.privacy.config import DPSGDConfig
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training import LocalTrainer, TrainConfig
    from adpfl.training.dpsgd import DPSGDTrainer

    print("machine:", machine(), flush=True)
    task = get_task("skin2d")
    root = os.path.join(tempfile.gettempdir(), f"adpfl_mia_{a.size}_{a.train}")
    sites = ["site-1", "site-2", "site-3"]
    dls = []
    for s in sites:
        ensure_site_data("skin2d", root, s, num_train=a.train, num_val=a.train, seed=0, size=a.size)
        dls.append(load_site_datalist(root, s, task="skin2d"))
    cfg = TrainConfig(local_epochs=2, batch_size=8, learning_rate=2e-3, image_size=a.size, device="cpu", seed=0)
    for name in ("NP-FL", "DP-SGD eps 8"):
        torch.manual_seed(0)
        if name == "NP-FL":
            trainers = [LocalTrainer(task, dl, cfg) for dl in dls]
        else:
            dp = DPSGDConfig(target_epsilon=8.0, planned_rounds=a.rounds)
            trainers = [DPSGDTrainer(task, dl, cfg, dp) for dl in dls]
        g = TaskNetwork("skin2d")
        models = [TaskNetwork("skin2d") for _ in sites]
        t0 = time.perf_counter()
        info = ""
        for _r in range(a.rounds):
            gs = {k: v.clone() for k, v in g.state_dict().items()}
            deltas = []
            for m, tr in zip(models, trainers):
                m.load_state_dict(gs)
                res = tr.train(m)
                deltas.append({k: v - gs[k] for k, v in m.state_dict().items()})
                if "epsilon" in res:
                    info = (f"record-level epsilon {res['epsilon']:.3f} at delta {res['delta']:g} (Opacus RDP), "
                            f"z={res['noise_multiplier']:.4g}, q={res['sample_rate']:g}")
            g.load_state_dict({k: gs[k] + sum(d[k] for d in deltas) / len(deltas) for k in gs})
        train_s = time.perf_counter() - t0
        mem = np.concatenate([per_image_scores(g, tr, dl["training"]) for tr, dl in zip(trainers, dls)])
        non = np.concatenate([per_image_scores(g, tr, dl["validation"]) for tr, dl in zip(trainers, dls)])
        dice = np.mean([tr.evaluate(g, with_hd95=False)["dice_mean"] for tr in trainers])
        print(f"| {name} | {info or 'none'} | {len(mem)} / {len(non)} | {auc(mem, non):.3f} "
              f"| {-mem.mean():.3f} / {-non.mean():.3f} | {dice:.3f} | {train_s:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
