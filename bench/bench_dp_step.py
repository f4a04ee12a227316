"""One DP-SGD optimizer step vs one plain step at equal batch, per network variant, one process.

Usage: python bench/bench_dp_step.py [--tasks skin2d kidney3d brain3d] [--size2d 64] [--size3d 32]
                                     [--batch2d 8] [--batch3d 2] [--repeats 5] [--threads 1]

On a fixed random batch (no data loading: the model's step alone), for each task and
network variant (setting ``network``), the median over ``--repeats`` interleaved repeats of:

- ``plain``: forward, DiceCE loss, backward, Adam step (what LocalTrainer does per step);
- ``dpsgd``: the DP-SGD trainer's step: Opacus ``GradSampleModule`` (per-sample gradients by
  hooks, with the grad samplers of :mod:`adpfl.training.grad_samplers` that the trainer
  registers: convolutions and transposed convolutions as one grouped convolution backward,
  PReLU by hand), then the trainer's optimizer :class:`adpfl.training.dp_noise.RecordDPOptimizer`
  (per-sample clip, float64 Gaussian noise, Adam step);
- ``opacus``: the same step with Opacus' own samplers only (convolutions unfolded, transposed
  convolutions and PReLU through its functorch fallback): what the trainer did before;
- ``ghost`` (``--ghost``): Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``
  + ``DPOptimizerFastGradientClipping``, two backward passes, per-sample Dice + CE), with Opacus' own
  float32 noise: timing only.

Printed: the load average before and after, and per task and network the median ms per step
(with the spread min-max over the repeats) and the ratio of the medians to ``plain`` of the
same network. The variants run interleaved within each repeat, so machine load hits all alike.
"""

import argparse
import os
import statistics
import time
import warnings

import torch
from monai.losses import DiceCELoss, DiceLoss

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.tasks.base import NETWORKS, get_task
from adpfl.tasks.network import TaskNetwork
from adpfl.training import grad_samplers
from adpfl.training.dp_noise import RecordDPOptimizer

HAND_WRITTEN = {
    torch.nn.Conv2d: grad_samplers.conv_grad_sample,
    torch.nn.Conv3d: grad_samplers.conv_grad_sample,
    torch.nn.ConvTranspose2d: grad_samplers.conv_transpose_grad_sample,
    torch.nn.ConvTranspose3d: grad_samplers.conv_transpose_grad_sample,
    torch.nn.PReLU: grad_samplers.prelu_grad_sample,
}


def _set_samplers(hand_written: bool) -> None:
    """Opacus' registry (read when a GradSampleModule is built and at every hook call) with the
    hand-written samplers, or as Opacus ships it (its conv sampler; no ConvTranspose/PReLU entry)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample

    for cls, fn in HAND_WRITTEN.items():
        GradSampleModule.GRAD_SAMPLERS.pop(cls, None)
        if hand_written:
            GradSampleModule.GRAD_SAMPLERS[cls] = fn
        elif cls in (torch.nn.Conv2d, torch.nn.Conv3d):
            GradSampleModule.GRAD_SAMPLERS[cls] = compute_conv_grad_sample


def _under(hand_written: bool, make):
    """Build the step with ``make()`` and run it, each time, under that registry."""
    _set_samplers(hand_written)
    fn = make()

    def run():
        _set_samplers(hand_written)
        fn()

    return run


def steps(task, network: str, x, y, ghost: bool) -> dict:
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    b = x.shape[0]
    plain_model = TaskNetwork(task.name, network)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain_model(x), y).backward()
        plain_opt.step()

    def dp_step():
        dp_model = TaskNetwork(task.name, network)
        gsm = GradSampleModule(dp_model, batch_first=True, loss_reduction="mean")
        dp_opt = RecordDPOptimizer(torch.optim.Adam(dp_model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                   max_grad_norm=1.0, expected_batch_size=b, loss_reduction="mean")

        def step():
            dp_opt.zero_grad(set_to_none=True)
            loss_fn(gsm(x), y).backward()
            dp_opt.step()

        return step

    fns = {"plain": plain, "dpsgd": _under(True, dp_step), "opacus": _under(False, dp_step)}
    if ghost:
        gh_model = TaskNetwork(task.name, network)
        gh = GradSampleModuleFastGradientClipping(gh_model, batch_first=True, loss_reduction="mean",
                                                  max_grad_norm=1.0, use_ghost_clipping=True)
        gh_opt = DPOptimizerFastGradientClipping(torch.optim.Adam(gh_model.parameters(), lr=1e-3),
                                                 noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=b,
                                                 loss_reduction="mean")
        dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

        def per_sample(out, target):  # DiceCE per sample (MONAI's DiceCELoss reduces over the batch)
            ce = torch.nn.functional.cross_entropy(out, target[:, 0].long(), reduction="none")
            return dice(out, target).flatten(1).mean(1) + ce.flatten(1).mean(1)

        def ghost_step():
            gh_opt.zero_grad(set_to_none=True)
            losses = per_sample(gh(x), y)
            losses.mean().backward(retain_graph=True)
            gh_opt.zero_grad(set_to_none=True)
            coef = gh.get_clipping_coef()
            gh.disable_hooks()
            (coef * losses).sum().backward()
            gh.enable_hooks()
            gh_opt.step()

        fns["ghost"] = _under(False, lambda: ghost_step)
    return fns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["skin2d", "kidney3d", "brain3d"])
    ap.add_argument("--networks", nargs="+", default=["standard", "dp"], choices=NETWORKS)
    ap.add_argument("--size2d", type=int, default=64)
    ap.add_argument("--size3d", type=int, default=32)
    ap.add_argument("--batch2d", type=int, default=8)
    ap.add_argument("--batch3d", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    ap.add_argument("--ghost", action="store_true", help="also time Opacus' ghost clipping")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()}", flush=True)
    torch.manual_seed(0)
    for name in args.tasks:
        task = get_task(name)
        size, b = (args.size2d, args.batch2d) if task.spatial_dims == 2 else (args.size3d, args.batch3d)
        shape = (size,) * task.spatial_dims
        x = torch.randn(b, task.in_channels, *shape)
        y = torch.randint(0, task.num_classes, (b, 1, *shape))
        for network in args.networks:
            fns = steps(task, network, x, y, args.ghost)
            times = {k: [] for k in fns}
            for f in fns.values():  # warm-up
                f()
            for _ in range(args.repeats):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            parts = ", ".join(f"{k} {med[k] * 1000:.0f} ms [{min(times[k]) * 1000:.0f}-{max(times[k]) * 1000:.0f}] "
                              f"({med[k] / med['plain']:.2f}x)" for k in med)
            print(f"{name} network {network} ({size}^{task.spatial_dims}, batch {b}): {parts}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    _set_samplers(True)  # leave the registry as the trainer has it
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
