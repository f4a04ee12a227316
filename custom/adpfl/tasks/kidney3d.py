"""Kidney / renal tumour / cyst segmentation on contrast CT (KiTS23 style).

Images: one CT NIfTI in Hounsfield units; labels: one NIfTI with 0 background, 1 kidney,
2 tumour, 3 cyst (KiTS23 numbering). Evaluation follows the KiTS23 hierarchical regions
(kidney+tumour+cyst, tumour+cyst, tumour) on the arg-max of the 4-class prediction.

Pre-processing: RAS orientation, resampling of the whole volume to the configured size
(default 64^3), a soft-tissue CT window clipped to [0, 1]. Training draws random patches
centred on foreground/background in a 2:1 ratio, with mirroring and small intensity jitter;
validation uses the whole volume (sliding-window inference when it exceeds the patch).
"""

from __future__ import annotations

import numpy as np
import torch
from monai import transforms as mt

from adpfl.tasks.base import SegTask

#: CT window in HU mapped to [0, 1] (values outside are clipped). Wide enough to keep
#: perirenal fat (~ -100 HU) apart from air and contrast-enhanced cortex (~ 200 HU) below the top.
HU_MIN, HU_MAX = -200.0, 300.0
#: axis-code letters of the world frame (NIfTI affines are RAS+), passed explicitly
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _load_and_normalize(task: SegTask, size):
    return [
        mt.LoadImaged(keys=["image", "label"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        mt.Orientationd(keys=["image", "label"], axcodes="RAS", labels=_RAS_LABELS),
        mt.Resized(
            keys=["image", "label"],
            spatial_size=size,
            mode=("trilinear", "nearest"),
            anti_aliasing=(True, False),
            dtype=(np.float32, np.float32),
        ),
        mt.ScaleIntensityRanged(keys="image", a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
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
            mt.RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
        + _finish()
    )


def _val(task: SegTask, size):
    return mt.Compose(_load_and_normalize(task, size) + _finish())


TASK = SegTask(
    name="kidney3d",
    spatial_dims=3,
    channel_names=("CT",),
    label_names={0: "background", 1: "kidney", 2: "tumor", 3: "cyst"},
    regions={"kidney_tumor_cyst": (1, 2, 3), "tumor_cyst": (2, 3), "tumor": (2,)},
    key_region="kidney_tumor_cyst",
    default_size=(64, 64, 64),
    unet_channels=(16, 32, 64, 128),
    unet_strides=(2, 2, 2),
    num_res_units=2,
    patch_size=(48, 48, 48),
    make_train_transforms=_train,
    make_val_transforms=_val,
)
