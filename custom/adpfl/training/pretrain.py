"""``adpfl pretrain-public``: a warm-start checkpoint trained centrally on declared PUBLIC data only.

Issue 15 allows "a warm start from a checkpoint trained only on declared public data": data
that no federation site holds costs no site's privacy budget, so a model pretrained on it may
start every job (setting ``initial_checkpoint``) while each site's record- or update-level
accounting stays exactly what it was.

What "public" is here: synthetic sites of the bundle's own generator
(:mod:`adpfl.data.synthetic`) that no federation site is. They are named ``public-1``,
``public-2``, ... (never ``site-N``): the generator draws a site's images from
``default_rng([data_seed, task, site_index, case])`` and its acquisition shift from
``default_rng(site_index)``, and these names map to site indices >= 1000 (:func:`site_index`),
so the checkpoint never saw a federation site's images nor its acquisition shift; their data
seed (default 1000, the public tuning split's of ``bench/dpsgd_tune.py``) differs from the
comparison's seeds too. They come from the same generator family as the sites, so a warm start
from them is an upper-end case; the real-world analogue is pretraining on ISIC archive images
that are not in the federation, or on public KiTS/BraTS cases.

Training is the project's own :class:`~adpfl.training.LocalTrainer` (augmentation, loss,
optimizer, evaluation) on the union of the public sites' datalists, one epoch per call, the
public validation Dice recorded after each; the result is written with
:func:`adpfl.tasks.checkpoint.save_public_checkpoint` (weights + provenance). ``keep="best"``
writes the weights of the epoch with the highest public validation Dice instead of the last
epoch's: model selection on public validation cases costs no site anything, and the 3D tasks'
validation Dice swings from epoch to epoch at the CPU's 32^3 (kidney3d, small network, 3 public
sites, lr 0.002: 0.15 at epoch 5, 0.06 at epoch 8, the epoch a `last` checkpoint keeps).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch

from adpfl.data.common import site_index
from adpfl.data.sizes import resolve_data_size, synthetic_root
from adpfl.tasks.base import check_network, get_task
from adpfl.tasks.checkpoint import save_public_checkpoint
from adpfl.tasks.network import TaskNetwork
from adpfl.training.loop import LocalTrainer, TrainConfig

__all__ = ["PUBLIC_DATA_SEED", "public_site_names", "public_datalist", "pretrain_public"]

#: the public data's generator seed (the public tuning split's, bench/dpsgd_tune.py)
PUBLIC_DATA_SEED = 1000


def public_site_names(count: int) -> list[str]:
    """``public-1`` .. ``public-<count>``: names no federation site has (indices >= 1000)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of public sites must be an int >= 1, got {count!r}")
    names = [f"public-{i + 1}" for i in range(count)]
    indices = [site_index(n) for n in names]
    if len(set(indices)) != len(indices) or min(indices) < 1000:  # pragma: no cover - sha256 would have to collide
        raise ValueError(f"public site names {names} do not map to distinct indices >= 1000: {indices}")
    return names


def public_datalist(task: str, data_root: str, sites: list[str], num_train: int, num_val: int, size,
                    data_seed: int) -> tuple[dict, dict]:
    """The union of the public sites' datalists (generated when missing) and its description."""
    from adpfl.data.datalist import load_site_datalist, validate_site
    from adpfl.data.synthetic import domain_shift, ensure_site_data

    merged: dict[str, list] = {"training": [], "validation": []}
    for name in sites:
        ensure_site_data(task, data_root, name, num_train=num_train, num_val=num_val, size=size, seed=data_seed)
        dl = load_site_datalist(data_root, name, task=task)
        validate_site(dl)
        merged["training"] += dl["training"]
        merged["validation"] += dl["validation"]
    info = {"generator": "adpfl.data.synthetic (the bundle's synthetic generator: the same family as the "
                         "federation's synthetic sites, so the warm start is an upper-end case)",
            "data_seed": int(data_seed), "sites": list(sites), "site_indices": [site_index(n) for n in sites],
            "domain_shifts": {n: domain_shift(task, n) for n in sites},
            "num_train_per_site": int(num_train), "num_val_per_site": int(num_val),
            "num_train": len(merged["training"]), "num_val": len(merged["validation"]),
            "disjoint_from_federation": "site names public-N (site indices >= 1000): no site-N's images or "
                                        "acquisition shift"}
    return merged, info


def pretrain_public(task: str, out: str, *, network: str = "standard", data_root: str | None = None,
                    data_size: str = "tiny", num_train: int | None = None, num_val: int | None = None,
                    image_size: int | None = None, epochs: int = 2, batch_size: int = 8,
                    learning_rate: float = 2e-3, public_sites: int = 3, data_seed: int = PUBLIC_DATA_SEED,
                    seed: int = 0, device: str = "auto", command: str | None = None, keep: str = "last",
                    log: Callable[[str], None] = print) -> dict:
    """Train ``task``'s ``network`` on the public sites and write ``out`` + its provenance.

    ``keep``: ``last`` (the last epoch's weights) or ``best`` (the epoch with the highest public
    validation Dice; ties: the earlier). Returns the provenance written (with the public
    validation Dice after each epoch and the epoch kept)."""
    task_obj = get_task(task)
    check_network(network)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if keep not in ("last", "best"):
        raise ValueError(f"keep must be 'last' or 'best', got {keep!r}")
    n_train, n_val, size = resolve_data_size(task, data_size, num_train, num_val, image_size)
    shape = task_obj.resolve_size(size)
    data_root = os.path.abspath(os.path.expanduser(data_root or os.path.join("~", ".cache", "adpfl", "data")))
    root = synthetic_root(os.path.join(data_root, task), data_size, n_train, n_val, shape, data_seed)
    sites = public_site_names(public_sites)
    datalist, data_info = public_datalist(task, root, sites, n_train, n_val, shape, data_seed)
    log(f"public data: {', '.join(sites)} (site indices {data_info['site_indices']}, data seed {data_seed}) in "
        f"{root}: {data_info['num_train']} training / {data_info['num_val']} validation cases")
    cfg = TrainConfig(local_epochs=1, batch_size=batch_size, learning_rate=learning_rate, image_size=size,
                      device=device, seed=seed)
    trainer = LocalTrainer(task_obj, datalist, cfg)
    model = TaskNetwork(task, network, init_seed=seed)
    curve, steps, t0 = [], 0, time.perf_counter()
    kept_epoch, kept_state = epochs, None
    for epoch in range(epochs):
        stats = trainer.train(model)
        steps += int(stats["steps"])
        dice = trainer.evaluate(model, with_hd95=False).get("dice_mean")
        curve.append(dice)
        log(f"epoch {epoch + 1}/{epochs}: {stats['steps']} steps, loss {stats['loss']:.4f}, public validation "
            f"Dice {dice if dice is None else round(dice, 4)}, {time.perf_counter() - t0:.0f} s")
        if keep == "best" and dice is not None and (kept_state is None or dice > curve[kept_epoch - 1]):
            kept_epoch, kept_state = epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kept_state is not None:
        model.load_state_dict(kept_state)
        log(f"keeping epoch {kept_epoch} (best public validation Dice {curve[kept_epoch - 1]:.4f})")
    provenance = {
        "task": task, "network": network, "image_size": list(shape),
        "data": data_info,
        "training": {"trainer": "adpfl.training.LocalTrainer", "epochs": epochs, "steps": steps,
                     "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
                     "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                     "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)"},
        "public_validation_dice_by_epoch": curve,
        "kept_epoch": kept_epoch,
        "keep": keep,
        "privacy": "trained only on public data: no site's records, so no site's budget is spent",
        "command": command,
    }
    record = save_public_checkpoint(model.state_dict(), out, provenance)
    log(f"wrote {out} (sha256 {record['sha256'][:16]}...) and its provenance")
    return record


def add_parser(sub) -> None:
    """``adpfl pretrain-public``."""
    from adpfl.data.sizes import DATA_SIZES
    from adpfl.tasks.base import NETWORKS, TASK_NAMES

    p = sub.add_parser("pretrain-public", help="train a warm-start checkpoint on declared public (synthetic, "
                       "non-federation) sites; writes the weights and <out>.provenance.json")
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--out", required=True, help="the checkpoint file (its provenance is written beside it)")
    p.add_argument("--network", default="standard", choices=NETWORKS, help="must be the job's `network`")
    p.add_argument("--data-root", default=None, help="parent of the public data (default ~/.cache/adpfl/data)")
    p.add_argument("--data-size", default="tiny", choices=DATA_SIZES, help="the public sites' size preset")
    p.add_argument("--num-train", type=int, default=None, help="training cases per public site (default: preset)")
    p.add_argument("--num-val", type=int, default=None, help="validation cases per public site (default: preset)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--public-sites", type=int, default=3, help="public sites public-1..N (default 3)")
    p.add_argument("--data-seed", type=int, default=PUBLIC_DATA_SEED, help="the public data's generator seed")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0, help="initial weights, shuffling, augmentation")
    p.add_argument("--keep", default="last", choices=["last", "best"],
                   help="which epoch's weights to write: the last, or the best on the public validation cases")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import shlex
    import sys

    pretrain_public(args.task, args.out, network=args.network, data_root=args.data_root, data_size=args.data_size,
                    num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                    epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    public_sites=args.public_sites, data_seed=args.data_seed, seed=args.seed, device=args.device,
                    keep=args.keep,
                    command="adpfl " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0
