"""Gradient inversion on the real skin2d UNet and under every default private setting.

    python bench/attack_eval.py [--size 32] [--iterations 600] [--out docs/results/attack_eval]

Part 1, the real task network (``get_task("skin2d").build_network()``: MONAI UNet
(16, 32, 64, 128), 2 residual units, InstanceNorm without affine, PReLU; 402k parameters),
no DP, one local step, batch 1 and batch 4, mask known: the strongest recipe this CPU runs
(cosine + TV, Adam with step decay, signed steps, the normalised parametrisation that
removes the UNet's blind input directions, see ``AttackConfig``).
Part 2, the same attack under the jobs' defaults (``adpfl.flare.jobs``: DP-FL and ADP-FL at
update-level epsilon 1e5 over 5 rounds, clip 2; record-level DP-SGD at epsilon 8 calibrated
for the skin2d job: 40 records, batch 8, 2 epochs, 5 rounds), on the real UNet and on the
24k-parameter stand-in where the attack does work without DP. Baselines: the dataset's
mean colour, and the mask painted with the dataset's mean lesion / skin colours (what the
attacker knows without any gradient). CPU, torch.set_num_threads(1); fixed noise seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cases(size: int, n: int):
    from adpfl.data.synthetic_skin import make_skin_case, skin_domain_shift

    xs, ys = [], []
    for i in range(n):
        img, mask = make_skin_case(np.random.default_rng(i), (size, size), skin_domain_shift(i))
        xs.append(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
        ys.append(torch.from_numpy(mask > 127)[None, None].float())
    return torch.cat(xs), torch.cat(ys)


def job_default_settings():
    """(name, mode, privacy, unit) of every default private setting of the skin2d jobs."""
    from adpfl.flare.jobs import MODE_DEFAULTS, TASK_DEFAULTS
    from adpfl.privacy.config import DPSGDConfig, PrivacyConfig
    from adpfl.privacy.record import calibrate_with_prior

    rounds = TASK_DEFAULTS["skin2d"]["num_rounds"]
    out = [("NP-FL", "npfl", None, "none")]
    for mode in ("dpfl", "adpfl"):
        cfg = dict(MODE_DEFAULTS[mode], **TASK_DEFAULTS["skin2d"]["privacy"], planned_rounds=rounds, track_prv=False)
        label = {"dpfl": "DP-FL", "adpfl": "ADP-FL"}[mode]
        out.append((f"{label} job default (target {cfg['target_epsilon']:g} over {rounds} rounds)", mode,
                    PrivacyConfig(**cfg), "update-level (site's round update); epsilon of this one release"))
    n, batch, epochs = 40, 8, 2  # the skin2d job: 40 synthetic records, TrainConfig defaults
    q, steps = batch / n, rounds * epochs * int(n / batch)
    dp = DPSGDConfig()
    z = calibrate_with_prior([], 8.0, dp.delta, q, steps, dp.epsilon_tolerance)
    out.append(("DP-SGD eps 8", "dpsgd", {"noise_multiplier": z, "max_grad_norm": dp.max_grad_norm,
                                          "sample_rate": q, "steps": steps, "delta": dp.delta},
                f"record-level (one image; whole job: {steps} steps at q={q:g})"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--dp-iterations", type=int, default=300)
    ap.add_argument("--out", default="docs/results/attack_eval")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _machine import machine
    from adpfl.evaluation.attack import AttackConfig, attack_release, mask_painted_baseline, small_attack_net
    from adpfl.tasks.base import get_task

    print("machine:", machine(), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    X, Y = _cases(a.size, 8)  # the attacker's public statistics come from these 8 cases
    mean = X.mean(dim=(0, 2, 3), keepdim=True)
    std = X.std(dim=(2, 3), keepdim=True).mean(0, keepdim=True)
    nets = {"skin2d UNet (402k)": lambda: get_task("skin2d").build_network(), "stand-in (24k)": small_attack_net}
    recipes = {
        "skin2d UNet (402k)": dict(parametrisation="normalised", prior_mean=mean, prior_std=std, tv_weight=0.0),
        "stand-in (24k)": dict(),
    }
    rows, grid = [], []

    def run(net_name, setting, mode, priv, unit, batch, iterations, seed):
        torch.manual_seed(0)
        net = nets[net_name]()
        x, y = X[:batch], Y[:batch]
        painted = mask_painted_baseline(y, X, Y)
        cfg = AttackConfig(iterations=iterations, **recipes[net_name])
        t0 = time.perf_counter()
        r = attack_release(net, x, y, mode, priv, lr=0.1, attack=cfg, baseline=mean, noise_seed=seed)
        sec = time.perf_counter() - t0
        from adpfl.evaluation.attack import image_metrics

        pm = image_metrics(painted, x)
        row = dict(net=net_name, setting=setting, unit=unit, batch=batch, iterations=iterations, seconds=sec,
                   epsilon=r.privacy.get("epsilon", float("inf")), delta=r.privacy.get("delta"),
                   z=r.privacy.get("noise_multiplier"), cost=r.attack_cost, painted_ssim=pm["ssim"],
                   painted_psnr=pm["psnr"], **r.metrics)
        rows.append(row)
        grid.append((f"{net_name.split(' (')[0]}, {setting}, b{batch}", x[0], r.reconstruction[0], painted[0]))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    unet = "skin2d UNet (402k)"
    run(unet, "NP-FL", "npfl", None, "none", 1, a.iterations, None)
    run(unet, "NP-FL", "npfl", None, "none", 4, a.iterations // 2, None)
    for i, (name, mode, priv, unit) in enumerate(job_default_settings()):
        run("stand-in (24k)", name, mode, priv, unit, 1, 400, 11 + i)
        if mode != "npfl":
            run(unet, name, mode, priv, unit, 1, a.dp_iterations, 11 + i)

    fig, axes = plt.subplots(len(grid), 3, figsize=(5.4, 1.9 * len(grid)))
    for i, (title, truth, recon, painted) in enumerate(grid):
        for j, (t, im) in enumerate((("truth", truth), ("reconstruction", recon), ("mask-painted", painted))):
            axes[i, j].imshow(im.permute(1, 2, 0).clamp(0, 1).numpy())
            axes[i, j].set_title(f"{title}: {t}" if j == 1 else t, fontsize=6)
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(out / "attack_grid.png", dpi=70)
    from PIL import Image  # a 128-colour palette keeps the committed PNG small (~40 kB)

    Image.open(out / "attack_grid.png").convert("RGB").quantize(colors=128).save(out / "attack_grid.png",
                                                                                 optimize=True)
    lines = ["| network | setting | unit | batch | accounted epsilon (delta, Opacus RDP) | PSNR / SSIM "
             "| mean-colour baseline PSNR / SSIM | mask-painted baseline PSNR / SSIM | 1 - cos | iterations | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "none" if r["epsilon"] == float("inf") else f"{r['epsilon']:.4g} ({r['delta']:g}), z={r['z']:.4g}"
        lines.append(f"| {r['net']} | {r['setting']} | {r['unit']} | {r['batch']} | {eps} "
                     f"| {r['psnr']:.2f} / {r['ssim']:.3f} | {r['psnr_baseline']:.2f} / {r['ssim_baseline']:.3f} "
                     f"| {r['painted_psnr']:.2f} / {r['painted_ssim']:.3f} | {r['cost']:.3f} "
                     f"| {r['iterations']} | {r['seconds']:.0f} |")
    (out / "attack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
