"""Skin lesion segmentation on 2D RGB dermoscopy (HAM10000 / ISIC 2018 Task 1 style).

Images: RGB PNG/JPEG, masks: single-channel PNG with 0 (skin) / 255 (lesion), as in ISIC;
a 0/1 mask is accepted too. The transforms map either to class indices 0 / 1.
"""

from __future__ import annotations

import numpy as np

from adpfl.tasks.base import SegTask


def _binarize_mask(x):
    # ISIC masks are 0/255 (sometimes with JPEG-like halo values): lesion = above half range;
    # a 0/1 mask (maximum 1): lesion = 1
    threshold = 0.5 if float(x.max()) <= 1 else 127
    return (x > threshold).astype(np.float32) if isinstance(x, np.ndarray) else (x > threshold).float()


def mask_to_classes(x):
    """Class indices (0 skin, 1 lesion) of a mask as loaded, channel first (as validation
    reads it; used to score on the original image)."""
    return _binarize_mask(_first_channel(x))


def _first_channel(x):
    return x[:1]


def _rgb(x):
    return x[:3]


def _load_and_normalize(task: SegTask, size):
    from monai import transforms as mt

    return [
        mt.LoadImaged(keys=["image", "label"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        # a mask saved as RGB(A) keeps only its first channel
        mt.Lambdad(keys="label", func=_first_channel),
        mt.Lambdad(keys="label", func=_binarize_mask),
        mt.Lambdad(keys="image", func=_rgb),
        mt.ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        mt.Resized(keys=["image", "label"], spatial_size=size, mode=("bilinear", "nearest-exact")),
    ]


def _train(task: SegTask, size):
    from monai import transforms as mt

    # deterministic only: CacheDataset caches the whole chain as plain tensors; the random
    # flips and quarter turns run on each collated batch (_augment)
    return mt.Compose(_load_and_normalize(task, size) + [mt.EnsureTyped(keys=["image", "label"], track_meta=False)])


def _augment(task: SegTask, size):
    from adpfl.tasks.batch_augment import BatchAugment

    # per sample: mirror on each axis (p = 0.5), 1-3 quarter turns (p = 0.5)
    return BatchAugment(spatial_dims=2, flip_axes=(0, 1), flip_prob=0.5, rot90_prob=0.5)


def _val(task: SegTask, size):
    from monai import transforms as mt

    # metadata kept: predictions are resampled back to the original image for scoring
    return mt.Compose(_load_and_normalize(task, size) + [mt.EnsureTyped(keys=["image", "label"], track_meta=True)])


TASK = SegTask(
    name="skin2d",
    spatial_dims=2,
    channel_names=("R", "G", "B"),
    label_names={0: "background", 1: "lesion"},
    regions={"lesion": (1,)},
    key_region="lesion",
    mask_value_sets=(frozenset({0, 255}), frozenset({0, 1})),
    default_size=(128, 128),
    unet_channels=(16, 32, 64, 128),
    unet_strides=(2, 2, 2),
    num_res_units=2,
    make_train_transforms=_train,
    make_val_transforms=_val,
    make_batch_augment=_augment,
)
