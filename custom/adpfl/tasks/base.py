"""What a segmentation task is: channels, labels, evaluation regions, transforms, network.

This package is the one task registry: a task is one module in it that defines ``TASK``
(a :class:`SegTask`), and :data:`TASK_NAMES` lists them. The data layer reads its facts
(image files per case, label values a mask file may hold, spatial dimensions) from here.
Importing a task is cheap: torch and MONAI are imported only when a network or a transform
chain is built. Nothing here imports nvflare.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["SegTask", "get_task", "TASK_NAMES", "NETWORKS", "check_network", "labels_to_regions"]

TASK_NAMES = ("skin2d", "kidney3d", "brain3d")

#: the network variants every task builds (setting ``network``): ``standard`` is MONAI's UNet
#: (PReLU, transposed-convolution up-sampling); ``dp`` is :class:`adpfl.tasks.dp_unet.DPUNet`,
#: the same UNet with ReLU and convolution + linear up-sampling. Both have fast exact per-sample gradients
#: for record-level DP-SGD (:mod:`adpfl.training.grad_samplers`). Their state dicts differ.
NETWORKS = ("standard", "dp", "dp_ws", "small", "dp_small")

#: the ``*small`` variants: the same UNet with the channels of every level divided by this and
#: one residual unit a level (kidney3d: 152 k parameters instead of 1.19 M)
SMALL_CHANNEL_DIVISOR = 2


def check_network(network: str) -> str:
    """``network`` if it names a variant of :data:`NETWORKS`; ValueError naming the setting otherwise."""
    if network not in NETWORKS:
        raise ValueError(f"setting network must be one of {NETWORKS}, got {network!r}")
    return network


@dataclass(frozen=True)
class SegTask:
    """Static description of one segmentation task.

    Labels are integer class values (0 = background); the network predicts one softmax
    channel per class. Evaluation regions are unions of label values (e.g. KiTS's
    "tumour+cyst"), scored on the arg-max prediction.
    """

    name: str
    spatial_dims: int
    channel_names: tuple[str, ...]
    label_names: dict[int, str]
    regions: dict[str, tuple[int, ...]]
    key_region: str
    default_size: tuple[int, ...]
    unet_channels: tuple[int, ...] = (16, 32, 64, 128)
    unet_strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    # patch size for random-crop training (3D tasks); None = whole image
    patch_size: tuple[int, ...] | None = None
    # the label values a mask file may hold, when they are not the class indices: the mask's
    # values must all lie in one of these sets (the transforms map them to class indices)
    mask_value_sets: tuple[frozenset[int], ...] = ()
    # one image file per entry (these are the file-name suffixes) instead of one file per case
    image_files: tuple[str, ...] = ()
    # builders for the MONAI transform chains (set by each task module)
    make_train_transforms: Callable[[SegTask, tuple[int, ...]], object] | None = field(default=None, compare=False)
    make_val_transforms: Callable[[SegTask, tuple[int, ...]], object] | None = field(default=None, compare=False)
    # the random augmentation applied to each collated training batch (per-sample draws,
    # :class:`adpfl.tasks.batch_augment.BatchAugment`); the per-item chain keeps only what
    # needs one item at a time (the 3D patch sampler)
    make_batch_augment: Callable[[SegTask, tuple[int, ...]], object] | None = field(default=None, compare=False)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(sorted(self.label_names))

    @property
    def num_image_files(self) -> int:
        """Image files per case (brain3d: one per MRI sequence)."""
        return len(self.image_files) or 1

    @property
    def mask_values(self) -> list[int]:
        """Every value a mask file of this task may hold."""
        return sorted(set().union(*self.mask_value_sets)) if self.mask_value_sets else list(self.label_values)

    def check_mask_values(self, values) -> list[int]:
        """The values of ``values`` a mask file of this task may not hold (empty: all fine)."""
        vals = {int(v) for v in values}
        allowed = self.mask_value_sets or (frozenset(self.label_values),)
        if any(vals <= s for s in allowed):
            return []
        return sorted(vals - set(self.mask_values)) or sorted(vals - set(allowed[0]))

    def build_network(self, network: str = "standard") -> torch.nn.Module:
        """The MONAI UNet of this task in variant ``network`` (:data:`NETWORKS`; wrapped by
        :class:`adpfl.tasks.network.TaskNetwork`)."""
        if check_network(network).startswith("dp"):  # dp, dp_ws, dp_small: the DPUNet family
            from adpfl.tasks.dp_unet import DPUNet as UNet
        else:
            from monai.networks.nets import UNet

        small = network.endswith("small")
        net = UNet(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.num_classes,
            channels=tuple(c // SMALL_CHANNEL_DIVISOR for c in self.unet_channels) if small else self.unet_channels,
            strides=self.unet_strides,
            num_res_units=1 if small else self.num_res_units,
        )
        if network == "dp_ws":
            from adpfl.tasks.dp_unet import standardise_convolutions

            standardise_convolutions(net)
        return net

    def resolve_size(self, size=None) -> tuple[int, ...]:
        """``size`` as a full spatial tuple (an int means the same size on every axis)."""
        if size is None or size == 0:
            return tuple(self.default_size)
        if isinstance(size, int):
            size = (size,) * self.spatial_dims
        size = tuple(int(s) for s in size)
        if len(size) != self.spatial_dims or min(size) < 16:
            raise ValueError(
                f"image_size for task {self.name} must be an int or {self.spatial_dims} ints >= 16, got {size}"
            )
        return size

    def train_transforms(self, size=None):
        return self.make_train_transforms(self, self.resolve_size(size))

    def val_transforms(self, size=None):
        return self.make_val_transforms(self, self.resolve_size(size))

    def batch_augment(self, size=None):
        """The task's :class:`~adpfl.tasks.batch_augment.BatchAugment` (None: no batch augmentation)."""
        if self.make_batch_augment is None:
            return None
        size = self.resolve_size(size)
        aug = self.make_batch_augment(self, size)
        aug.check_size(size)
        return aug


def labels_to_regions(labels: torch.Tensor, task: SegTask) -> torch.Tensor:
    """Map an integer label map (B,1,*spatial) to binary region channels (B,R,*spatial)."""
    import torch

    if labels.shape[1] != 1:
        raise ValueError(f"expected a single-channel label map, got shape {tuple(labels.shape)}")
    lab = labels[:, 0]
    chans = []
    for values in task.regions.values():
        m = torch.zeros_like(lab, dtype=torch.bool)
        for v in values:
            m |= lab == v
        chans.append(m)
    return torch.stack(chans, dim=1).float()


def get_task(name: str) -> SegTask:
    """Return the task named ``name`` (one module per task in this package)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")
    try:
        module = importlib.import_module(f"adpfl.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"adpfl.tasks.{name}":
            raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}") from None
        raise
    task = getattr(module, "TASK", None)
    if not isinstance(task, SegTask):
        raise ValueError(
            f"task must be one of {TASK_NAMES}, got {name!r} (module adpfl.tasks.{name} does not define TASK)"
        )
    return task
