"""Per-image no-signal controls and the SSIM ceiling of the prior-based inversion (no DP).

    python bench/attack_controls.py [--size 128] [--images 8] [--restarts 1] [--iterations 100]
        [--pixel-iterations 0] [--pixel-tv 1e-3] [--controls all|noise|none] [--out DIR]
    python bench/attack_controls.py --noise-oracle ...   (pixel stage from the noise-free truth)
    python bench/attack_controls.py --basin ...          (is the truth findable from near it?)

For every attacked image i (site-style case ``default_rng(i)``, shift i; mask known) on the
real skin2d UNet (standard, seed 0, round 1), the attack of ``adpfl.evaluation.image_prior``
(prior fitted on public images) is run three times with the same recipe:
* on the image's clear one-step gradient (the attack);
* on a pure-noise "gradient" (i.i.d. Gaussian, same shapes; no signal at all);
* on the gradient of an unrelated image (case ``100 + i``) computed with image i's mask
  (a real gradient that carries nothing about image i).
The **margin** of image i is the attack's score minus the best no-signal control's score
(PSNR in dB; SSIM; normalised SSIM gain). Scores are against the true (noisy) image;
``ceiling`` is the SSIM of the image's own noise-free version (the generator's image
before the sensor noise, ``_cases(clean=True)``): what any reconstruction that does not
recover the noise realisation can reach. The normalised SSIM gain is
``(SSIM(recon) - SSIM(mean colour)) / (SSIM(noise-free) - SSIM(mean colour))``.
CPU, torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def setup(script: str, argv, public: int, size: int, n: int):
    """Shared start of the attack benches: the result header (printed), the start time, the
    prior fitted on ``public`` public images, their mean colour, and site cases 0..n-1 with
    their masks and noise-free versions."""
    from _machine import run_header
    from adpfl.evaluation.image_prior import LinearPrior, public_skin_images
    from attack_eval import _cases

    header = run_header(script, argv)
    print(header, flush=True)
    t_all = time.perf_counter()
    P, PM = public_skin_images(public, size)
    X, Y = _cases(size, n)
    return (header, t_all, LinearPrior.fit(P, PM), P.mean(dim=(0, 2, 3), keepdim=True), X, Y,
            _cases(size, n, clean=True)[0])


def normalised_gain(ssim: float, base: float, ceiling: float) -> float:
    return (ssim - base) / max(ceiling - base, 1e-3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--pixel-iterations", type=int, default=0)
    ap.add_argument("--pixel-tv", type=float, default=1e-3)
    ap.add_argument("--public", type=int, default=200)
    ap.add_argument("--controls", choices=("all", "noise", "none"), default="all")
    ap.add_argument("--out", default="docs/results/attack_eval/controls128")
    ap.add_argument("--table-from", help="only rewrite controls.md from this run's log (its printed rows)")
    ap.add_argument("--noise-oracle", action="store_true",
                    help="only: does the gradient determine the sensor noise? (pixel stage from the noise-free truth)")
    ap.add_argument("--basin", action="store_true",
                    help="only: from points between the noise-free and the noisy truth, does the gradient loss "
                         "point to the truth, and does descending it get there?")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if a.noise_oracle:
        return noise_oracle(a, argv)
    if a.basin:
        return basin(a, argv)
    if a.table_from:
        import ast

        text = Path(a.table_from).read_text().splitlines()
        rows = [ast.literal_eval(t) for t in text if t.startswith("{'image'")]
        wall = next(t for t in text if t.startswith("wall "))
        header = next((t for t in text if t.startswith("machine:")), text[0])
        _write(Path(a.out), rows, None, header, float(wall.split()[1]) * 60,
               [k for k in rows[0] if isinstance(rows[0][k], dict) and k != "prior"])
        return 0
    from adpfl.evaluation.attack import default_loss, image_metrics, model_gradient
    from adpfl.evaluation.image_prior import LatentAttackConfig, invert_with_prior
    from adpfl.tasks.base import get_task
    from attack_eval import _cases

    header, t_all, prior, mean, X, Y, C = setup("attack_controls.py", argv, a.public, a.size, a.images)
    U, _ = _cases(a.size, a.images, first=100)
    cfg = LatentAttackConfig(restarts=a.restarts, latent_iterations=a.iterations,
                             pixel_iterations=a.pixel_iterations, pixel_tv=a.pixel_tv)
    loss = default_loss()
    rows, grid = [], []
    for i in range(a.images):
        x, y, clean = X[i:i + 1], Y[i:i + 1], C[i:i + 1]
        torch.manual_seed(0)
        net = get_task("skin2d").build_network()
        base = image_metrics(mean.expand_as(x), x)["ssim"]
        ceiling = image_metrics(clean, x)["ssim"]
        gen = torch.Generator().manual_seed(1000 + i)
        targets = {"attack": [g.detach() for g in model_gradient(net, loss, x, y)]}
        if a.controls != "none":
            targets["pure noise"] = [torch.randn(g.shape, generator=gen) for g in targets["attack"]]
        if a.controls == "all":
            targets["unrelated image"] = [g.detach() for g in model_gradient(net, loss, U[i:i + 1], y)]
        row = {"image": i, "base": base, "ceiling": ceiling, "prior": image_metrics(prior.prior_guess(y), x),
               "base_clean": image_metrics(mean.expand_as(x), clean)["ssim"]}
        row["prior"]["ssim_clean"] = image_metrics(prior.prior_guess(y), clean)["ssim"]
        pics = [x, clean, prior.prior_guess(y)]
        for name, tgt in targets.items():
            t0 = time.perf_counter()
            r = invert_with_prior(net, prior, tgt, y, config=cfg)
            m = image_metrics(r["image"], x)
            m.update(cost=r["cost"], seconds=time.perf_counter() - t0, norm=normalised_gain(m["ssim"], base, ceiling),
                     ssim_clean=image_metrics(r["image"], clean)["ssim"])
            if a.pixel_iterations:
                m["prior_stage"] = image_metrics(r["prior_stage_image"], x)
            row[name] = m
            pics.append(r["image"])
        rows.append(row)
        grid.append(pics)
        print({k: v for k, v in row.items()}, flush=True)
    _write(Path(a.out), rows, grid, header, time.perf_counter() - t_all, list(targets))
    return 0


def noise_oracle(a, argv) -> int:
    """An oracle that already holds the noise-free image (the best any prior-based attack can
    reach) refines it in pixel space against the clear gradient (``refine_pixels``,
    ``--pixel-iterations``, ``--pixel-tv``): if the gradient determined the noise realisation,
    SSIM against the noisy truth would rise above the noise-free ceiling. Also the gradient
    distance of the truth's noise-free version plus a fresh noise draw of the same sigma."""
    from _machine import run_header
    from adpfl.data.synthetic_skin import skin_domain_shift
    from adpfl.evaluation.attack import default_loss, image_metrics, model_gradient
    from adpfl.evaluation.image_prior import LatentAttackConfig, gradient_cost, refine_pixels
    from adpfl.tasks.base import get_task
    from attack_eval import _cases

    header = run_header("attack_controls.py", argv)
    print(header, flush=True)
    t_all = time.perf_counter()
    X, Y = _cases(a.size, a.images)
    C, _ = _cases(a.size, a.images, clean=True)
    cfg = LatentAttackConfig(pixel_iterations=a.pixel_iterations or 100, pixel_tv=a.pixel_tv)
    lines = [header, "", "| image | noise sigma | noise-free: PSNR / SSIM / 1 - cos "
             "| noise-free + fresh noise: PSNR / SSIM / 1 - cos "
             "| oracle refined from noise-free: PSNR / SSIM / 1 - cos |", "|---|---|---|---|---|"]
    for i in range(a.images):
        x, y, clean = X[i:i + 1], Y[i:i + 1], C[i:i + 1]
        torch.manual_seed(0)
        net = get_task("skin2d").build_network().eval()
        cost_of = gradient_cost(net, [g.detach() for g in model_gradient(net, default_loss(), x, y)], y)
        sigma = skin_domain_shift(i)["noise_sigma"]
        fresh = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(99 + i))
        fresh = (fresh * 255).round().clamp(0, 255) / 255
        refined, cost = refine_pixels(cost_of, clean, cfg)
        cells = []
        for img, c in ((clean, None), (fresh, None), (refined, cost)):
            m = image_metrics(img, x)
            cells.append(f"{m['psnr']:.2f} / {m['ssim']:.3f} / {float(cost_of(img)) if c is None else c:.3f}")
        lines.append(f"| {i} | {sigma:g} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.insert(1, f"wall {(time.perf_counter() - t_all) / 60:.1f} min; pixel stage {cfg.pixel_iterations} iterations,"
                    f" lr {cfg.pixel_lr:g}, TV weight {cfg.pixel_tv:g}; layer-wise 1 - cos against the clear gradient.")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "noise_oracle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


BASIN_T = (0.999, 0.99, 0.9, 0.5, 0.0)


def basin(a, argv) -> int:
    """Local identifiability of the sensor noise. For ``t`` in :data:`BASIN_T` the start
    ``z_t = clean + t (truth - clean)`` carries the fraction ``t`` of the truth's own noise
    realisation (t = 0.99: 1 % of it missing, PSNR ~74 dB). At each start: the attack's
    layer-wise gradient loss, the cosine between its steepest-descent direction in pixel space
    and the way to the truth (``truth - z_t``; a smooth basin gives a clearly positive value),
    and ``--pixel-iterations`` (default 50) Adam steps of lr 1e-4 on that loss: the distance to
    the truth closed (1 - |z_K - truth| / |z_t - truth|; negative: it moved away) and SSIM
    against the noisy truth before and after. Why descent cannot work, in float64 on a copy of
    the network: the change of the (kept) gradient between z_t and the truth, ``r``, against
    its first-order prediction ``J d`` (central finite difference along ``d = truth - z_t``,
    step 1e-3 x d): the size ratio |J d| / |r| and their cosine (a differentiable map gives
    ~1 and ~1 near the truth), and how many inputs of the network's PReLU activations change
    sign between z_t and the truth (each switches that unit's backward slope between 1 and the
    PReLU's negative slope: a jump no derivative in the pixels sees)."""
    from _machine import run_header
    from adpfl.evaluation.attack import default_loss, image_metrics, model_gradient
    from adpfl.evaluation.image_prior import gradient_cost, vanishing_tensors
    from adpfl.tasks.base import get_task
    from attack_eval import _cases

    header = run_header("attack_controls.py", argv)
    print(header, flush=True)
    t_all = time.perf_counter()
    X, Y = _cases(a.size, a.images)
    C, _ = _cases(a.size, a.images, clean=True)
    steps = a.pixel_iterations or 50
    lines = [header, "", "| image | t (share of the truth's noise) | PSNR / SSIM vs truth | layer-wise 1 - cos "
             "| cos(steepest descent, way to the truth) | after descent: PSNR / SSIM | distance closed "
             "| gradient change / norm | first order: size ratio, cos | PReLU sign flips |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i in range(a.images):
        x, y, clean = X[i:i + 1], Y[i:i + 1], C[i:i + 1]
        torch.manual_seed(0)
        net = get_task("skin2d").build_network().eval()
        cost_of = gradient_cost(net, [g.detach() for g in model_gradient(net, default_loss(), x, y)], y)
        net64 = get_task("skin2d").build_network().eval()
        net64.load_state_dict(net.state_dict())
        net64 = net64.double()
        x64, y64, c64 = x.double(), y.double(), clean.double()
        keep = [not v for v in vanishing_tensors(model_gradient(net64, default_loss(), x64, y64))]

        def flat64(img, net64=net64, y64=y64, keep=keep):
            return torch.cat([g.flatten() for g, k in zip(model_gradient(net64, default_loss(), img, y64), keep) if k])

        pre: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, inp, _o, pre=pre: pre.append(inp[0].detach().flatten() > 0))
                 for m in net64.modules() if isinstance(m, torch.nn.PReLU)]
        g_truth = flat64(x64)
        signs_truth, pre[:] = list(pre), []
        for t in BASIN_T:
            z64 = c64 + t * (x64 - c64)
            d64 = x64 - z64
            r = flat64(z64) - g_truth
            flips = sum(int((a != b).sum()) for a, b in zip(pre, signs_truth))
            pre.clear()
            jd = (flat64(z64 + 1e-3 * d64) - flat64(z64 - 1e-3 * d64)) / 2e-3
            pre.clear()
            cos_first = float(torch.nn.functional.cosine_similarity(jd, -r, dim=0))
            first = f"{float(jd.norm() / r.norm()):.3f}, {cos_first:+.3f}"
            z0 = clean + t * (x - clean)
            z = z0.clone().requires_grad_(True)
            cost = cost_of(z)
            (g,) = torch.autograd.grad(cost, z)
            cos = float(torch.nn.functional.cosine_similarity(-g.flatten(), (x - z0).flatten(), dim=0))
            opt = torch.optim.Adam([z], lr=1e-4)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                cost_of(z).backward()
                opt.step()
            zk = z.detach().clamp(0, 1)
            closed = 1 - float((zk - x).norm() / (z0 - x).norm().clamp_min(1e-12))
            m0, mk = image_metrics(z0, x), image_metrics(zk, x)
            lines.append(f"| {i} | {t:g} | {m0['psnr']:.2f} / {m0['ssim']:.3f} | {float(cost):.4f} | {cos:+.4f} "
                         f"| {mk['psnr']:.2f} / {mk['ssim']:.3f} | {closed:+.3f} "
                         f"| {float(r.norm() / g_truth.norm()):.4f} "
                         f"| {first} | {flips} of {sum(a.numel() for a in signs_truth)} |")
            print(lines[-1], flush=True)
        for h in hooks:
            h.remove()
    lines.insert(1, f"wall {(time.perf_counter() - t_all) / 60:.1f} min; {steps} Adam steps of lr 1e-4 from each "
                    "start; layer-wise 1 - cos against the clear one-step gradient (vanishing tensors left out).")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "basin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _fmt(m: dict) -> str:
    return f"{m['psnr']:.2f} / {m['ssim']:.3f} / {m['norm']:+.2f}"


def _write(out: Path, rows, grid, header: str, wall: float, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    titles = ["truth", "noise-free truth", "prior only", *names]
    if grid:
        fig, axes = plt.subplots(len(grid), len(titles), figsize=(1.3 * len(titles), 1.4 * len(grid)), squeeze=False)
        for i, pics in enumerate(grid):
            for j, p in enumerate(pics):
                ax = axes[i, j]
                ax.axis("off")
                ax.imshow(p[0].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_title(f"{i}: {titles[j]}", fontsize=5)
        fig.tight_layout()
        fig.savefig(out / "controls_grid.png", dpi=60)
    ctl = [n for n in names if n != "attack"]
    lines = [header, f"wall {wall / 60:.1f} min for the whole script.", "",
             "Scores vs the true (noisy) image: PSNR / SSIM / normalised SSIM gain "
             "((SSIM - SSIM(mean colour)) / (SSIM(noise-free truth) - SSIM(mean colour))).", "",
             "| image | mean colour SSIM | noise-free truth SSIM (ceiling) | issue bar (mean + 0.2) "
             "| prior only | " + " | ".join(names) + " | 1 - cos (" + ", ".join(names) + ") "
             "| margin over the best no-signal estimate (prior only or a control): PSNR dB / SSIM / norm. gain |",
             "|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    margins = []
    for r in rows:
        pr = dict(r["prior"], norm=normalised_gain(r["prior"]["ssim"], r["base"], r["ceiling"]))
        mg = None
        if ctl:  # the no-signal estimates: the prior's own guess and the attack run on no signal
            mg = tuple(r["attack"][k] - max([pr[k]] + [r[c][k] for c in ctl]) for k in ("psnr", "ssim", "norm"))
            margins.append(mg)
        lines.append(f"| {r['image']} | {r['base']:.3f} | {r['ceiling']:.3f} | {r['base'] + 0.2:.3f} | {_fmt(pr)} | "
                     + " | ".join(_fmt(r[n]) for n in names) + " | "
                     + ", ".join(f"{r[n]['cost']:.3f}" for n in names)
                     + (f" | {mg[0]:+.2f} / {mg[1]:+.3f} / {mg[2]:+.2f} |" if mg else " | - |"))
    if all("ssim_clean" in r["attack"] for r in rows):
        lines += ["", "SSIM against the noise-free image (the content without the sensor noise): "
                  + "; ".join(f"image {r['image']}: mean colour {r['base_clean']:.3f}, prior only "
                              f"{r['prior']['ssim_clean']:.3f}, "
                              + ", ".join(f"{n} {r[n]['ssim_clean']:.3f}" for n in names) for r in rows)]
    if any("prior_stage" in r["attack"] for r in rows):
        lines += ["", "Before the pixel stage (the prior stage's image), attack row: "
                  + "; ".join(f"image {r['image']}: {r['attack']['prior_stage']['psnr']:.2f} / "
                              f"{r['attack']['prior_stage']['ssim']:.3f}" for r in rows)]
    if margins:
        lines += ["", "Margin distribution over the images (attack minus the best no-signal estimate: "
                  "prior only, pure noise, unrelated image):"]
        for k, name in enumerate(("PSNR (dB)", "SSIM", "normalised SSIM gain")):
            v = [m[k] for m in margins]
            lines.append(f"- {name}: min {min(v):+.3f}, median {statistics.median(v):+.3f}, max {max(v):+.3f}; "
                         f"positive on {sum(x > 0 for x in v)} of {len(v)}")
    v = [r["attack"]["norm"] for r in rows]
    lines.append(f"- attack's normalised SSIM gain: min {min(v):+.2f}, median {statistics.median(v):+.2f}, "
                 f"max {max(v):+.2f}; >= 0.5 on {sum(x >= 0.5 for x in v)} of {len(v)}; issue bar (SSIM >= mean + 0.2) "
                 f"met by the attack on {sum(r['attack']['ssim'] >= r['base'] + 0.2 for r in rows)} of {len(rows)}, "
                 f"by the noise-free truth itself on {sum(r['ceiling'] >= r['base'] + 0.2 for r in rows)} "
                 f"of {len(rows)}")
    (out / "controls.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
