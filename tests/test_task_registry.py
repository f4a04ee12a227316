"""One task registry (adpfl.tasks): the data layer reads its task facts from it, and
importing the data layer or a task's facts pulls in neither torch nor MONAI."""

import subprocess
import sys

import numpy as np
import pytest

from adpfl.data import BRAIN_MODALITIES, DataError, check_pair
from adpfl.data.common import normalize_size, task_facts
from adpfl.tasks.base import TASK_NAMES, get_task


def test_data_layer_and_task_facts_import_neither_torch_nor_monai():
    code = ("import sys, adpfl.data, adpfl.data.datalist, adpfl.data.public\n"
            "from adpfl.tasks.base import TASK_NAMES, get_task\n"
            "[get_task(n).mask_values for n in TASK_NAMES]\n"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_facts_the_data_layer_uses():
    assert TASK_NAMES == ("skin2d", "kidney3d", "brain3d")
    assert [get_task(n).num_image_files for n in TASK_NAMES] == [1, 1, 4]
    assert BRAIN_MODALITIES == ("t1n", "t1c", "t2w", "t2f") == get_task("brain3d").image_files
    assert len(BRAIN_MODALITIES) == get_task("brain3d").in_channels
    assert get_task("kidney3d").label_names[2] == "tumor"
    assert normalize_size("skin2d", None) == get_task("skin2d").default_size
    assert normalize_size("brain3d", None) == get_task("brain3d").default_size
    with pytest.raises(DataError, match="unknown task 'liver'"):
        task_facts("liver")


def test_mask_values_per_task():
    skin = get_task("skin2d")
    # ISIC masks store the lesion as 255; a 0/1 mask is accepted too, a mix of both is not
    assert skin.check_mask_values([0, 255]) == [] and skin.check_mask_values([0, 1]) == []
    assert skin.check_mask_values([0, 1, 255]) == [1]
    assert skin.check_mask_values([0, 128]) == [128]
    assert get_task("kidney3d").check_mask_values([0, 1, 2, 3]) == []
    assert get_task("brain3d").check_mask_values([0, 4]) == []  # BraTS 2024 GLI: 4 = resection cavity
    assert get_task("brain3d").check_mask_values([0, 5]) == [5]


def test_skin_mask_of_zeros_and_ones_trains_as_lesion():
    """A 0/1 mask passes validation; its 1s must be lesion for training too (they were
    read as background when only 0/255 masks were binarized correctly)."""
    from adpfl.tasks.skin2d import _binarize_mask

    mask01 = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    mask255 = mask01 * 255
    halo = np.array([[0, 40], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(_binarize_mask(mask01), mask01.astype(np.float32))
    np.testing.assert_array_equal(_binarize_mask(mask255), mask01.astype(np.float32))
    np.testing.assert_array_equal(_binarize_mask(halo), np.array([[0, 0], [1, 1]], dtype=np.float32))


def test_skin_mask_with_unknown_values_names_the_allowed_sets(tmp_path):
    from PIL import Image

    img, lab = tmp_path / "img.png", tmp_path / "lab.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(lab)
    with pytest.raises(DataError, match=r"unknown values \[7\].*allowed: \[0, 255\] or \[0, 1\]"):
        check_pair(str(img), str(lab), task="skin2d")


def test_one_job_per_registered_task_and_mode():
    from adpfl.flare.jobs import all_jobs
    from adpfl.modes import GRID_VARIANTS, MODE_LABELS, MODES

    assert sorted(all_jobs()) == sorted((t, m) for t in TASK_NAMES for m in MODES)
    # every job mode and every comparison-grid variant (a job mode with other settings, no job of its own)
    assert set(MODE_LABELS) == set(MODES) | set(GRID_VARIANTS)
    assert set(GRID_VARIANTS.values()) <= set(MODES) and not set(GRID_VARIANTS) & set(MODES)
