"""Multi-step FedAvg leakage: the site's update after several local optimiser steps, and
the attacker's differentiable simulation of those steps (in the spirit of Dimitrov et al.
2022, "Data leakage in federated averaging": the server simulates the client's local
training on dummy data and matches the simulated update to the observed one).

The site (``local_update``): ``steps`` optimiser steps (``torch.optim.Adam`` as the
trainer of ``adpfl.training.loop`` uses, or plain SGD) from the global weights on its
``images``/``labels``, mini-batches of ``batch_size`` taken in order and cycled (epochs);
with ``dpsgd`` (``{"noise_multiplier": z, "max_grad_norm": C}``) every step's gradient is
the per-sample clipped sum plus Gaussian noise divided by the batch size, as Opacus does.
It returns the update ``w_local - w_global``.

The attacker (``simulated_update``): the same steps unrolled functionally
(``torch.func.functional_call``) with ``create_graph``, so the simulated update is
differentiable in the dummy images. Adam's first step is ``lr * sign(g)`` (bias-corrected
``m / sqrt(v)``), whose derivative in the data is zero almost everywhere; the attacker's
simulation therefore uses a larger ``adam_eps`` (a smooth surrogate of the sign) while the
site's real step keeps Adam's default 1e-8. The attacker knows the batch order (worst case
for the defender), the labels (masks) and the hyper-parameters; it does not simulate the
DP noise or clipping.

Written by hand: no library offers an unrolled, data-differentiable FedAvg client.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.func import functional_call

from adpfl.evaluation.attack import default_loss, noisy_clipped_sum
from adpfl.privacy.mechanisms import make_generator

__all__ = ["local_update", "simulated_update"]


def _batches(n: int, batch_size: int, steps: int) -> list[slice]:
    if n < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"local steps need n >= 1, batch_size >= 1 and steps >= 1, got {n}, {batch_size}, {steps}")
    per_epoch = max(1, -(-n // batch_size))
    return [slice((t % per_epoch) * batch_size, min(n, (t % per_epoch + 1) * batch_size)) for t in range(steps)]


def local_update(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                 optimizer: str = "adam", batch_size: int | None = None, loss_fn: Callable | None = None,
                 dpsgd: dict | None = None, seed: int | None = None) -> list[torch.Tensor]:
    """What the site computes: ``w_local - w_global`` per trainable parameter after
    ``steps`` local steps (the model itself is not changed)."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    loss_fn = loss_fn or default_loss()
    local = copy.deepcopy(model).eval()  # eval: no dropout; the UNet's instance norms keep no statistics
    params = [p for p in local.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    gen = make_generator("cpu", seed) if dpsgd else None
    for sl in _batches(images.shape[0], batch_size or images.shape[0], steps):
        x, y = images[sl], labels[sl]
        opt.zero_grad(set_to_none=True)
        if dpsgd:
            summed = noisy_clipped_sum(local, loss_fn, x, y, float(dpsgd["noise_multiplier"]),
                                       float(dpsgd["max_grad_norm"]), gen)
            for p, g in zip(params, summed):
                p.grad = g / x.shape[0]
        else:
            loss_fn(local(x), y).backward()
        opt.step()
    return [p.detach() - s for p, s in zip(params, start)]


def simulated_update(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                     optimizer: str = "adam", batch_size: int | None = None, loss_fn: Callable | None = None,
                     adam_eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999)) -> list[torch.Tensor]:
    """The attacker's differentiable replay of :func:`local_update` (no DP): the update
    after ``steps`` steps, with a graph back to ``images``."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    loss_fn = loss_fn or default_loss()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    w0 = [p.detach().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad]
    w = list(w0)
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    b1, b2 = betas
    for t, sl in enumerate(_batches(images.shape[0], batch_size or images.shape[0], steps), start=1):
        out = functional_call(model, {**fixed, **dict(zip(names, w))}, (images[sl],))
        g = torch.autograd.grad(loss_fn(out, labels[sl]), w, create_graph=True)
        if optimizer == "sgd":
            w = [p - lr * gi for p, gi in zip(w, g)]
            continue
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        w = [p - lr * (mi / (1 - b1 ** t)) / (torch.sqrt(vi / (1 - b2 ** t) + adam_eps ** 2) + adam_eps)
             for p, mi, vi in zip(w, m, v)]
    return [p - p0.detach() for p, p0 in zip(w, w0)]
