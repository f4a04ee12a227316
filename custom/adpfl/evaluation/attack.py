"""Gradient-inversion attack ("Inverting Gradients", Geiping et al. 2020 style) on what a
site releases, and image-similarity metrics for the reconstruction.

Threat model (worst case for the defender): the honest-but-curious server knows the
model weights, the training recipe (loss, one local SGD step with learning rate ``lr``)
and the label mask of the single training image; it observes the released update and
converts it to a gradient (``g = -update / lr``). It optimises a dummy image so that the
dummy's gradient matches the observed one in cosine similarity, with a total-variation
prior and the image clamped to ``[0, 1]`` (Adam, several hundred iterations, restarts
optional). For a sparse (ADP-FL) release the attacker also knows which coordinates were
kept (they are the non-zero ones) and matches on those only.

Metrics: PSNR and SSIM from MONAI (``PSNRMetric``, ``SSIMMetric`` with an 11-pixel
Gaussian window, data range 1), and the *relative leakage* against a no-information
baseline, the constant image filled with the dataset's mean colour:
``(SSIM(recon) - SSIM(baseline)) / SSIM(baseline)`` (<= 0: no better than knowing only
the dataset mean). Pure PyTorch; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.metrics import PSNRMetric, SSIMMetric

from adpfl.modes import MODES, UPDATE_MODES
from adpfl.privacy.config import PrivacyConfig
from adpfl.privacy.ledger import PrivacyLedger
from adpfl.privacy.mechanisms import make_generator, seeded_generators
from adpfl.privacy.pipeline import PrivacyPipeline

__all__ = [
    "AttackConfig",
    "AttackResult",
    "MODES",
    "attack_release",
    "image_metrics",
    "invert_gradient",
    "mask_painted_baseline",
    "model_gradient",
    "noisy_clipped_sum",
    "observed_gradient",
    "release_update",
    "small_attack_net",
    "total_variation",
]


def small_attack_net(in_channels: int = 3, out_channels: int = 2, spatial_dims: int = 2) -> torch.nn.Module:
    """Small MONAI UNet used for fast CPU attack experiments: channels (32, 64), one
    down/up step, one residual unit per level, ReLU, no normalisation (about 24k
    parameters, many more than the 3 * 32 * 32 pixels it must explain; with (8, 16) and
    no residual units the gradient is under-determined and inversion fails)."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=(32, 64),
        strides=(2,),
        num_res_units=1,
        act="RELU",
        norm=None,
    )


def default_loss() -> Callable:
    return DiceCELoss(to_onehot_y=True, softmax=True)


def model_gradient(model: torch.nn.Module, loss_fn: Callable, image: torch.Tensor, label: torch.Tensor,
                   create_graph: bool = False) -> list[torch.Tensor]:
    """Gradient of ``loss_fn(model(image), label)`` w.r.t. the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(image), label)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV), any dims."""
    tv = x.new_zeros(())
    for d in range(2, x.dim()):
        tv = tv + (x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1)).abs().mean()
    return tv


@dataclass
class AttackConfig:
    """``parametrisation``: ``"clamp"`` optimises pixels clamped to [0, 1];
    ``"normalised"`` optimises a free tensor whose per-image, per-channel mean and std are
    set to ``prior_mean``/``prior_std`` (the dataset's, public to the attacker) at every
    step. The second removes the directions the task UNet is blind to: its first unit
    instance-normalises, so a per-channel offset or a global gain of the input barely
    changes the gradient (measured: a +0.1 offset moves the cosine by 0.1, pixel noise of
    std 0.01 by 0.24)."""

    iterations: int = 400
    lr: float = 0.1
    tv_weight: float = 1e-2
    restarts: int = 1
    seed: int = 0
    signed: bool = True
    parametrisation: str = "clamp"
    prior_mean: torch.Tensor | None = None
    prior_std: torch.Tensor | None = None

    def image(self, z: torch.Tensor) -> torch.Tensor:
        if self.parametrisation == "clamp":
            return z
        if self.prior_mean is None or self.prior_std is None:
            raise ValueError("parametrisation='normalised' needs prior_mean and prior_std")
        dims = tuple(range(2, z.dim()))
        centred = z - z.mean(dim=dims, keepdim=True)
        return centred / z.std(dim=dims, keepdim=True).clamp_min(1e-6) * self.prior_std + self.prior_mean


def invert_gradient(
    model: torch.nn.Module,
    target_grads: Sequence[torch.Tensor],
    label: torch.Tensor,
    image_shape: Sequence[int],
    loss_fn: Callable | None = None,
    config: AttackConfig | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Reconstruct an image whose gradient matches ``target_grads`` in cosine similarity.

    ``masks`` (optional, one boolean tensor or None per parameter) restricts the match to
    observed coordinates. Returns ``(image in [0,1], final 1 - cos)`` of the best restart.
    """
    cfg = config or AttackConfig()
    loss_fn = loss_fn or default_loss()
    model.eval()  # no dropout; the UNet's norms are per-sample
    params = [p for p in model.parameters() if p.requires_grad]
    if masks is None:
        masks = [None] * len(params)
    tgt = [t.detach() if m is None else t.detach()[m] for t, m in zip(target_grads, masks)]
    tgt_norm = torch.sqrt(sum((t * t).sum() for t in tgt)).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    best, best_cost = None, math.inf
    for _restart in range(max(1, int(cfg.restarts))):
        if cfg.parametrisation not in ("clamp", "normalised"):
            raise ValueError(f"parametrisation must be clamp or normalised, got {cfg.parametrisation!r}")
        x0 = torch.rand(tuple(image_shape), generator=gen)
        x = (x0 if cfg.parametrisation == "clamp" else torch.randn(tuple(image_shape), generator=gen))
        x = x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(cfg.iterations * f) for f in (0.375, 0.625, 0.875)], gamma=0.1
        )
        cost_val = math.inf
        for _it in range(int(cfg.iterations)):
            opt.zero_grad(set_to_none=True)
            img = cfg.image(x)
            grads = model_gradient(model, loss_fn, img, label, create_graph=True)
            dot, gn = x.new_zeros(()), x.new_zeros(())
            for g, t, m in zip(grads, tgt, masks):
                gm = g if m is None else g[m]
                dot = dot + (gm * t).sum()
                gn = gn + (gm * gm).sum()
            cost = 1.0 - dot / (torch.sqrt(gn).clamp_min(1e-12) * tgt_norm)
            total = cost + cfg.tv_weight * total_variation(img)
            total.backward()
            if cfg.signed:
                x.grad.sign_()  # signed gradient descent, as in Geiping et al.
            opt.step()
            sched.step()
            if cfg.parametrisation == "clamp":
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
            cost_val = float(cost.detach())
        if cost_val < best_cost:
            best, best_cost = cfg.image(x.detach()).clamp(0.0, 1.0), cost_val
    return best, best_cost


def mask_painted_baseline(label: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What an attacker who knows the mask paints without any gradient: the dataset's mean
    lesion colour inside ``label``, its mean skin colour outside (``images``/``labels``:
    the public dataset statistics' source, (N, C, *spatial) and (N, 1, *spatial))."""
    dims = (0, *range(2, images.dim()))
    fg = (images * labels).sum(dim=dims, keepdim=True) / labels.sum().clamp_min(1)
    bg = (images * (1 - labels)).sum(dim=dims, keepdim=True) / (1 - labels).sum().clamp_min(1)
    return fg * label + bg * (1 - label)


def image_metrics(
    recon: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor | None = None
) -> dict[str, float]:
    """PSNR/SSIM (MONAI, data range 1) of ``recon`` vs ``truth`` and, with a baseline
    image, the baseline's PSNR/SSIM and the relative leakage
    ``(SSIM(recon) - SSIM(baseline)) / SSIM(baseline)``."""
    dims = truth.dim() - 2
    ssim = SSIMMetric(spatial_dims=dims, data_range=1.0)
    psnr = PSNRMetric(max_val=1.0)
    out = {
        "psnr": float(psnr(recon.float(), truth.float()).mean()),
        "ssim": float(ssim(recon.float(), truth.float()).mean()),
    }
    if baseline is not None:
        b = baseline.expand_as(truth).float()
        out["psnr_baseline"] = float(psnr(b, truth.float()).mean())
        out["ssim_baseline"] = float(ssim(b, truth.float()).mean())
        denom = max(abs(out["ssim_baseline"]), 1e-3)
        out["relative_leakage"] = (out["ssim"] - out["ssim_baseline"]) / denom
    return out


@dataclass
class AttackResult:
    reconstruction: torch.Tensor
    metrics: dict[str, float]
    mode: str
    privacy: dict[str, Any] = field(default_factory=dict)
    attack_cost: float = float("nan")


def noisy_clipped_sum(model: torch.nn.Module, loss_fn: Callable, images: torch.Tensor, labels: torch.Tensor,
                      z: float, c: float, gen: torch.Generator) -> list[torch.Tensor]:
    """One DP-SGD step's gradient sum as Opacus forms it: every sample's gradient clipped
    to flat L2 norm ``c``, summed, plus ``N(0, (z c)^2)`` per coordinate (``gen``)."""
    summed = None
    for i in range(images.shape[0]):
        gi = [g.detach() for g in model_gradient(model, loss_fn, images[i:i + 1], labels[i:i + 1])]
        factor = min(1.0, c / (float(torch.sqrt(sum((g * g).sum() for g in gi))) + 1e-6))
        summed = [g * factor for g in gi] if summed is None else [s_ + g * factor for s_, g in zip(summed, gi)]
    return [g + torch.randn(g.shape, generator=gen, dtype=g.dtype) * (z * c) for g in summed]


def release_update(
    model: torch.nn.Module, update: Sequence[torch.Tensor], privacy: Any, seed: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict[str, Any]]:
    """``update`` (one tensor per trainable parameter of ``model``, e.g. ``w_local - w_global``)
    through ``PrivacyPipeline(privacy).release`` (a :class:`PrivacyConfig` or its dict), as
    the site's result filter releases it in round 0 (``topk_public`` scores: the absolute
    global weights). Returns the released tensors, the kept-coordinate masks (None for a
    dense release) and the release's privacy info (update-level epsilon of this release)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cfg = privacy if isinstance(privacy, PrivacyConfig) else PrivacyConfig.from_dict(dict(privacy))
    pipe = PrivacyPipeline(cfg, PrivacyLedger(delta=cfg.delta),
                           generator_factory=None if seed is None else seeded_generators(seed))
    scores = {n: p.detach().abs() for n, p in named} if cfg.mask_policy == "topk_public" else None
    released, meta = pipe.release({n: u.detach() for (n, _), u in zip(named, update)}, round_index=0,
                                  public_scores=scores)
    out = [released[n].to(u.dtype) for (n, _), u in zip(named, update)]
    masks: list[torch.Tensor | None] = [None] * len(out)
    sizes = [u.numel() for u in update]
    if pipe.last_indices is not None and pipe.last_indices.numel() < sum(sizes):
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[pipe.last_indices.cpu()] = True
        masks = [m.reshape(u.shape) for m, u in zip(torch.split(flat, sizes), update)]
    info = dict(
        epsilon=float(meta.get("epsilon_rdp", float("nan"))),
        unit="update-level DP: the site's whole update of this round (replace-one, sensitivity 2C)",
        noise_multiplier=float(meta.get("noise_multiplier", float("nan"))),
        noise_std=float(meta.get("noise_std", float("nan"))),
        clip_norm=float(meta.get("clip_norm", float("nan"))),
        keep_fraction=float(cfg.keep_fraction),
        delta=cfg.delta,
    )
    return out, masks, info


def observed_gradient(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    mode: str,
    privacy: Any = None,
    lr: float = 0.1,
    loss_fn: Callable | None = None,
    seed: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict[str, Any]]:
    """What the attacker observes for one local step on ``image``, as a gradient.

    * ``"npfl"``: the true gradient (update ``-lr * g`` sent in the clear).
    * ``"dpfl"``/``"adpfl"``: the update ``-lr * g`` through
      ``PrivacyPipeline(privacy).release`` (a :class:`PrivacyConfig`), turned back into a
      gradient ``-released / lr``; for sparse releases the kept coordinates are returned
      as masks. Privacy info: ``epsilon`` of that one release (update-level).
    * ``"dpsgd"``: ``privacy`` is a dict with ``noise_multiplier`` and ``max_grad_norm``
      (optional ``sample_rate`` (default 1), ``steps`` (default 1), ``delta``): the
      single-sample gradient clipped to ``max_grad_norm`` (flat L2 over all parameters)
      plus ``N(0, (z * max_grad_norm)^2)`` per coordinate, as Opacus does for a batch of one.
      Privacy info: Opacus RDP epsilon for ``steps`` steps at ``sample_rate`` (record-level).
    ``seed`` fixes the noise for experiments (None: OS entropy). With ``topk_public``
    masks the public scores are the absolute global weights (round 0: no global change
    yet, as ``bench/inprocess_fedavg.py`` does). For ``dpsgd`` every image of the batch is
    clipped on its own (Opacus' per-sample clipping) before the noise is added to the sum.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    loss_fn = loss_fn or default_loss()
    model.eval()
    grads = [g.detach() for g in model_gradient(model, loss_fn, image, label)]
    masks: list[torch.Tensor | None] = [None] * len(grads)
    info: dict[str, Any] = {"mode": mode}
    if mode == "npfl":
        info.update(epsilon=float("inf"), unit="none (no privacy)")
        return grads, masks, info
    if mode in UPDATE_MODES:
        released, masks, rinfo = release_update(model, [-lr * g for g in grads], privacy, seed)
        info.update(rinfo)
        return [-r / lr for r in released], masks, info
    # dpsgd
    p = dict(privacy or {})
    z, c = float(p["noise_multiplier"]), float(p["max_grad_norm"])
    q, steps, delta = float(p.get("sample_rate", 1.0)), int(p.get("steps", 1)), float(p.get("delta", 1e-5))
    out = noisy_clipped_sum(model, loss_fn, image, label, z, c, make_generator("cpu", seed))
    from adpfl.privacy.record import opacus_rdp_epsilon

    info.update(
        epsilon=opacus_rdp_epsilon([(z, q, steps)], delta),
        unit=f"record-level DP: one training image ({steps} step(s) at sample rate {q:g})",
        noise_multiplier=z,
        max_grad_norm=c,
        noise_std=z * c,
        delta=delta,
    )
    return out, masks, info


def attack_release(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    mode: str,
    privacy: Any = None,
    lr: float = 0.1,
    attack: AttackConfig | None = None,
    baseline: torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    noise_seed: int | None = None,
) -> AttackResult:
    """Compute the true one-step gradient on ``image`` (shape (1, C, *spatial), values in
    [0, 1]) with ``label`` (1, 1, *spatial), pass it through the ``mode``'s release
    (see :func:`observed_gradient`), run :func:`invert_gradient` on the result and score
    it (:func:`image_metrics`; ``baseline`` defaults to the image's own mean colour, pass
    the dataset mean colour for the no-information baseline)."""
    loss_fn = loss_fn or default_loss()
    grads, masks, info = observed_gradient(model, image, label, mode, privacy, lr, loss_fn, noise_seed)
    recon, cost = invert_gradient(model, grads, label, tuple(image.shape), loss_fn, attack, masks)
    if baseline is None:
        dims = tuple(range(2, image.dim()))
        baseline = image.mean(dim=dims, keepdim=True)
    metrics = image_metrics(recon, image, baseline)
    return AttackResult(reconstruction=recon, metrics=metrics, mode=mode, privacy=info, attack_cost=cost)
