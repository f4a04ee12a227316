"""Site-size presets (setting ``data_size``) and where synthetic sites of each size are cached.

``tiny`` is what tests and smoke runs use (seconds per round on a CPU). ``realistic`` sizes
a synthetic site like one of three sites sharing a public data set:

- skin2d: 3,300 training + 330 validation images per site (HAM10000's 10,015 images over
  3 sites) at the task's size, 128 x 128;
- kidney3d: 130 training + 30 validation patients per site (KiTS23's 489 cases over 3 sites);
- brain3d: 130 training + 20 validation patients per site (within BraTS 2024 GLI's ~1,350
  cases over 3 sites, sized like kidney3d so the two 3D tasks cost the same);

both 3D tasks at 48^3 voxels (the training patch is then the whole volume): the resolution a
2-core CPU trains a round of 130 patients on in minutes, not hours. Explicit ``num_train``,
``num_val`` or ``image_size`` settings override the preset's.

Caching: a ``tiny`` synthetic site lives at ``<data_root>/<site>`` (cheap; regenerated when its
settings change). A ``realistic`` one lives in a folder keyed by what it holds,
``<data_root>/realistic-<num_train>-<num_val>-<size>-seed<seed>/<site>`` (``data_root`` is
already per task), so it is generated once and every later job with the same settings reuses
it, whatever its other settings; :func:`adpfl.data.synthetic.ensure_site_data` holds the
site's lock while generating, so two processes asking at once generate it once.
Nothing here imports torch or MONAI.
"""

from __future__ import annotations

import os

from .synthetic import DEFAULT_COUNTS

__all__ = ["DATA_SIZES", "PRESETS", "check_data_size", "resolve_data_size", "synthetic_root"]

DATA_SIZES = ("tiny", "realistic")

#: data_size -> task -> (num_train, num_val, image_size); image_size None = the task's default
PRESETS: dict[str, dict[str, tuple[int, int, int | None]]] = {
    "tiny": {task: (*counts, None) for task, counts in DEFAULT_COUNTS.items()},  # 40/20, 8/4, 8/4
    "realistic": {"skin2d": (3300, 330, 128), "kidney3d": (130, 30, 48), "brain3d": (130, 20, 48)},
}


def check_data_size(data_size: str) -> str:
    if data_size not in DATA_SIZES:
        raise ValueError(f"setting data_size must be one of {DATA_SIZES}, got {data_size!r}")
    return data_size


def resolve_data_size(task: str, data_size: str = "tiny", num_train: int | None = None,
                      num_val: int | None = None, image_size=None) -> tuple[int, int, int | None]:
    """``(num_train, num_val, image_size)`` of ``task`` at ``data_size``, explicit values winning."""
    preset = PRESETS[check_data_size(data_size)].get(task)
    if preset is None:
        raise ValueError(f"task must be one of {tuple(PRESETS[data_size])}, got {task!r}")
    n_train, n_val, size = preset
    return (n_train if num_train is None else num_train, n_val if num_val is None else num_val,
            size if image_size is None else image_size)


def synthetic_root(data_root: str, data_size: str, num_train: int, num_val: int, shape, seed: int) -> str:
    """The folder holding the synthetic sites of these settings (see the module docstring)."""
    if check_data_size(data_size) == "tiny":
        return data_root
    size = "x".join(str(int(s)) for s in shape)
    return os.path.join(data_root, f"{data_size}-{int(num_train)}-{int(num_val)}-{size}-seed{int(seed)}")
