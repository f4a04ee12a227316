"""In-process FedAvg of NP-FL / DP-FL / ADP-FL on the synthetic sites (no FLARE).

Same trainer, pipeline and data as the FLARE jobs (the task's job settings: learning rate,
local epochs, batch size; tiny site sizes), without simulator overhead, to choose privacy
defaults quickly and to compare the network variants (setting ``network``). Prints, per
configuration, network and round: update norms per site, the global model's Dice at each
site, epsilon (update-level, RDP, delta 1e-5), z and C; at the end the final mean Dice per
configuration and network, and with several ``--seeds`` (torch seed of weight init, shuffling and
augmentation; the sites' data stay the same) their mean and standard deviation over the seeds.

    python bench/inprocess_fedavg.py --rounds 3 --configs npfl dpfl adpfl_topk adpfl_random
    python bench/inprocess_fedavg.py --task kidney3d --image-size 32 --rounds 5 --configs npfl --networks standard dp
    python bench/inprocess_fedavg.py --task brain3d --image-size 32 --rounds 5 --configs npfl --networks standard dp \
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile

import torch

from adpfl.tasks.base import NETWORKS, TASK_NAMES

CONFIGS = {
    "npfl": None,
    "dpfl": dict(mode="dpfl", clip_norm=2.0),
    "adpfl_topk": dict(mode="adpfl", keep_fraction=0.5, mask_policy="topk_public", clip_norm=2.0,
                       clip_learning_rate=0.2, clip_indicator_noise=1.0),
    "adpfl_random": dict(mode="adpfl", keep_fraction=0.5, mask_policy="random", clip_norm=2.0, clip_learning_rate=0.2,
                         clip_indicator_noise=1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=1e5)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--task", default="skin2d", choices=TASK_NAMES)
    ap.add_argument("--networks", nargs="+", default=["standard"], choices=NETWORKS)
    ap.add_argument("--image-size", type=int, default=None, help="default: the task's")
    ap.add_argument("--data-root", default=None, help="default: <tmp>/adpfl_bench_data/<task>")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="torch seeds, one run each")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_root = args.data_root or os.path.join(tempfile.gettempdir(), "adpfl_bench_data", args.task)

    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.sizes import resolve_data_size
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.flare.jobs import job_settings
    from adpfl.privacy.config import PrivacyConfig
    from adpfl.privacy.ledger import PrivacyLedger
    from adpfl.privacy.pipeline import PrivacyPipeline
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training import LocalTrainer, TrainConfig

    task = get_task(args.task)
    ex = job_settings(args.task, "npfl")["executor"]
    n_train, n_val, _ = resolve_data_size(args.task, "tiny")
    sites = ["site-1", "site-2", "site-3"]
    trainers = []
    for s in sites:
        ensure_site_data(args.task, data_root, s, num_train=n_train, num_val=n_val, size=args.image_size, seed=0)
        dl = load_site_datalist(data_root, s, task=args.task)
        trainers.append(LocalTrainer(task, dl, TrainConfig(local_epochs=ex["local_epochs"], batch_size=ex["batch_size"],
                                                           learning_rate=ex["learning_rate"],
                                                           image_size=args.image_size)))
    print(f"machine: {os.cpu_count()} CPU cores, cuda={torch.cuda.is_available()}; data {data_root}; task "
          f"{args.task}, {n_train}/{n_val} cases per site, image size {args.image_size or 'default'}, "
          f"{ex['local_epochs']} local epochs, batch {ex['batch_size']}, lr {ex['learning_rate']}")
    final = {}
    for seed, name, network in [(s, c, n) for s in args.seeds for c in args.configs for n in args.networks]:
        cfg = CONFIGS[name]
        torch.manual_seed(seed)
        g = TaskNetwork(args.task, network)
        models = [TaskNetwork(args.task, network) for _ in trainers]
        pipes = None
        if cfg is not None:
            pc = dict(cfg, target_epsilon=args.epsilon, planned_rounds=args.rounds, delta=1e-5)
            pipes = [PrivacyPipeline(PrivacyConfig(**pc), PrivacyLedger(delta=1e-5)) for _ in trainers]
        prev = None
        for r in range(args.rounds):
            gs = {k: v.clone() for k, v in g.state_dict().items()}
            if prev is None:
                scores, change = {k: v.abs() for k, v in gs.items()}, None
            else:
                scores = {k: (gs[k] - prev[k]).abs() for k in gs}
                num = math.sqrt(sum(float(((gs[k] - prev[k]) ** 2).sum()) for k in gs))
                change = num / math.sqrt(sum(float((v**2).sum()) for v in gs.values()))
            prev = gs
            deltas, norms, meta = [], [], {}
            for i, (m, tr) in enumerate(zip(models, trainers)):
                m.load_state_dict(gs)
                tr.train(m)
                d = {k: (v - gs[k]).float() for k, v in m.state_dict().items()}
                norms.append(math.sqrt(sum(float((x**2).sum()) for x in d.values())))
                if pipes is not None:
                    d, meta = pipes[i].release(d, r, public_scores=scores, global_change=change)
                deltas.append(d)
            g.load_state_dict({k: gs[k] + sum(d[k] for d in deltas) / len(deltas) for k in gs})
            dice = [tr.evaluate(g, with_hd95=False)["dice_mean"] for tr in trainers]
            final[(name, network, seed)] = sum(dice) / len(dice)
            print(
                f"seed {seed} {name} {network} round {r}: norms {[round(n, 2) for n in norms]} "
                f"dice {[round(x, 3) for x in dice]} "
                f"mean {sum(dice) / len(dice):.3f} eps_rdp {meta.get('epsilon_rdp', 0):.4g} "
                f"z {meta.get('noise_multiplier', 0):.4g} C {meta.get('clip_norm', 0):.4g}",
                flush=True,
            )
    for (name, network, seed), dice in final.items():
        print(f"final: seed {seed} {name} network {network}: mean Dice {dice:.4f} after {args.rounds} rounds")
    for name, network in [(c, n) for c in args.configs for n in args.networks]:
        runs = [final[(name, network, s)] for s in args.seeds]
        sd = statistics.stdev(runs) if len(runs) > 1 else float("nan")
        print(f"over seeds {args.seeds}: {name} network {network}: mean Dice {statistics.mean(runs):.4f} "
              f"(std {sd:.4f}) after {args.rounds} rounds")


if __name__ == "__main__":
    main()
