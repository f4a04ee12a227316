"""Scoring on the original image grid: a prediction made on the resampled validation image is
taken back to the grid of the case's own files (MONAI ``Invertd`` over the task's
validation transforms: orientation, crop and resampling undone, nearest neighbour for
labels) and compared with the original label file, with distances in the units of that
file's voxel spacing (mm for NIfTI; pixels for PNG masks, which carry no spacing).

This is how the challenges score (BraTS, KiTS23 and ISIC all evaluate on the released
images), and it is applied to every validation here, synthetic or real: synthetic cases
are written at the training size, so for them the inversion changes nothing but the spacing
is still taken from their NIfTI header.
"""

from __future__ import annotations

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms.utils import convert_applied_interp_mode

from adpfl.tasks.base import SegTask

__all__ = ["OriginalGrid", "spacing_of"]


def spacing_of(img: MetaTensor, spatial_dims: int) -> tuple[float, ...]:
    """Voxel size along each array axis, from the image's affine (column norms)."""
    affine = np.asarray(getattr(img, "affine", np.eye(spatial_dims + 1)), dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:spatial_dims, :spatial_dims] ** 2).sum(axis=0)))


class OriginalGrid:
    """Takes predictions back to the case's original grid and loads its original label."""

    def __init__(self, task: SegTask, val_transform: mt.Compose):
        self.task = task
        # labels are taken back with "nearest-exact": torch's legacy "nearest" shifts by up to a voxel
        self.inverter = mt.Invertd(keys="pred", transform=val_transform, orig_keys="image", nearest_interp=False,
                                   to_tensor=True)
        self.loader = mt.Compose([mt.LoadImaged(keys="label", image_only=True),
                                  mt.EnsureChannelFirstd(keys="label")])

    def label(self, item: dict) -> tuple[np.ndarray, tuple[float, ...]]:
        """(class-index label map on the original grid, spacing) of a datalist entry."""
        lab = self.loader({"label": item["label"]})["label"]
        spacing = spacing_of(lab, self.task.spatial_dims)
        if self.task.name == "skin2d":
            from adpfl.tasks.skin2d import mask_to_classes

            classes = mask_to_classes(lab)[0]
        else:
            classes = lab[0]
        arr = np.asarray(classes.detach().cpu().numpy() if isinstance(classes, torch.Tensor) else classes)
        return np.rint(arr).astype(np.int16), spacing

    def prediction(self, pred: torch.Tensor, val_item: dict) -> np.ndarray:
        """A (1, *spatial) label prediction on the validation grid, on the original grid."""
        image = val_item["image"]
        if not isinstance(image, MetaTensor) or not image.applied_operations:
            raise ValueError(f"task {self.task.name}: validation images carry no transform record; "
                             "cannot take predictions back to the original grid")
        # a MetaTensor: Invertd takes the image's transform record for it (a plain tensor is skipped)
        p = MetaTensor(torch.as_tensor(pred).detach().float().cpu())
        record = MetaTensor(image.as_tensor()[:0], meta=image.meta,
                            applied_operations=convert_applied_interp_mode(image.applied_operations,
                                                                           mode="nearest-exact", align_corners=None))
        out = self.inverter({"pred": p, "image": record})["pred"]
        arr = np.rint(np.asarray(out.detach().cpu().numpy())[0]).astype(np.int16)
        original = image.meta.get("spatial_shape")
        if original is not None and tuple(arr.shape) != tuple(int(v) for v in np.asarray(original)):
            raise ValueError(f"prediction taken back to shape {arr.shape}, the original image has "
                             f"{tuple(np.asarray(original).tolist())}")
        return arr
