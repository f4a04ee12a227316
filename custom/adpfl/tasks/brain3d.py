"""Adult glioma sub-region segmentation on multi-parametric MRI (BraTS 2024 GLI style).

Images: four co-registered, skull-stripped NIfTI volumes per case, given in the datalist as a
list in the order T1n (native T1), T1c (post-contrast T1), T2w, T2-FLAIR; MONAI's loader
stacks them into one 4-channel image. Labels: one NIfTI with BraTS 2024 GLI numbering,
0 background, 1 NETC (non-enhancing tumour core), 2 SNFH (surrounding FLAIR
hyperintensity), 3 ET (enhancing tumour), 4 RC (resection cavity, post-operative cases).
Evaluation regions are the BraTS 2024 GLI ones: ET, NETC, SNFH, RC, tumour core
TC = ET + NETC, whole tumour WT = ET + NETC + SNFH; RC is its own region and part of
neither TC nor WT, as in the official BraTS 2024 GLI evaluation.

Pre-processing: RAS orientation, crop to the brain's bounding box (any channel non-zero),
resampling to the configured size (default 64^3) and per-channel z-score normalisation over
brain (non-zero) voxels, background kept at 0. Training draws random patches centred on
tumour/brain in a 2:1 ratio, with mirroring and small intensity jitter.
"""

from __future__ import annotations

from adpfl.tasks import volume3d
from adpfl.tasks.base import SegTask


def _load_and_normalize(size):
    from monai import transforms as mt

    # a list of 4 files is loaded as one image with a leading channel axis
    return volume3d.load_oriented() + [
        mt.CropForegroundd(keys=["image", "label"], source_key="image", margin=2, allow_smaller=True),
        volume3d.resize(size),
        mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]


_train, _val, _augment = volume3d.transform_builders(_load_and_normalize, intensity_shift=0.1)


TASK = SegTask(
    name="brain3d",
    spatial_dims=3,
    channel_names=("T1n", "T1c", "T2w", "FLAIR"),
    label_names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
    regions={"ET": (3,), "NETC": (1,), "SNFH": (2,), "RC": (4,), "TC": (1, 3), "WT": (1, 2, 3)},
    key_region="WT",
    **volume3d.UNET_3D,
    image_files=("t1n", "t1c", "t2w", "t2f"),
    make_train_transforms=_train,
    make_val_transforms=_val,
    make_batch_augment=_augment,
)
