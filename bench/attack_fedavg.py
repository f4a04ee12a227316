"""Multi-step FedAvg attack on the real skin2d UNet: the site's update after E local steps.

    python bench/attack_fedavg.py [--size 128] [--batch 4] [--steps 3] [--iterations 80]
        [--rows nodp|dp|all] [--out docs/results/attack_eval/fedavg128]

Threat model: as bench/attack_eval.py (honest-but-curious server, round 1, known masks),
but the site trains ``--steps`` local steps (Adam at the job's learning rate 1e-3, as
``adpfl.training.loop`` does; batch ``--batch`` = all the site's images, so each step is one
epoch) and releases ``w_local - w_global``. The attacker replays those steps
differentiably (``adpfl.evaluation.fedavg_attack.simulated_update``, Adam with a smooth
surrogate ``--adam-eps``) on images drawn from the public prior
(``adpfl.evaluation.image_prior``) and matches the released update (layer-wise cosine).
Rows: no DP, a pure-noise control (no signal, same recipe), and the job defaults of
bench/attack_eval.py's ``job_default_settings`` (DP-FL / ADP-FL: the multi-step update through
the site's release pipeline; DP-SGD / ADP-SGD: every local step per-sample clipped and
noised at the job's z). Scores vs the true images; the normalised SSIM gain uses the
noise-free images as ceiling (bench/attack_controls.py). CPU, torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3, help="the site's Adam learning rate (TrainConfig default)")
    ap.add_argument("--adam-eps", type=float, default=1e-5, help="the attacker's smooth surrogate of Adam's eps")
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--public", type=int, default=200)
    ap.add_argument("--rows", choices=("nodp", "dp-update", "dp-record", "all"), default="all",
                    help="nodp: no DP + pure-noise control; dp-update: DP-FL/ADP-FL; dp-record: DP-SGD/ADP-SGD")
    ap.add_argument("--out", default="docs/results/attack_eval/fedavg128")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from adpfl.evaluation.attack import image_metrics, release_update
    from adpfl.evaluation.fedavg_attack import local_update, simulated_update
    from adpfl.evaluation.image_prior import LatentAttackConfig, invert_with_prior
    from adpfl.modes import UPDATE_MODES
    from adpfl.tasks.base import get_task
    from attack_controls import normalised_gain, setup
    from attack_eval import job_default_settings

    header, t_all, prior, mean, X, Y, C = setup("attack_fedavg.py", argv, a.public, a.size, a.batch)
    torch.manual_seed(0)
    net = get_task("skin2d").build_network().eval()

    def observe(img, lab):
        return simulated_update(net, img, lab, a.steps, a.lr, "adam", a.batch, adam_eps=a.adam_eps)

    cfg = LatentAttackConfig(restarts=a.restarts, latent_iterations=a.iterations, observe=observe)
    clear = local_update(net, X, Y, a.steps, a.lr, "adam", a.batch)
    settings = [("NP-FL", "none", None, clear, [None] * len(clear))]
    gen = torch.Generator().manual_seed(7)
    settings.append(("control: pure noise", "none (no signal)", {"epsilon": 0.0},
                     [torch.randn(u.shape, generator=gen) for u in clear], [None] * len(clear)))
    if a.rows.startswith("dp"):
        settings = []
    if a.rows != "nodp":
        for j, (name, mode, priv, unit) in enumerate(job_default_settings()):
            if a.rows != "all" and (mode == "dpsgd") != (a.rows == "dp-record"):
                continue
            if mode in UPDATE_MODES:
                rel, masks, info = release_update(net, clear, priv, seed=41 + j)
                settings.append((name, unit, info, rel, masks))
            elif mode == "dpsgd":
                from adpfl.privacy.record import opacus_rdp_epsilon

                upd = local_update(net, X, Y, a.steps, a.lr, "adam", a.batch, dpsgd=priv, seed=51 + j)
                z = priv["noise_multiplier"]
                eps = priv.get("accounted_epsilon") or opacus_rdp_epsilon([(z, priv["sample_rate"], priv["steps"])],
                                                                          priv["delta"])
                # these simulated steps alone (every image in every step, q = 1): their own epsilon
                own = opacus_rdp_epsilon([(z, 1.0, a.steps)], priv["delta"])
                unit = f"{unit}; these {a.steps} steps alone at q=1: eps {own:.3g}"
                settings.append((name, unit, dict(epsilon=eps, delta=priv["delta"], noise_multiplier=z), upd,
                                 [None] * len(upd)))
    base = image_metrics(mean.expand_as(X), X)["ssim"]
    ceiling = image_metrics(C, X)["ssim"]
    guess = image_metrics(prior.prior_guess(Y), X)
    rows, pics = [], [X, C, prior.prior_guess(Y)]
    for name, unit, info, target, masks in settings:
        t0 = time.perf_counter()
        r = invert_with_prior(net, prior, target, Y, config=cfg, masks=masks)
        m = image_metrics(r["image"], X)
        m.update(setting=name, unit=unit, info=info or {}, cost=r["cost"], seconds=time.perf_counter() - t0,
                 norm=normalised_gain(m["ssim"], base, ceiling))
        rows.append(m)
        pics.append(r["image"])
        print({k: v for k, v in m.items()}, flush=True)
    _write(Path(a.out), a, header, rows, pics, base, ceiling, guess, time.perf_counter() - t_all)
    return 0


def _write(out: Path, a, header, rows, pics, base, ceiling, guess, wall) -> None:
    import matplotlib

    from attack_controls import normalised_gain

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    titles = ["truth", "noise-free truth", "prior only", *[r["setting"].split(" (")[0] for r in rows]]
    n = pics[0].shape[0]
    fig, axes = plt.subplots(len(pics), n, figsize=(1.3 * n, 1.4 * len(pics)), squeeze=False)
    for i, (t, p) in enumerate(zip(titles, pics)):
        for j in range(n):
            axes[i, j].axis("off")
            axes[i, j].imshow(p[j].permute(1, 2, 0).clamp(0, 1).numpy())
            if j == 0:
                axes[i, j].set_title(t, fontsize=5, loc="left")
    fig.tight_layout()
    fig.savefig(out / f"fedavg_grid_{a.rows}.png", dpi=60)
    lines = [header, f"wall {wall / 60:.1f} min for the whole script; site: {a.batch} images, {a.steps} local Adam "
             f"steps at lr {a.lr:g}, batch {a.batch}; attacker's Adam surrogate eps {a.adam_eps:g}.", "",
             f"Batch scores vs the true (noisy) images: mean colour SSIM {base:.3f}; noise-free images (ceiling) "
             f"SSIM {ceiling:.3f}; prior only PSNR / SSIM {guess['psnr']:.2f} / {guess['ssim']:.3f} "
             f"(normalised gain {normalised_gain(guess['ssim'], base, ceiling):+.2f}).", "",
             "| setting | unit | accounted epsilon (delta) | reconstruction PSNR / SSIM / normalised SSIM gain "
             "| layer-wise 1 - cos | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        e, d, z = (r["info"].get(k) for k in ("epsilon", "delta", "noise_multiplier"))
        eps = "none" if e is None else ("no signal" if e == 0.0 else f"{e:.4g} ({d:g}), z={z:.4g}")
        lines.append(f"| {r['setting']} | {r['unit']} | {eps} | {r['psnr']:.2f} / {r['ssim']:.3f} / {r['norm']:+.2f} "
                     f"| {r['cost']:.3f} | {r['seconds']:.0f} |")
    (out / f"fedavg_{a.rows}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
