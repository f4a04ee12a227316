"""Per-record gradient norms of a public checkpoint on PUBLIC records: where to put DP-SGD's clip.

DP-SGD clips each record's gradient to ``dpsgd_max_grad_norm``. A clip far above the typical
norm adds noise (its scale is ``z * clip``) without clipping anything; a clip below the smallest
norm clips every record to the same length. Measuring the norms on a site's own records would be
a release no ledger accounts for, so this measures them on public synthetic records only (the
public sites ``public-N`` of ``adpfl pretrain-public``, data seed 1000, which no federation site
is; by default ``public-4``, which no checkpoint here was trained on), for each setting of
``trainable``, and prints the quantiles (also written to ``--out`` as JSON). Pure part:
:func:`adpfl.training.dpsgd.per_record_gradient_norms` (tested).

Example (brain3d, the 30-patient public checkpoint, one public site at the realistic count)::

    python bench/grad_norms.py --task brain3d --network small --image-size 32 \\
        --checkpoint docs/results/record_brain3d_warm_smallpub/checkpoints/brain3d_32_small_pub30.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def main(argv=None) -> int:
    from adpfl.data.sizes import resolve_data_size, synthetic_root
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TRAINABLE, TaskNetwork
    from adpfl.training.dpsgd import per_record_gradient_norms
    from adpfl.training.loop import LocalTrainer, TrainConfig
    from adpfl.training.pretrain import PUBLIC_DATA_SEED, public_datalist, public_site_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=["skin2d", "kidney3d", "brain3d"])
    ap.add_argument("--network", default="standard")
    ap.add_argument("--checkpoint", default=None, help="public warm-start checkpoint (None: random weights)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--num-records", type=int, default=None, help="public training records (default: realistic)")
    ap.add_argument("--public-sites", type=int, default=1)
    ap.add_argument("--first-public-site", type=int, default=4,
                    help="measure on public-K, public-K+1, ... (default public-4: no checkpoint of this repository "
                         "was trained on it; the pretraining used public-1..3)")
    ap.add_argument("--trainable", nargs="+", default=list(TRAINABLE), choices=TRAINABLE)
    ap.add_argument("--data-root", default=os.path.join("results", "grad_norms", "data"))
    ap.add_argument("--out", default=None, help="JSON with the quantiles (default: print only)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    task = get_task(args.task)
    n_train, n_val, size = resolve_data_size(args.task, "realistic", args.num_records, 1, args.image_size)
    shape = task.resolve_size(size)
    root = synthetic_root(os.path.join(os.path.abspath(args.data_root), args.task), "realistic", n_train, n_val,
                          shape, PUBLIC_DATA_SEED)
    if args.first_public_site < 1 or args.public_sites < 1:
        raise SystemExit("--first-public-site and --public-sites must be >= 1")
    sites = public_site_names(args.first_public_site + args.public_sites - 1)[args.first_public_site - 1:]
    datalist, info = public_datalist(args.task, root, sites, n_train, n_val, shape, PUBLIC_DATA_SEED)
    trainer = LocalTrainer(task, datalist, TrainConfig(image_size=size, device="auto"))
    result = {"task": args.task, "network": args.network, "checkpoint": args.checkpoint, "image_size": list(shape),
              "public_records": len(datalist["training"]), "public_sites": info["sites"],
              "data_seed": PUBLIC_DATA_SEED, "machine": machine(), "quantiles": list(QUANTILES), "norms": {}}
    print(f"{machine()}\n{args.task} / {args.network}, checkpoint {args.checkpoint}: "
          f"{len(datalist['training'])} public records ({', '.join(info['sites'])}, data seed {PUBLIC_DATA_SEED})")
    for trainable in args.trainable:
        t0 = time.perf_counter()
        model = TaskNetwork(args.task, args.network, init_seed=0, initial_checkpoint=args.checkpoint)
        norms = per_record_gradient_norms(model, trainer, trainable)
        q = torch.quantile(norms.double(), torch.tensor(QUANTILES, dtype=torch.double)).tolist()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result["norms"][trainable] = {"parameters": params, "values": [round(v, 6) for v in q]}
        print(f"trainable={trainable:8s} {params:>9,d} parameters: per-record gradient norm "
              + " ".join(f"q{int(100 * a)} {v:.4g}" for a, v in zip(QUANTILES, q))
              + f"  ({time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
