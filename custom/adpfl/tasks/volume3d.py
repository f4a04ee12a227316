"""Transform pieces shared by the 3D tasks (kidney3d, brain3d): orientation, resampling,
random foreground/background patches with mirroring and intensity jitter, typed output.
Each task module adds only its own loading/normalisation steps. MONAI and torch are imported
when a chain is built, so importing a task stays cheap."""

from __future__ import annotations

import numpy as np

from adpfl.tasks.base import SegTask

#: axis-code letters of the world frame (NIfTI affines are RAS+), passed explicitly
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: network and sampling settings both 3D tasks share (SegTask fields): 64^3 volumes by
#: default, a 4-level MONAI UNet, 48^3 training patches
UNET_3D = {
    "default_size": (64, 64, 64),
    "unet_channels": (16, 32, 64, 128),
    "unet_strides": (2, 2, 2),
    "num_res_units": 2,
    "patch_size": (48, 48, 48),
}


def load_oriented():
    """Load image(s) and label channel-first in RAS (a list of files becomes channels)."""
    from monai import transforms as mt

    return [
        mt.LoadImaged(keys=["image", "label"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        mt.Orientationd(keys=["image", "label"], axcodes="RAS", labels=RAS_LABELS),
    ]


def resize(size):
    from monai import transforms as mt

    return mt.Resized(
        keys=["image", "label"],
        spatial_size=size,
        mode=("trilinear", "nearest-exact"),  # nearest-exact: no half-voxel shift of the labels
        anti_aliasing=(True, False),
        dtype=(np.float32, np.float32),
    )


def patch_size(task: SegTask, size):
    """The training patch: the task's patch size, no larger than the image."""
    if task.patch_size is None:
        return tuple(size)
    return tuple(min(int(p), int(s)) for p, s in zip(task.patch_size, size))


def finish(track_meta: bool = False):
    """Typed output; validation keeps the metadata (``track_meta``) so predictions can be
    resampled back to the original image grid for scoring (``Invertd``)."""
    import torch
    from monai import transforms as mt

    return [
        mt.EnsureTyped(keys="image", dtype=torch.float32, track_meta=track_meta),
        mt.EnsureTyped(keys="label", dtype=torch.uint8, track_meta=track_meta),
    ]


def train_chain(task: SegTask, size, load_and_normalize):
    """Random patches centred on foreground/background 2:1 after the task's own loading and
    normalisation (mirroring and intensity jitter follow on the batch: :func:`augment`).

    The deterministic part (up to the first random transform) is what CacheDataset caches:
    it ends with the foreground/background voxel indices the patch sampler draws from
    (``FgBgToIndicesd``, computed once instead of at every draw) and plain typed tensors.
    The patch comes back as plain tensors too (``EnsureTyped(track_meta=False)``: no
    metadata collated), without touching MONAI's process-wide tracking switch, which
    validation in another thread relies on."""
    from monai import transforms as mt

    indices = ["label_fg_indices", "label_bg_indices"]
    return mt.Compose(
        load_and_normalize
        + [mt.FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0)]
        + finish()
        + [
            mt.RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=patch_size(task, size),
                pos=2.0,
                neg=1.0,
                num_samples=1,
                fg_indices_key=indices[0],
                bg_indices_key=indices[1],
            ),
            mt.DeleteItemsd(keys=indices),
        ]
        + finish()
    )


def augment(intensity_shift: float):
    """Per sample on the batch: mirroring on all axes (p = 0.5 each), intensity scale by
    1 + U(-0.1, 0.1) (p = 0.5) and shift by U(-intensity_shift, intensity_shift) (p = 0.5)."""
    from adpfl.tasks.batch_augment import BatchAugment

    return BatchAugment(spatial_dims=3, flip_axes=(0, 1, 2), flip_prob=0.5, scale_factor=0.1, scale_prob=0.5,
                        shift_offset=intensity_shift, shift_prob=0.5)


def val_chain(load_and_normalize):
    from monai import transforms as mt

    return mt.Compose(load_and_normalize + finish(track_meta=True))


def transform_builders(load_and_normalize, intensity_shift: float):
    """The (train, val, batch augmentation) builders a 3D SegTask takes, from the task's own
    ``load_and_normalize(size) -> list of transforms``."""

    def train(task: SegTask, size):
        return train_chain(task, size, load_and_normalize(size))

    def val(task: SegTask, size):
        return val_chain(load_and_normalize(size))

    def batch_augment(task: SegTask, size):
        return augment(intensity_shift)

    return train, val, batch_augment
