"""The hand-written per-sample gradients (adpfl.training.grad_samplers) are exact and are the ones
Opacus uses: against Opacus' own conv sampler, against one-sample-at-a-time gradients, and on both
UNet variants with no layer left to Opacus' functorch fallback."""

import math

import pytest
import torch

from adpfl.tasks.base import NETWORKS
from adpfl.training import grad_samplers


def _microbatch_grads(layer, x, g):
    """Per-sample parameter gradients of ``sum(layer(x_i) * g_i)``, one sample at a time."""
    out = []
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        out.append({p: p.grad.clone() for p in layer.parameters()})
    return {p: torch.stack([o[p] for o in out]) for p in layer.parameters()}


def _close(got, want, tol=1e-5):
    for p, w in want.items():
        err = float((got[p] - w).norm() / w.norm().clamp_min(1e-12))
        assert err < tol, (tuple(p.shape), err)


@pytest.mark.parametrize("dims,kwargs", [
    (2, dict(stride=1, padding=1)),
    (2, dict(stride=2, padding=1, dilation=1, bias=False)),
    (2, dict(stride=1, padding=2, dilation=2, groups=2)),
    (3, dict(stride=1, padding=1)),
    (3, dict(stride=2, padding=1)),
    (3, dict(stride=(1, 2, 1), padding=(0, 1, 2), dilation=(2, 1, 1), groups=2)),
])
def test_conv_matches_opacus_and_microbatches(dims, kwargs):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    torch.manual_seed(0)
    layer = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(4, 6, 3, **kwargs)
    x = torch.randn(3, 4, *(9,) * dims)
    g = torch.randn_like(layer(x))
    got = grad_samplers.conv_grad_sample(layer, [x], g)
    _close(got, compute_conv_grad_sample(layer, [x], g))
    _close(got, _microbatch_grads(layer, x, g))


@pytest.mark.parametrize("dims,kwargs", [
    (2, dict(stride=2, padding=1, output_padding=1)),
    (3, dict(stride=2, padding=1, output_padding=1)),
    (3, dict(stride=(2, 1, 2), padding=0, groups=2, bias=False)),
])
def test_conv_transpose_matches_microbatches(dims, kwargs):
    torch.manual_seed(0)
    layer = (torch.nn.ConvTranspose2d if dims == 2 else torch.nn.ConvTranspose3d)(4, 6, 3, **kwargs)
    x = torch.randn(3, 4, *(5,) * dims)
    g = torch.randn_like(layer(x))
    _close(grad_samplers.conv_transpose_grad_sample(layer, [x], g), _microbatch_grads(layer, x, g))


@pytest.mark.parametrize("num_parameters,shape", [(1, (3, 4, 5, 5)), (4, (3, 4, 5, 5, 5)), (4, (3, 4))])
def test_prelu_matches_microbatches(num_parameters, shape):
    torch.manual_seed(0)
    layer = torch.nn.PReLU(num_parameters)
    x = torch.randn(*shape)
    g = torch.randn(*shape)
    _close(grad_samplers.prelu_grad_sample(layer, [x], g), _microbatch_grads(layer, x, g))


def test_empty_batch_gives_zero_rows():
    layer = torch.nn.Conv3d(2, 3, 3, padding=1)
    got = grad_samplers.conv_grad_sample(layer, [torch.zeros(0, 2, 4, 4, 4)], torch.zeros(0, 3, 4, 4, 4))
    assert got[layer.weight].shape == (1, 3, 2, 3, 3, 3) and not got[layer.weight].any()


@pytest.mark.parametrize("network", NETWORKS)
def test_unet_per_sample_grads_exact_without_functorch(network):
    """Both 3D UNet variants: every parametrised layer is hooked by a registered sampler (no
    functorch), and the per-sample gradients equal one-sample-at-a-time gradients."""
    from opacus import GradSampleModule

    import adpfl.training.dpsgd  # noqa: F401  (registers the samplers, as the trainer does)
    from adpfl.tasks.base import get_task

    assert GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv3d] is grad_samplers.conv_grad_sample
    torch.manual_seed(0)
    net = get_task("kidney3d").build_network(network)
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    assert not [type(m).__name__ for m in net.modules() if hasattr(m, "ft_compute_sample_grad")]
    x = torch.randn(2, 1, 16, 16, 16)
    (gsm(x) ** 2).sum().backward()
    saved = {n: p.grad_sample.clone() for n, p in net.named_parameters()}
    gsm._close()
    for i in range(2):
        net.zero_grad()
        (net(x[i:i + 1]) ** 2).sum().backward()
        num = sum(float((saved[n][i] - p.grad).norm() ** 2) for n, p in net.named_parameters())
        den = sum(float(p.grad.norm() ** 2) for p in net.parameters())
        assert math.sqrt(num / den) < 1e-5


@pytest.mark.parametrize("dims", [2, 3])
def test_ws_conv_per_sample_grads_exact(dims):
    """The weight-standardised convolution's sampler equals one-sample-at-a-time gradients of
    ``weight`` (through the standardisation) and differs from the plain convolution's sampler."""
    from adpfl.tasks.dp_unet import WSConv2d, WSConv3d

    torch.manual_seed(1)
    layer = (WSConv2d if dims == 2 else WSConv3d)(3, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight.mul_(3).add_(0.2)  # a non-standardised weight, so the chain rule matters
    x = torch.randn(3, 3, *([6] * dims))
    out = layer(x)
    target = torch.randn_like(out)
    backprops = target  # d/d out of sum(out * target)
    got = grad_samplers.ws_conv_grad_sample(layer, [x], backprops)
    plain = grad_samplers.conv_grad_sample(layer, [x], backprops)
    for i in range(3):
        layer.zero_grad()
        (layer(x[i:i + 1]) * target[i:i + 1]).sum().backward()
        for p in (layer.weight, layer.bias):
            assert float((got[p][i] - p.grad).norm() / p.grad.norm()) < 1e-5
    assert float((got[layer.weight] - plain[layer.weight]).norm() / plain[layer.weight].norm()) > 0.1
