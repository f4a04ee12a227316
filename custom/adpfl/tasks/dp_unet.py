"""The DP-friendly variant of the task UNet (setting ``network="dp"``).

Record-level DP-SGD needs a per-sample gradient for every parameter. Opacus 1.6 computes it
natively (one einsum per layer from the forward activations and backward gradients) for
``Conv{1,2,3}d``, ``GroupNorm``, ``InstanceNorm``, ``LayerNorm`` and ``Linear``; ``PReLU`` and
``ConvTranspose`` have no grad sampler in Opacus and would go through its ``torch.func``
fallback, which re-runs the layer per sample and is what made DP-SGD 4-13x slower than plain
training on the standard MONAI UNet. :mod:`adpfl.training.grad_samplers` now gives all of them a
fast exact sampler (registered by the DP-SGD trainer), so both variants train under DP-SGD
within the issue's step-time targets (docs/benchmarks.md).

:class:`DPUNet` is MONAI's :class:`~monai.networks.nets.UNet` (same channels, strides,
residual units, affine-free InstanceNorm) with two changes, both MONAI building blocks:

* activation ``relu`` instead of PReLU. PReLU (initial slope 0.25) and LeakyReLU(0.25) were
  tried with this up-sampling and trained skin2d much worse in NP-FL (0.76 against 0.91 with
  ReLU, seed 0; docs/benchmarks.md), so ReLU stays although PReLU now has a fast sampler;
* each up-sampling step is a stride-1 :class:`~monai.networks.blocks.Convolution` at the
  coarse resolution followed by a parameter-free :class:`~monai.networks.blocks.UpSample`
  (``mode="nontrainable"``, bi/tri-linear) instead of a strided transposed convolution.
  Convolving before up-sampling keeps the layer's arithmetic equal to the transposed
  convolution's (the convolution after up-sampling would cost 4x in 2D, 8x in 3D).

This variant learns more slowly and less reliably than the standard network in NP-FL (3D
tasks; skin2d at one of three seeds) and, with the samplers, is hardly faster under DP-SGD, so
the jobs train the standard network; it stays a setting for comparison (docs/benchmarks.md).

MONAI's UNet has no option for the up-sampling layer, so the one hook it offers for that,
``_get_up_layer``, is overridden here; everything else is MONAI's. Affine-free InstanceNorm
has no parameters, so it needs no per-sample gradient at all.

``network="dp_ws"`` is the same network with **weight standardisation** (Qiao et al. 2019; with
GroupNorm, the normalisation De et al. 2022 used for DP-SGD): every convolution that a
normalisation layer follows convolves with its weight standardised per output channel,
``(w - mean) / sqrt(var + eps)`` over the fan-in; the stored parameter stays ``weight``, so the
state-dict keys are those of ``dp``. The output convolution and the residual shortcuts (no
normalisation after them) keep plain weights. Written by hand: neither MONAI nor Opacus has a
weight-standardised convolution; its per-sample gradient is
:func:`adpfl.training.grad_samplers.ws_conv_grad_sample` (exact, tested).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.nets import UNet

__all__ = ["DPUNet", "WSConv2d", "WSConv3d", "standardised_weight", "standardise_convolutions", "WS_EPS"]

WS_EPS = 1e-5  # added to the fan-in variance of each output channel's weights


def standardised_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """``weight`` standardised per output channel (dim 0) over its fan-in (all other dims)."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape_as(weight)


class WSConv2d(torch.nn.Conv2d):
    """``Conv2d`` that convolves with :func:`standardised_weight` of its ``weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardised_weight(self.weight), self.bias)


class WSConv3d(torch.nn.Conv3d):
    """``Conv3d`` that convolves with :func:`standardised_weight` of its ``weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardised_weight(self.weight), self.bias)


_WS = {torch.nn.Conv2d: WSConv2d, torch.nn.Conv3d: WSConv3d}


def standardise_convolutions(net: torch.nn.Module) -> int:
    """Turn, in place, every convolution of a MONAI ``Convolution`` block whose ADN has a
    normalisation into its weight-standardised class (same parameters); returns how many."""
    n = 0
    for block in net.modules():
        adn = getattr(block, "adn", None)
        conv = getattr(block, "conv", None)
        if isinstance(block, Convolution) and adn is not None and "N" in adn._modules and type(conv) in _WS:
            conv.__class__ = _WS[type(conv)]
            n += 1
    return n


class DPUNet(UNet):
    """MONAI UNet with ReLU and convolution + linear up-sampling instead of transposed convolutions."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("act", "relu")
        super().__init__(*args, **kwargs)

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> torch.nn.Module:
        conv = Convolution(
            self.dimensions,
            in_channels,
            out_channels,
            strides=1,
            kernel_size=self.up_kernel_size,
            act=self.act,
            norm=self.norm,
            dropout=self.dropout,
            bias=self.bias,
            conv_only=is_top and self.num_res_units == 0,
            adn_ordering=self.adn_ordering,
        )
        up = UpSample(self.dimensions, scale_factor=strides, mode="nontrainable", interp_mode="linear",
                      align_corners=False)
        layers = [conv, up]
        if self.num_res_units > 0:
            layers.append(ResidualUnit(
                self.dimensions,
                out_channels,
                out_channels,
                strides=1,
                kernel_size=self.kernel_size,
                subunits=1,
                act=self.act,
                norm=self.norm,
                dropout=self.dropout,
                bias=self.bias,
                last_conv_only=is_top,
                adn_ordering=self.adn_ordering,
            ))
        return torch.nn.Sequential(*layers)
