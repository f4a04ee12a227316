"""Gradient inversion on the real skin2d UNet and under every default private setting.

    python bench/attack_eval.py [--size 32] [--restarts 2] [--iterations 200] [--out docs/results/attack_eval]

Threat model: honest-but-curious server, round 1 (the initial global model), one local
DiceCE step of one site on a batch of 1 or 4 images whose label masks it knows; it
observes the released update (as a gradient). Network: ``get_task("skin2d").build_network()``
(MONAI UNet (16, 32, 64, 128), 2 residual units, InstanceNorm without affine, PReLU; 402k
parameters). Attack (``adpfl.evaluation.image_prior``): a Gaussian prior over the
coefficients of mask-derived basis images, fitted on public synthetic images (a generator
seed no site uses); gradient matching (layer-wise cosine) in that prior's whitened
coefficient space from the prior mean plus random restarts, the best restart by gradient
loss. Baselines (no gradient): the public mean colour, the mask painted with the public
mean lesion / skin colours, and the prior's own guess given the mask (the reconstruction's
starting point). Success (justified in docs/privacy-evaluation.md section 2): PSNR at
least 3 dB above the prior-only guess, SSIM at least 0.2 above the mean colour and not
below the prior-only guess.
Part 2: the same attack on what each default private setting of the skin2d jobs releases
(``adpfl.flare.jobs``: DP-FL and ADP-FL update level, record-level DP-SGD at epsilon 8).
CPU, torch.set_num_threads(1); fixed noise seeds.
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


def _cases(size: int, n: int, clean: bool = False, first: int = 0):
    """Site-style cases ``first .. first+n-1`` (``default_rng(i)``, site shift ``i``); ``clean``:
    the same cases without their sensor noise (the generator draws the noise last, so
    ``noise_sigma = 0`` leaves every other draw, and the image, unchanged)."""
    from adpfl.data.synthetic_skin import make_skin_case, skin_domain_shift

    xs, ys = [], []
    for i in range(first, first + n):
        shift = dict(skin_domain_shift(i), **({"noise_sigma": 0.0} if clean else {}))
        img, mask = make_skin_case(np.random.default_rng(i), (size, size), shift)
        xs.append(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
        ys.append(torch.from_numpy(mask > 127)[None, None].float())
    return torch.cat(xs), torch.cat(ys)


def job_default_settings():
    """(name, mode, privacy, unit) of every default private setting of the skin2d jobs."""
    from adpfl.flare.jobs import MODE_DEFAULTS, TASK_DEFAULTS
    from adpfl.modes import MODE_LABELS, UPDATE_MODES
    from adpfl.privacy.config import DPSGDConfig, PrivacyConfig
    from adpfl.privacy.record import calibrate_with_prior

    rounds = TASK_DEFAULTS["skin2d"]["num_rounds"]
    out = [("NP-FL", "npfl", None, "none")]
    for mode in UPDATE_MODES:
        cfg = dict(MODE_DEFAULTS[mode], **TASK_DEFAULTS["skin2d"]["privacy"], planned_rounds=rounds, track_prv=False)
        label = MODE_LABELS[mode]
        out.append((f"{label} job default (target {cfg['target_epsilon']:g} over {rounds} rounds)", mode,
                    PrivacyConfig(**cfg), "update-level (site's round update); epsilon of this one release"))
    n, batch, epochs = 40, 8, 2  # the skin2d job: 40 synthetic records, TrainConfig defaults
    q, steps = batch / n, rounds * epochs * int(n / batch)
    dp = DPSGDConfig()
    z = calibrate_with_prior([], 8.0, dp.delta, q, steps, dp.epsilon_tolerance)
    out.append(("DP-SGD eps 8", "dpsgd", {"noise_multiplier": z, "max_grad_norm": dp.max_grad_norm,
                                          "sample_rate": q, "steps": steps, "delta": dp.delta},
                f"record-level (one image; whole job: {steps} steps at q={q:g})"))
    # ADP-SGD: the attacker's best step is one of the least-noise round the schedule allows
    # (min_factor x the even plan, effective z), its gradient share z_g (the rest of the
    # effective z is the adaptive clip's count noise); the job's total stays at the target
    from adpfl.privacy.record_adaptive import RecordNoiseSchedule, gradient_noise_multiplier

    sched = RecordNoiseSchedule(8.0, dp.delta, rounds, q, steps // rounds, dp.noise_min_factor, dp.noise_max_factor)
    z_least = dp.noise_min_factor * sched.z_plan
    z_g = gradient_noise_multiplier(z_least, dp.clip_count_noise)
    out.append((f"ADP-SGD eps 8 (least-noise round: effective z {z_least:.3g})", "dpsgd",
                {"noise_multiplier": z_g, "max_grad_norm": dp.max_grad_norm, "sample_rate": q, "steps": steps,
                 "delta": dp.delta, "accounted_epsilon": 8.0},
                "record-level (one image; the job's target, enforced by the record ledger)"))
    return out


def diagnose(a) -> int:
    """Why pixel-space matching stalls: ``1 - cos`` between the gradient of image 0 and of
    changed images (whole gradient, and the share of the gradient norm per layer)."""
    import torch.nn.functional as F

    from _machine import machine
    from adpfl.evaluation.attack import default_loss, image_metrics, model_gradient
    from adpfl.evaluation.image_prior import LinearPrior, mask_basis, public_skin_images
    from adpfl.tasks.base import get_task

    print("machine:", machine(), flush=True)
    P, PM = public_skin_images(a.public, a.size)
    prior = LinearPrior.fit(P, PM)
    X, Y = _cases(a.size, 1)
    torch.manual_seed(0)
    net = get_task("skin2d").build_network().eval()
    names = [n for n, _ in net.named_parameters()]
    g0 = [g.detach() for g in model_gradient(net, default_loss(), X, Y)]
    fit = torch.einsum("bck,bkhw->bchw", LinearPrior.fit_coefficients(X, Y), mask_basis(Y)).clamp(0, 1)
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([0.05, -0.05, 0]).view(1, 3, 1, 1)
    cands = {"mean colour (public)": P.mean(dim=(0, 2, 3), keepdim=True).expand_as(X), "gain x0.9": X * 0.9,
             "colour shift (+0.05, -0.05, 0)": X + shift,
             "pixel noise std 0.003": X + 0.003 * noise, "pixel noise std 0.01": X + 0.01 * noise,
             "2x2 blur (down/up)": F.interpolate(F.avg_pool2d(X, 2), scale_factor=2, mode="bilinear"),
             "least-squares fit of the prior's basis (oracle)": fit,
             "prior's guess given the mask": prior.prior_guess(Y)}
    lines = [f"Command: `python bench/attack_eval.py --diagnose --size {a.size} --public {a.public}`; "
             f"machine: {machine()}.", "", "| image | PSNR / SSIM vs truth | 1 - cos of the whole gradient |",
             "|---|---|---|"]
    for k, v in cands.items():
        v = v.clamp(0, 1)
        g = [t.detach() for t in model_gradient(net, default_loss(), v, Y)]
        cos = F.cosine_similarity(torch.cat([u.flatten() for u in g]), torch.cat([w.flatten() for w in g0]), dim=0)
        q = image_metrics(v, X)
        lines.append(f"| {k} | {q['psnr']:.1f} / {q['ssim']:.3f} | {1 - float(cos):.3f} |")
    norms = torch.stack([t.norm() ** 2 for t in g0])
    top = sorted(zip((norms / norms.sum()).tolist(), names), reverse=True)[:3]
    lines += ["", "Largest shares of the squared gradient norm: " + "; ".join(f"{n} {v:.2f}" for v, n in top)]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "diagnose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--public", type=int, default=400, help="public images the prior is fitted on")
    ap.add_argument("--single", type=int, default=4, help="images attacked one at a time (batch 1)")
    ap.add_argument("--out", default="docs/results/attack_eval")
    ap.add_argument("--no-dp", action="store_true", help="only the rows without DP")
    ap.add_argument("--controls", action="store_true", help="only the dp network without DP and pure-noise controls")
    ap.add_argument("--diagnose", action="store_true", help="only the gradient-sensitivity table (seconds)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if a.diagnose:
        return diagnose(a)
    from _machine import machine
    from adpfl.evaluation.attack import image_metrics, mask_painted_baseline, observed_gradient
    from adpfl.evaluation.image_prior import LatentAttackConfig, LinearPrior, invert_with_prior, public_skin_images
    from adpfl.tasks.base import get_task

    print("machine:", machine(), flush=True)
    t_all = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    P, PM = public_skin_images(a.public, a.size)
    prior = LinearPrior.fit(P, PM)
    mean = P.mean(dim=(0, 2, 3), keepdim=True)
    X, Y = _cases(a.size, max(8, a.single))
    cfg = LatentAttackConfig(restarts=a.restarts, latent_iterations=a.iterations)
    rows, grid = [], []

    def run(setting, mode, priv, unit, idx, seed, net_name=None):
        torch.manual_seed(0)
        # each setting on the network its job trains (the record-level jobs' `network` setting)
        if net_name is None:
            from adpfl.flare.jobs import job_settings

            net_name = job_settings("skin2d", "dpsgd")["executor"]["network"] if mode == "dpsgd" else "standard"
        net = get_task("skin2d").build_network(net_name)
        x, y = X[idx], Y[idx]
        t0 = time.perf_counter()
        grads, masks, info = observed_gradient(net, x, y, mode, priv, lr=0.1, seed=seed)
        r = invert_with_prior(net, prior, grads, y, config=cfg, masks=masks)
        sec = time.perf_counter() - t0
        guess = prior.prior_guess(y)
        m = image_metrics(r["image"], x, mean)
        pm, gm = image_metrics(mask_painted_baseline(y, P, PM), x), image_metrics(guess, x)
        if isinstance(priv, dict) and "accounted_epsilon" in priv:
            info["epsilon"] = priv["accounted_epsilon"]
        row = dict(setting=setting, unit=unit, network=net_name, images=",".join(str(i) for i in idx), batch=len(idx),
                   epsilon=info.get("epsilon", float("inf")), delta=info.get("delta"), z=info.get("noise_multiplier"),
                   cost=r["cost"], seconds=sec, painted_psnr=pm["psnr"], painted_ssim=pm["ssim"],
                   prior_psnr=gm["psnr"], prior_ssim=gm["ssim"], **m)
        row["leak"] = m["psnr"] >= gm["psnr"] + 3.0 and m["ssim"] >= gm["ssim"]
        row["success"] = row["leak"] and m["ssim"] >= m["ssim_baseline"] + 0.2
        rows.append(row)
        grid.append((f"{setting.split(' (')[0]}, b{len(idx)}", x, guess, r["image"]))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    if a.controls:
        # the `dp` network without DP, and a pure-noise "gradient" (DP-SGD at z = 1e6: no
        # signal left) on both networks: what the optimiser reaches from the prior alone
        noise = {"noise_multiplier": 1e6, "max_grad_norm": 1.0, "sample_rate": 1.0, "steps": 1, "delta": 1e-5}
        run("NP-FL", "npfl", None, "none", [0], None, "dp")
        for net_name in ("dp", "standard"):
            run("control: pure noise", "dpsgd", noise, "none (no signal)", [0], 31, net_name)
        _write(out, rows, grid, a, machine(), time.perf_counter() - t_all)
        return 0
    for i in range(a.single):
        run("NP-FL", "npfl", None, "none", [i], None)
    run("NP-FL", "npfl", None, "none", [0, 1, 2, 3], None)
    for j, (name, mode, priv, unit) in enumerate([] if a.no_dp else job_default_settings()):
        if mode != "npfl":
            run(name, mode, priv, unit, [0], 11 + j)
            run(name, mode, priv, unit, [0, 1, 2, 3], 21 + j)
    _write(out, rows, grid, a, machine(), time.perf_counter() - t_all)
    return 0


def _write(out: Path, rows, grid, a, machine_line: str, wall: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_cols = max(len(g[1]) for g in grid)
    fig, axes = plt.subplots(3 * len(grid), n_cols, figsize=(1.3 * n_cols, 1.35 * 3 * len(grid)), squeeze=False)
    for i, (title, truth, guess, recon) in enumerate(grid):
        for k, (what, ims) in enumerate((("truth", truth), ("prior only", guess), ("reconstruction", recon))):
            for j in range(n_cols):
                ax = axes[3 * i + k, j]
                ax.axis("off")
                if j < len(ims):
                    ax.imshow(ims[j].permute(1, 2, 0).clamp(0, 1).numpy())
                    if j == 0:
                        ax.set_title(f"{title}: {what}", fontsize=5, loc="left")
    fig.tight_layout()
    fig.savefig(out / "attack_grid.png", dpi=60)
    Image.open(out / "attack_grid.png").convert("RGB").quantize(colors=128).save(out / "attack_grid.png",
                                                                                 optimize=True)
    flags = (" --no-dp" if a.no_dp else "") + (" --controls" if a.controls else "")
    lines = [f"Command: `python bench/attack_eval.py --size {a.size} --restarts {a.restarts} --iterations "
             f"{a.iterations} --public {a.public} --single {a.single}{flags} "
             f"--out {a.out}`; machine: {machine_line}; "
             f"wall {wall / 60:.1f} min for the whole script.", "",
             "| setting | network | unit | images (batch) | accounted epsilon (delta, Opacus RDP) "
             "| reconstruction PSNR / SSIM "
             "| mean colour PSNR / SSIM | painted mask PSNR / SSIM | prior only PSNR / SSIM | layer-wise 1 - cos "
             "| leaks beyond the prior (PSNR >= prior + 3 dB, SSIM >= prior) | and SSIM >= mean colour + 0.2 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "none" if r["epsilon"] == float("inf") else f"{r['epsilon']:.4g} ({r['delta']:g}), z={r['z']:.4g}"
        lines.append(f"| {r['setting']} | {r['network']} | {r['unit']} | {r['images']} ({r['batch']}) | {eps} "
                     f"| {r['psnr']:.2f} / {r['ssim']:.3f} | {r['psnr_baseline']:.2f} / {r['ssim_baseline']:.3f} "
                     f"| {r['painted_psnr']:.2f} / {r['painted_ssim']:.3f} "
                     f"| {r['prior_psnr']:.2f} / {r['prior_ssim']:.3f} "
                     f"| {r['cost']:.3f} | {'yes' if r['leak'] else 'no'} | {'yes' if r['success'] else 'no'} "
                     f"| {r['seconds']:.0f} |")
    (out / "attack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
