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
