"""Adult glioma sub-region segmentation on multi-parametric MRI (BraTS 2024 GLI style).

Images: four co-registered, skull-stripped NIfTI volumes per case, given in the datalist as a
list in the order T1n (native T1), T1c (post-contrast T1), T2w, T2-FLAIR; MONAI's loader
stacks them into one 4-channel image. Labels: one NIfTI with BraTS 2024 numbering,
0 background, 1 NETC (non-enhancing tumour core), 2 SNFH (surrounding FLAIR
hyperintensity), 3 ET (enhancing tumour). Evaluation regions are the BraTS 2024 ones:
ET, NETC, SNFH, tumour core TC = ET + NETC, whole tumour WT = ET + NETC + SNFH.

Pre-processing: RAS orientation, crop to the brain's bounding box (any channel non-zero),
resampling to the configured size (default 64^3) and per-channel z-score normalisation over
brain (non-zero) voxels, background kept at 0. Training draws random patches centred on
tumour/brain in a 2:1 ratio, with mirroring and small intensity jitter.
"""

from __future__ import annotations

import numpy as np
import torch
from monai import transforms as mt

from adpfl.tasks.base import SegTask

#: axis-code letters of the world frame (NIfTI affines are RAS+), passed explicitly
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _load_and_normalize(task: SegTask, size):
    return [
        # a list of 4 files is loaded as one image with a leading channel axis
        mt.LoadImaged(keys=["image", "label"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        mt.Orientationd(keys=["image", "label"], axcodes="RAS", labels=_RAS_LABELS),
        mt.CropForegroundd(keys=["image", "label"], source_key="image", margin=2, allow_smaller=True),
        mt.Resized(
            keys=["image", "label"],
            spatial_size=size,
            mode=("trilinear", "nearest"),
            anti_aliasing=(True, False),
            dtype=(np.float32, np.float32),
        ),
        mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]


def _patch(task: SegTask, size):
    """The training patch: the task's patch size, no larger than the image."""
    if task.patch_size is None:
        return tuple(size)
    return tuple(min(int(p), int(s)) for p, s in zip(task.patch_size, size))


def _finish():
    return [
        mt.EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        mt.EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False),
    ]


def _train(task: SegTask, size):
    return mt.Compose(
        _load_and_normalize(task, size)
        + [
            mt.RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=_patch(task, size),
                pos=2.0,
                neg=1.0,
                num_samples=1,
                image_key="image",
                image_threshold=0.0,
            ),
            mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
        + _finish()
    )


def _val(task: SegTask, size):
    return mt.Compose(_load_and_normalize(task, size) + _finish())


TASK = SegTask(
    name="brain3d",
    spatial_dims=3,
    channel_names=("T1n", "T1c", "T2w", "FLAIR"),
    label_names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET"},
    regions={"ET": (3,), "NETC": (1,), "SNFH": (2,), "TC": (1, 3), "WT": (1, 2, 3)},
    key_region="WT",
    default_size=(64, 64, 64),
    unet_channels=(16, 32, 64, 128),
    unet_strides=(2, 2, 2),
    num_res_units=2,
    patch_size=(48, 48, 48),
    make_train_transforms=_train,
    make_val_transforms=_val,
)
