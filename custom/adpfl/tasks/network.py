"""The task's network as a module constructible from its task name alone.

FLARE's model persistor instantiates the model from the job config (``path`` + ``args``);
``TaskNetwork(task="kidney3d", network="dp")`` keeps that config to the two settings that
define the module, and the executor builds the same one, so server and sites agree on the
state-dict keys. ``initial_checkpoint`` starts the weights from a warm-start checkpoint
trained only on declared public data (checked by :func:`adpfl.tasks.checkpoint.load_public_checkpoint`);
the server's persistor builds the network from the job config, so the check runs where the
initial global model is made.
"""

from __future__ import annotations

import torch

from adpfl.tasks.base import get_task


class TaskNetwork(torch.nn.Module):
    """``init_seed``: the initial weights drawn from this seed (the job's ``seed`` for the
    server's initial global model; None: fresh every run). Torch's global RNG is left as it was.
    ``initial_checkpoint``: a public warm-start checkpoint whose weights replace the drawn ones
    (:class:`~adpfl.tasks.checkpoint.CheckpointError` when it is not one for this task and network)."""

    def __init__(self, task: str = "skin2d", network: str = "standard", init_seed: int | None = None,
                 initial_checkpoint: str | None = None):
        super().__init__()
        self.task = task
        self.network = network
        self.init_seed = init_seed
        self.initial_checkpoint = initial_checkpoint
        if init_seed is None:
            self.net = get_task(task).build_network(network)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(init_seed))
                self.net = get_task(task).build_network(network)
        if initial_checkpoint:
            from adpfl.tasks.checkpoint import load_public_checkpoint

            self.load_state_dict(load_public_checkpoint(initial_checkpoint, task, network, self.state_dict()))

    def forward(self, x):
        return self.net(x)


# ---- which parameters local training updates (setting ``trainable``) ---------------------------
#: ``all``: every parameter; ``decoder``: the up-sampling path of the UNet, from the bottom
#: (excluded) to the output block; ``head``: the output block only (the top up-sampling step,
#: which maps the top level's features to the classes). The rest keeps the global model's values.
TRAINABLE = ("all", "decoder", "head")


def unet_parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The parts of the (first) MONAI UNet inside ``model``: ``encoder`` (the down-sampling
    blocks, top first), ``bottom`` (the innermost block) and ``decoder`` (the up-sampling blocks,
    top first: ``decoder[0]`` is the output block). MONAI builds a UNet level as
    ``Sequential(down, SkipConnection(next level), up)`` (its ``_get_connection_block``); this
    walks that nesting. ValueError when ``model`` holds no such UNet."""
    from monai.networks.layers import SkipConnection
    from monai.networks.nets import UNet

    unet = next((m for m in model.modules() if isinstance(m, UNet)), None)
    if unet is None:
        raise ValueError(f"{type(model).__name__} holds no MONAI UNet: setting trainable needs one")
    encoder, decoder = [], []
    level = unet.model
    while isinstance(level, torch.nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
        encoder.append(level[0])
        decoder.append(level[2])
        level = level[1].submodule
    if not decoder:
        raise ValueError("the UNet's levels are not MONAI's Sequential(down, SkipConnection, up) nesting")
    return {"encoder": encoder, "bottom": [level], "decoder": decoder}


def set_trainable(model: torch.nn.Module, trainable: str = "all") -> tuple[int, int]:
    """Set ``requires_grad`` of every parameter of ``model`` for setting ``trainable``
    (:data:`TRAINABLE`); returns (trainable parameter count, all parameters). Idempotent.

    Frozen parameters take no gradient, so under DP-SGD they get no per-sample gradient, no
    clipping share and no noise: the noise a step adds has the dimension of what trains. They
    leave the site unchanged (a zero update), i.e. they release nothing about its records."""
    if trainable not in TRAINABLE:
        raise ValueError(f"setting trainable must be one of {TRAINABLE}, got {trainable!r}")
    params = list(model.parameters())
    if trainable == "all":
        keep = {id(p) for p in params}
    else:
        parts = unet_parts(model)
        blocks = parts["decoder"] if trainable == "decoder" else parts["decoder"][:1]
        keep = {id(p) for b in blocks for p in b.parameters()}
    for p in params:
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in params if id(p) in keep), sum(p.numel() for p in params)
