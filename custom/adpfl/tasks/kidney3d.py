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

from adpfl.tasks import volume3d
from adpfl.tasks.base import SegTask

#: CT window in HU mapped to [0, 1] (values outside are clipped). Wide enough to keep
#: perirenal fat (~ -100 HU) apart from air and contrast-enhanced cortex (~ 200 HU) below the top.
HU_MIN, HU_MAX = -200.0, 300.0


def _load_and_normalize(size):
    from monai import transforms as mt

    return volume3d.load_oriented() + [
        volume3d.resize(size),
        mt.ScaleIntensityRanged(keys="image", a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
    ]


_train, _val, _augment = volume3d.transform_builders(_load_and_normalize, intensity_shift=0.05)


TASK = SegTask(
    name="kidney3d",
    spatial_dims=3,
    channel_names=("CT",),
    label_names={0: "background", 1: "kidney", 2: "tumor", 3: "cyst"},
    regions={"kidney_tumor_cyst": (1, 2, 3), "tumor_cyst": (2, 3), "tumor": (2,)},
    key_region="kidney_tumor_cyst",
    **volume3d.UNET_3D,
    make_train_transforms=_train,
    make_val_transforms=_val,
    make_batch_augment=_augment,
)
