"""Per-sample gradients of the task UNets' layers for Opacus, without unfolding or functorch.

Written by hand because neither Opacus, MONAI nor PyTorch has a fast per-sample gradient for
these layers: Opacus 1.6's ``Conv{2,3}d`` grad sampler (``opacus.grad_sample.conv``) unfolds
each layer input into ``kernel_size`` shifted copies (27x the activation for a 3x3x3 kernel) and
contracts them in one einsum, which makes the DP-SGD step 2.2-3.4x the plain step on the 3D tasks
on CPU (docs/benchmarks.md); ``ConvTranspose{2,3}d`` and ``PReLU`` (the standard MONAI UNet's up-sampling and
activation) have no grad sampler at all and go through Opacus' ``torch.func`` fallback, which
re-runs the layer per sample.

* Convolutions (plain and transposed): the gradient of a convolution's weight over a batch is
  what PyTorch's own convolution backward computes (``torch.ops.aten.convolution_backward``,
  weight part only, as ``torch.nn.grad.conv3d_weight`` does). Folding the batch into the channel
  groups -- input ``(1, B*C_in, ...)``, backprops ``(1, B*C_out, ...)``, ``groups = B *
  layer.groups`` -- makes each group one sample's convolution, so the weight gradient of that
  grouped convolution *is* the per-sample gradient, computed by the same optimised kernel as the
  plain backward and without the unfolded copy. Bias: the backprops summed over space.
* Weight-standardised convolutions (``WSConv{2,3}d``, network ``dp_ws``): the layer convolves
  with ``w_hat = (w - mean) / s`` per output channel, so the per-sample gradient of ``w_hat`` is
  the convolution's above, and the chain rule through the standardisation (which depends on the
  weights only, not on the sample) maps each sample's row: ``(g - mean(g) - w_hat *
  mean(g * w_hat)) / s`` over the fan-in, the backward of a normalisation without affine.
* ``PReLU``: ``d out / d a = min(x, 0)``, so a sample's slope gradient is
  ``sum(min(x, 0) * backprops)`` over its elements (per channel when the layer has one slope per
  channel).

:func:`register` installs them through Opacus' own ``register_grad_sampler`` (the registry every
``GradSampleModule`` reads when its hooks run); ``adpfl.training.dpsgd`` calls it on import.
Convolutions this path does not cover (string padding, a non-zero padding mode) go to Opacus'
sampler unchanged. Exactness against Opacus' sampler, ``torch.func`` and one-sample-at-a-time
gradients is tested (tests/test_grad_samplers.py); the speed by bench/bench_dp_step.py.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler

__all__ = ["conv_grad_sample", "conv_transpose_grad_sample", "ws_conv_grad_sample", "prelu_grad_sample", "register"]

Grads = dict[torch.nn.Parameter, torch.Tensor]


def _folded_weight_grad(layer: torch.nn.Module, x: torch.Tensor, backprops: torch.Tensor, transposed: bool,
                        output_padding: list[int]) -> torch.Tensor:
    """``(B, *weight.shape)``: the weight gradient of the batch folded into channel groups."""
    n, w = x.shape[0], layer.weight
    grad = torch.ops.aten.convolution_backward(
        backprops.reshape(1, -1, *backprops.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        backprops.new_empty(1).expand(n * w.shape[0], *w.shape[1:]),  # only its shape is read
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        transposed,
        output_padding,
        n * layer.groups,
        (False, True, False),
    )[1]
    return grad.reshape(n, *w.shape)


def _conv_like(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor,
               transposed: bool) -> Grads:
    x = activations[0].to(backprops.dtype)
    ret: Grads = {}
    if x.shape[0] == 0:  # empty Poisson batch
        ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    if layer.weight.requires_grad:
        pad = list(layer.output_padding) if transposed else [0] * (x.dim() - 2)
        ret[layer.weight] = _folded_weight_grad(layer, x, backprops, transposed, pad)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(2)
    return ret


def conv_grad_sample(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> Grads:
    """Opacus grad sampler of ``Conv2d``/``Conv3d`` (same signature and result as Opacus' own):
    ``{weight: (B, *weight.shape), bias: (B, C_out)}``."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return opacus_conv_grad_sample(layer, activations, backprops)
    return _conv_like(layer, activations, backprops, transposed=False)


def conv_transpose_grad_sample(layer: torch.nn.Module, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> Grads:
    """Opacus grad sampler of ``ConvTranspose2d``/``ConvTranspose3d``:
    ``{weight: (B, C_in, C_out/groups, k...), bias: (B, C_out)}``."""
    return _conv_like(layer, activations, backprops, transposed=True)


def ws_conv_grad_sample(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> Grads:
    """Opacus grad sampler of ``WSConv2d``/``WSConv3d``: the convolution's per-sample gradient
    of the standardised weight, taken back through the standardisation to ``weight``."""
    from adpfl.tasks.dp_unet import WS_EPS

    ret = conv_grad_sample(layer, activations, backprops)
    if layer.weight in ret:
        w = layer.weight.detach().to(backprops.dtype)
        flat = w.reshape(w.shape[0], -1)
        s = torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + WS_EPS)
        w_hat = (flat - flat.mean(1, keepdim=True)) / s
        g = ret[layer.weight].reshape(-1, *flat.shape)
        g = (g - g.mean(2, keepdim=True) - w_hat * (g * w_hat).mean(2, keepdim=True)) / s
        ret[layer.weight] = g.reshape(-1, *w.shape)
    return ret


def prelu_grad_sample(layer: torch.nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor) -> Grads:
    """Opacus grad sampler of ``PReLU``: ``{weight: (B, num_parameters)}``."""
    prod = torch.clamp(activations[0].to(backprops.dtype), max=0) * backprops
    if layer.weight.numel() == 1:
        return {layer.weight: prod.flatten(1).sum(1, keepdim=True)}
    return {layer.weight: prod.flatten(2).sum(2) if prod.dim() > 2 else prod}


def register() -> None:
    """Make these Opacus' grad samplers of ``Conv{2,3}d``, ``ConvTranspose{2,3}d``, ``PReLU`` and
    the weight-standardised ``WSConv{2,3}d``
    (idempotent; process-wide, as Opacus' registry is)."""
    register_grad_sampler([torch.nn.Conv2d, torch.nn.Conv3d])(conv_grad_sample)
    register_grad_sampler([torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d])(conv_transpose_grad_sample)
    register_grad_sampler([torch.nn.PReLU])(prelu_grad_sample)
    from adpfl.tasks.dp_unet import WSConv2d, WSConv3d

    register_grad_sampler([WSConv2d, WSConv3d])(ws_conv_grad_sample)
