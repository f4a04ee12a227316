"""Membership inference on the final global model: NP-FL vs DP-SGD (record-level eps 8).

    python bench/mia_eval.py [--train 12] [--size 16] [--rounds 15] [--epochs 10] [--shadows 3]
                             [--nonmembers 100] [--out docs/results/privacy_audit]
    python bench/mia_eval.py --online 4 --train 150 --size 32 --rounds 4 --epochs 3 \
        --dp-network dp --dp-batch 32 --dp-lr 0.01 --dp-steps 15 --npfl-lr 1e-3 --val 30 --out ...
    python bench/mia_eval.py --online 4 --probe 10 12 14 16 18 --train 80 --size 32 --rounds 20 --epochs 5 \
        --npfl-lr 1e-3 --dp-network dp --dp-batch 32 --dp-lr 0.01 --dp-steps 12 --dp-rounds 4 --val 30 \
        --name mia_middle.md --out ...   (docs/privacy-evaluation.md 4.2: NP-FL leaks, DP-SGD learns)

Setting chosen to make NP-FL overfit (the tiny-dataset regime; at 16 images per site and 6
rounds x 5 epochs its loss-threshold AUC was still 0.557 +- 0.049): in-process FedAvg (no
FLARE; the trainers the FLARE executor runs) over 3 synthetic skin2d sites of ``--train``
records each, ``--rounds`` rounds of ``--epochs`` local epochs, batch 8, Adam lr 2e-3. NP-FL
trains with ``LocalTrainer``; DP-SGD with ``DPSGDTrainer`` at record-level epsilon 8 (delta
1e-5, Opacus RDP, calibrated over the rounds, max_grad_norm 1), one trainer per site kept
across rounds. Members = every site's training images; non-members = ``--nonmembers``
fresh images per site from the same generator and site (their validation lists).

Attacks on the final global model (black box: per-image loss / confidence only):

* loss threshold (Yeom et al. 2018): score = -DiceCE loss of the image;
* offline LiRA (Carlini et al. 2022, the offline variant with a fixed variance, as they
  advise for few shadow models): ``--shadows`` shadow federations trained exactly like the
  target (same algorithm, same privacy settings) on the public generator's other seeds
  (1, 2, ...; same sites and sizes, so every candidate image is *out* of every shadow);
  per image the logit-scaled confidence ``phi = log(p / (1 - p))`` with ``p = exp(-CE)``
  (CE: the mean pixel cross-entropy, so ``p`` is the geometric mean of the true-class
  pixel probabilities); score = ``(phi_target - mean_out) / std_out``, ``mean_out`` the
  image's mean over the shadows, ``std_out`` pooled over all images.

Online LiRA (``--online K``, K even; Carlini et al. 2022, online variant with a global
variance per side, their advice for few shadows): each site's pool of ``2 * --train``
images (its training list) is split at random into the target's members and its
non-members; shadow federations 2j and 2j+1 train on complementary random halves of every
site's pool, so each candidate is IN exactly K/2 shadows and OUT of K/2. Per candidate,
``mu_in`` / ``mu_out`` = mean ``phi`` over its IN / OUT shadows; ``sigma_in`` / ``sigma_out``
pooled over all candidates; score = ``log N(phi; mu_in, sigma_in) - log N(phi; mu_out,
sigma_out)``. The offline score from the same OUT shadows is reported beside it, and (K > 2)
the online score from the first complementary pair alone (each candidate 1 IN, 1 OUT: the
fewest shadows online LiRA runs with), to show what the extra shadows add. ``--dp-*``
and ``--npfl-*`` set each setting's own network, batch, learning rate and (DP-SGD) steps per
round, so each trains in its own best known configuration (docs/results/record_skin2d_realistic_b32).

Probing (``--probe R1 R2 ...``, with ``--online K``; K = 0 trains the targets only): the
target's global model is also scored after each listed round (and after the last): the
loss-threshold AUC (std err), TPR at 1 % FPR, the members' and the non-members' mean loss (the
train / held-out loss gap that overfitting opens) and the Dice, one row per probe, written to
``mia_probe.md`` (or ``--name``). One training gives a whole epochs axis of the cheap attack, so
a grid over members per site x epochs costs one federation per members value. ``--dp-rounds``
lets DP-SGD keep its own (public) schedule while NP-FL trains longer on the same members.

Reported per setting: AUC (Mann-Whitney, 0.5 = no leakage), TPR at 1 % FPR (threshold at the
99th percentile of the non-members' scores), mean losses, the final global model's Dice on
the sites' validation images. The Mann-Whitney standard error of the AUC is printed too.
Writes ``mia.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
SITES = ("site-1", "site-2", "site-3")
HEADER = ("| setting | accounted epsilon (unit, delta, accountant) | members / non-members | attack | AUC (std err) "
          "| TPR at 1 % FPR | mean loss members / non-members | final global Dice (sites' validation) "
          "| training s (target; shadows) |",
          "|---|---|---|---|---|---|---|---|---|")


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P[score(member) > score(non-member)] + 0.5 P[tie] (the Mann-Whitney AUC)."""
    m, n = np.asarray(members)[:, None], np.asarray(non_members)[None, :]
    return float((m > n).mean() + 0.5 * (m == n).mean())


def auc_std_error(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley-McNeil standard error of an AUC."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of members scoring above the (1 - fpr) quantile of the non-members."""
    t = np.quantile(np.asarray(non_members), 1.0 - fpr, method="higher")
    return float((np.asarray(members) > t).mean())


def image_stats(model, trainer, entries) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the DiceCE loss and the logit-scaled confidence phi = log(p / (1 - p)),
    p = exp(-mean pixel CE), of ``model`` (eval mode, validation transforms)."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    tf = trainer.task.val_transforms(trainer.config.image_size)
    model.eval()
    loss, phi = [], []
    with torch.no_grad():
        for e in entries:
            d = tf(dict(e))
            x, y = d["image"][None].float(), d["label"][None].float()
            out = model(x)
            loss.append(float(loss_fn(out, y)))
            ce = float(torch.nn.functional.cross_entropy(out, y[:, 0].long()))
            # log p - log(1 - p) with log p = -ce, stable for small ce
            phi.append(-ce - math.log(-math.expm1(-ce)) if ce > 0 else 50.0)
    return np.asarray(loss), np.asarray(phi)


def lira_online(phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Online LiRA with global variances: ``phi`` (candidates,), ``shadow_phi`` and
    ``shadow_in`` (shadows, candidates; bool). Returns (online score, offline score from the
    OUT shadows only). Every candidate needs at least one IN and one OUT shadow."""
    sp, sin = np.asarray(shadow_phi, float), np.asarray(shadow_in, bool)
    n_in, n_out = sin.sum(axis=0), (~sin).sum(axis=0)
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError("online LiRA needs every candidate IN and OUT of at least one shadow")
    mu_in = np.where(sin, sp, 0.0).sum(axis=0) / n_in
    mu_out = np.where(~sin, sp, 0.0).sum(axis=0) / n_out
    s_in = math.sqrt(float(np.where(sin, (sp - mu_in) ** 2, 0.0).sum()) / max(1, int(n_in.sum() - len(n_in))))
    s_out = math.sqrt(float(np.where(~sin, (sp - mu_out) ** 2, 0.0).sum()) / max(1, int(n_out.sum() - len(n_out))))
    s_in, s_out = max(s_in, 1e-6), max(s_out, 1e-6)
    online = (-0.5 * ((phi - mu_in) / s_in) ** 2 - math.log(s_in)) - (-0.5 * ((phi - mu_out) / s_out) ** 2
                                                                       - math.log(s_out))
    return online, (phi - mu_out) / s_out


def setting_rounds(kind: str, a) -> int:
    """FedAvg rounds of ``kind``: DP-SGD may keep its own schedule (``--dp-rounds``)."""
    return a.rounds if kind == "NP-FL" or a.dp_rounds is None else a.dp_rounds


def probe_row(name: str, r: int, epochs: int, info: str, loss: np.ndarray, member: np.ndarray, dice: float,
              secs: float) -> str:
    """One probe row: the loss-threshold attack and the train / held-out loss gap after round ``r``."""
    n_m, n_n = int(member.sum()), int((~member).sum())
    au = auc(-loss[member], -loss[~member])
    return (f"| {name} | {r} | {r * epochs} | {info} | {n_m} / {n_n} | {au:.3f} ({auc_std_error(au, n_m, n_n):.3f}) "
            f"| {tpr_at_fpr(-loss[member], -loss[~member]):.3f} | {loss[member].mean():.3f} / "
            f"{loss[~member].mean():.3f} | {dice:.3f} | {secs:.0f} |")


PROBE_HEADER = ("| setting | round | local epochs so far | accounted epsilon (unit, delta, accountant) "
                "| members / non-members | loss-threshold AUC (std err) | TPR at 1 % FPR "
                "| mean loss members / non-members | Dice (sites' validation) | training s so far |",
                "|---|---|---|---|---|---|---|---|---|---|")


def setting_config(kind: str, a):
    """The TrainConfig and network variant of ``kind`` (NP-FL or DP-SGD) from the options."""
    from adpfl.training import TrainConfig

    if kind == "NP-FL":
        return TrainConfig(local_epochs=a.epochs, batch_size=a.npfl_batch, learning_rate=a.npfl_lr,
                           image_size=a.size, device="cpu", seed=0), a.npfl_network
    return TrainConfig(local_epochs=a.epochs, batch_size=a.dp_batch, learning_rate=a.dp_lr, image_size=a.size,
                       device="cpu", seed=0, max_steps_per_round=a.dp_steps), a.dp_network


def train_federation(kind: str, dls: list[dict], cfg, rounds: int, epsilon: float, seed: int,
                     network: str = "standard", on_round=None):
    """FedAvg of ``rounds`` rounds over the sites' datalists; returns (global model, trainers,
    privacy info, seconds). ``on_round(r, global model, trainers, info, seconds so far)``, if
    given, runs after each round ``r`` (1-based); its time is not counted in the seconds."""
    from adpfl.privacy.config import DPSGDConfig
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training import LocalTrainer
    from adpfl.training.dpsgd import DPSGDTrainer

    task = get_task("skin2d")
    torch.manual_seed(seed)
    if kind == "NP-FL":
        trainers = [LocalTrainer(task, dl, cfg) for dl in dls]
    else:
        dp = DPSGDConfig(target_epsilon=epsilon, planned_rounds=rounds)
        trainers = [DPSGDTrainer(task, dl, cfg, dp) for dl in dls]
    g = TaskNetwork("skin2d", network)
    models = [TaskNetwork("skin2d", network) for _ in dls]
    info, t0, probe_s = "none", time.perf_counter(), 0.0
    for r in range(rounds):
        gs = {k: v.clone() for k, v in g.state_dict().items()}
        deltas = []
        for m, tr in zip(models, trainers):
            m.load_state_dict(gs)
            res = tr.train(m)
            deltas.append({k: v - gs[k] for k, v in m.state_dict().items()})
            if "epsilon" in res:
                info = (f"{res['epsilon']:.3f}, record-level (one image), delta {res['delta']:g}, Opacus RDP; "
                        f"z = {res['noise_multiplier']:.4g}, q = {res['sample_rate']:.3g}, "
                        f"{sum(int(h[2]) for h in tr.history)} steps")
        g.load_state_dict({k: gs[k] + sum(d[k] for d in deltas) / len(deltas) for k in gs})
        if on_round is not None:
            tp = time.perf_counter()
            on_round(r + 1, g, trainers, info, tp - t0 - probe_s)
            probe_s += time.perf_counter() - tp
    return g, trainers, info, time.perf_counter() - t0 - probe_s


def result_rows(name: str, info: str, scores: dict, member: np.ndarray, loss: np.ndarray, dice: float,
                secs: float, shadow_s: float) -> list[str]:
    """One table row per attack (``member``: bool mask over the candidates)."""
    n_m, n_n = int(member.sum()), int((~member).sum())
    rows = []
    for attack, sc in scores.items():
        au = auc(sc[member], sc[~member])
        rows.append(f"| {name} | {info} | {n_m} / {n_n} | {attack} | {au:.3f} ({auc_std_error(au, n_m, n_n):.3f}) "
                    f"| {tpr_at_fpr(sc[member], sc[~member]):.3f} | {loss[member].mean():.3f} / "
                    f"{loss[~member].mean():.3f} | {dice:.3f} | {secs:.0f}; {shadow_s:.0f} |")
        print(rows[-1], flush=True)
    return rows


def finish(a, head: str, lines: list[str], t_start: float, name: str) -> int:
    tail = f"wall {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f}"
    print(tail, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(head + "\n\n" + "\n".join(lines) + "\n\n" + tail + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=12, help="training images per site (members)")
    ap.add_argument("--nonmembers", type=int, default=100, help="fresh images per site (non-members)")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=10, help="local epochs per round")
    ap.add_argument("--shadows", type=int, default=3, help="shadow federations per setting for offline LiRA")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--settings", nargs="*", default=["NP-FL", "DP-SGD"])
    ap.add_argument("--online", type=int, default=0,
                    help="K > 0 (even): online LiRA with K shadows on halves of a pool of 2 x --train per site")
    ap.add_argument("--val", type=int, default=None, help="validation images per site for Dice (online mode)")
    ap.add_argument("--npfl-batch", type=int, default=8)
    ap.add_argument("--npfl-lr", type=float, default=2e-3)
    ap.add_argument("--npfl-network", default="standard")
    ap.add_argument("--dp-batch", type=int, default=8)
    ap.add_argument("--dp-lr", type=float, default=2e-3)
    ap.add_argument("--dp-network", default="standard")
    ap.add_argument("--dp-steps", type=int, default=None, help="DP-SGD steps per round (None: --epochs epochs)")
    ap.add_argument("--dp-rounds", type=int, default=None, help="DP-SGD's FedAvg rounds (None: --rounds)")
    ap.add_argument("--probe", type=int, nargs="*", default=[],
                    help="rounds after which the target is probed (loss threshold, loss gap, Dice); with --online")
    ap.add_argument("--name", default=None, help="result file name (default mia.md / mia_online.md / mia_probe.md)")
    ap.add_argument("--out", default="docs/results/privacy_audit")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from _machine import run_header
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data

    if a.online or a.probe:
        return main_online(a, argv)
    head = run_header("mia_eval.py", argv)
    print(head, flush=True)
    t_start = time.perf_counter()
    base = Path(tempfile.gettempdir()) / f"adpfl_mia_{a.size}_{a.train}_{a.nonmembers}"

    def sites(seed: int, n_val: int) -> list[dict]:
        root = base / f"seed{seed}"
        out = []
        for s in SITES:
            ensure_site_data("skin2d", root, s, num_train=a.train, num_val=n_val, seed=seed, size=a.size)
            out.append(load_site_datalist(root, s, task="skin2d"))
        return out

    target = sites(0, a.nonmembers)
    shadow_data = [sites(k + 1, 2) for k in range(a.shadows)]
    members = [e for dl in target for e in dl["training"]]
    non_members = [e for dl in target for e in dl["validation"]]
    cands = members + non_members
    n_m = len(members)
    lines = list(HEADER)
    for kind in a.settings:
        cfg, net = setting_config(kind, a)
        g, trainers, info, secs = train_federation(kind, target, cfg, a.rounds, a.epsilon, seed=0, network=net)
        loss, phi = image_stats(g, trainers[0], cands)
        dice = float(np.mean([tr.evaluate(g, with_hd95=False)["dice_mean"] for tr in trainers]))
        print(f"{kind}: target trained in {secs:.0f} s, Dice {dice:.3f}, {info}", flush=True)
        shadow_phi, shadow_s = [], 0.0
        for k, sd in enumerate(shadow_data):
            sg, st, _, s_secs = train_federation(kind, sd, cfg, a.rounds, a.epsilon, seed=k + 1, network=net)
            shadow_phi.append(image_stats(sg, st[0], cands)[1])
            shadow_s += s_secs
            print(f"  shadow {k + 1}: {s_secs:.0f} s", flush=True)
        scores = {"loss threshold": -loss}
        if shadow_phi:
            sp = np.stack(shadow_phi)  # (shadows, candidates)
            mu = sp.mean(axis=0)
            sd_out = float((sp - mu).std(ddof=1)) if len(sp) > 1 else 1.0
            scores[f"offline LiRA ({len(sp)} shadows, fixed variance)"] = (phi - mu) / max(sd_out, 1e-12)
        member = np.arange(len(cands)) < n_m
        lines += result_rows(kind if kind == "NP-FL" else f"DP-SGD eps {a.epsilon:g}", info, scores, member, loss,
                             dice, secs, shadow_s)
    return finish(a, head, lines, t_start, a.name or "mia.md")


def main_online(a, argv) -> int:
    """Online LiRA (``--online K``) and probes (``--probe``): see the module docstring. Writes
    ``mia_online.md`` (K > 0) or ``mia_probe.md`` (K = 0), or ``--name``."""
    from _machine import run_header
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data

    if a.online % 2:
        raise SystemExit(f"--online must be even (complementary shadow pairs), got {a.online}")
    head = run_header("mia_eval.py", argv)
    print(head, flush=True)
    t_start = time.perf_counter()
    n_val = a.val or 30
    root = Path(tempfile.gettempdir()) / f"adpfl_mia_online_{a.size}_{2 * a.train}_{n_val}"
    pools = []
    for s in SITES:
        ensure_site_data("skin2d", root, s, num_train=2 * a.train, num_val=n_val, seed=0, size=a.size)
        pools.append(load_site_datalist(root, s, task="skin2d"))
    rng = np.random.default_rng(20261124)  # the public split of the experiment (not a privacy draw)

    def half(n: int) -> np.ndarray:
        m = np.zeros(n, bool)
        m[rng.permutation(n)[: n // 2]] = True
        return m

    target_in = [half(len(p["training"])) for p in pools]
    shadow_in = []  # per shadow: per site mask
    for _j in range(a.online // 2):
        h = [half(len(p["training"])) for p in pools]
        shadow_in += [h, [~m for m in h]]

    def subset(masks: list[np.ndarray]) -> list[dict]:
        return [{**p, "training": [e for e, keep in zip(p["training"], m) if keep]} for p, m in zip(pools, masks)]

    cands = [e for p in pools for e in p["training"]]
    member = np.concatenate(target_in)
    sin = np.stack([np.concatenate(m) for m in shadow_in]) if shadow_in else None
    lines, probes = list(HEADER), list(PROBE_HEADER)
    for kind in a.settings:
        cfg, net = setting_config(kind, a)
        rounds = setting_rounds(kind, a)
        name = "NP-FL" if kind == "NP-FL" else f"DP-SGD eps {a.epsilon:g}"

        def probe(r, g, trainers, info, secs, name=name, cfg=cfg, rounds=rounds):
            if r not in a.probe and r != rounds:
                return
            loss = image_stats(g, trainers[0], cands)[0]
            dice = float(np.mean([tr.evaluate(g, with_hd95=False)["dice_mean"] for tr in trainers]))
            probes.append(probe_row(name, r, cfg.local_epochs, info, loss, member, dice, secs))
            print(probes[-1], flush=True)

        g, trainers, info, secs = train_federation(kind, subset(target_in), cfg, rounds, a.epsilon, seed=0,
                                                   network=net, on_round=probe if a.probe else None)
        if not a.online:
            continue
        loss, phi = image_stats(g, trainers[0], cands)
        dice = float(np.mean([tr.evaluate(g, with_hd95=False)["dice_mean"] for tr in trainers]))
        print(f"{kind}: target trained in {secs:.0f} s, Dice {dice:.3f}, {info}", flush=True)
        sphi, shadow_s = [], 0.0
        for k, masks in enumerate(shadow_in):
            sg, st, _, s_secs = train_federation(kind, subset(masks), cfg, rounds, a.epsilon, seed=k + 1,
                                                 network=net)
            sphi.append(image_stats(sg, st[0], cands)[1])
            shadow_s += s_secs
            print(f"  shadow {k + 1}: {s_secs:.0f} s", flush=True)
        online, offline = lira_online(phi, np.stack(sphi), sin)
        scores = {"loss threshold": -loss, f"online LiRA ({a.online} shadows, global variances)": online,
                  "offline LiRA (the same shadows' OUT models, fixed variance)": offline}
        if a.online > 2:  # the fewest shadows online LiRA can run with: the first complementary pair
            scores["online LiRA (its first 2 shadows only)"] = lira_online(phi, np.stack(sphi[:2]), sin[:2])[0]
        lines += result_rows(name, info, scores, member, loss, dice, secs, shadow_s)
    if not a.online:
        lines = []
    if a.probe:
        lines = probes + ([""] if lines else []) + lines
    return finish(a, head, lines, t_start, a.name or ("mia_online.md" if a.online else "mia_probe.md"))


if __name__ == "__main__":
    raise SystemExit(main())
