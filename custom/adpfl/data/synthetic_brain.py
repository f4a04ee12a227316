"""Synthetic skull-stripped multi-parametric brain MRI for the ``brain3d`` task (BraTS 2024 GLI
stand-in).

Per case: 4 co-registered int16 volumes (T1n, T1c, T2w, T2-FLAIR), default 64^3, 1 mm-like
spacing ``160 / size`` mm, background exactly 0 outside an irregular brain ellipsoid, and a
uint8 label with BraTS 2024 numbering: 0 background, 1 NETC (non-enhancing tumour core),
2 SNFH (surrounding FLAIR hyperintensity / oedema), 3 ET (enhancing tumour).

Anatomy: cortex (GM) rim, white matter interior, two lateral ventricles (CSF), and a glioma
made of nested irregular shells: NETC core, a 1-3 voxel ET rim around it and a larger SNFH
region around both (sometimes without necrotic core: then ET is a solid blob).

Relative tissue intensities (WM = 1 on T1n):

=======  =====  =====  =====  =====  =====  =====
channel  WM     GM     CSF    NETC   SNFH   ET
=======  =====  =====  =====  =====  =====  =====
T1n      1.00   0.75   0.30   0.45   0.70   0.70
T1c      1.00   0.78   0.30   0.35   0.72   1.60
T2w      0.55   0.80   1.60   1.30   1.25   0.95
FLAIR    0.70   0.85   0.20   0.80   1.50   1.05
=======  =====  =====  =====  =====  =====  =====

Then a smooth multiplicative bias field, per-channel site scale/offset, per-channel Gaussian
blur and Gaussian noise (relative to WM), ×800 and rounding; background is reset to exactly 0.

Per-site shift (``site_index``: "site-1" -> 0, ...)
--------------------------------------------------
All per-channel columns are listed in the order T1n, T1c, T2w, FLAIR.

=====  ======================  =====================  ======================  ==================  ====  =======
index  scale                   offset (×800)          noise σ (rel. WM)       blur σ (voxels)     bias  p(NETC)
=====  ======================  =====================  ======================  ==================  ====  =======
0      1.00, 1.00, 1.00, 1.00  0, 0, 0, 0             .030, .030, .035, .040  0.5, 0.5, 0.6, 0.7  0.10  0.90
1      1.20, 0.90, 1.10, 0.80  .06, 0, -.04, .03      .050, .040, .060, .050  0.8, 0.6, 0.9, 1.1  0.20  0.70
2      0.80, 1.15, 0.90, 1.25  -.05, .04, .03, -.03   .070, .060, .070, .080  0.3, 0.3, 0.4, 0.5  0.15  0.95
3      1.10, 1.10, 0.75, 1.00  .03, -.03, .08, .05    .040, .050, .040, .060  1.0, 0.8, 1.0, 1.3  0.25  0.60
>=4    drawn uniformly within the ranges above with ``default_rng(index)``
=====  ======================  =====================  ======================  ==================  ====  =======

Blur sigmas are given for 64^3 and scale with ``size / 64``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._fields import blob_level, grid, smooth_noise

# rows: channel T1n, T1c, T2w, FLAIR; columns: WM, GM, CSF, NETC, SNFH, ET
_TISSUE = np.array(
    [
        [1.00, 0.75, 0.30, 0.45, 0.70, 0.70],
        [1.00, 0.78, 0.30, 0.35, 0.72, 1.60],
        [0.55, 0.80, 1.60, 1.30, 1.25, 0.95],
        [0.70, 0.85, 0.20, 0.80, 1.50, 1.05],
    ],
    np.float32,
)
_BRAIN_TABLE = [
    # scale(4), offset(4), noise(4), blur(4), bias, p_netc
    ((1.00, 1.00, 1.00, 1.00), (0.0, 0.0, 0.0, 0.0), (0.03, 0.03, 0.035, 0.04),
     (0.5, 0.5, 0.6, 0.7), 0.10, 0.90),
    ((1.20, 0.90, 1.10, 0.80), (0.06, 0.0, -0.04, 0.03), (0.05, 0.04, 0.06, 0.05),
     (0.8, 0.6, 0.9, 1.1), 0.20, 0.70),
    ((0.80, 1.15, 0.90, 1.25), (-0.05, 0.04, 0.03, -0.03), (0.07, 0.06, 0.07, 0.08),
     (0.3, 0.3, 0.4, 0.5), 0.15, 0.95),
    ((1.10, 1.10, 0.75, 1.00), (0.03, -0.03, 0.08, 0.05), (0.04, 0.05, 0.04, 0.06),
     (1.0, 0.8, 1.0, 1.3), 0.25, 0.60),
]
UNIT = 800.0


def brain_domain_shift(index: int) -> dict:
    if index < len(_BRAIN_TABLE):
        scale, offset, noise, blur, bias, p_netc = _BRAIN_TABLE[index]
    else:
        r = np.random.default_rng(index)
        scale = r.uniform(0.75, 1.25, size=4)
        offset = r.uniform(-0.05, 0.08, size=4)
        noise, blur = r.uniform(0.03, 0.08, size=4), r.uniform(0.3, 1.3, size=4)
        bias, p_netc = r.uniform(0.1, 0.25), r.uniform(0.6, 0.95)
    return {
        "channel_scale": [round(float(v), 4) for v in scale],
        "channel_offset": [round(float(v), 4) for v in offset],
        "noise_sigma": [round(float(v), 4) for v in noise],
        "blur_sigma": [round(float(v), 4) for v in blur],
        "bias_strength": round(float(bias), 4),
        "p_netc": round(float(p_netc), 4),
        "intensity_unit": UNIT,
    }


def make_brain_case(rng: np.random.Generator, shape: tuple[int, int, int], shift: dict):
    """Return ``(image int16 (4, X, Y, Z), label uint8 (X, Y, Z) in {0..3}, meta dict)``."""
    x, y, z = grid(shape)
    coords = [x, y, z]
    f32 = np.float32

    # ---- anatomy: tissue class map 0 WM, 1 GM, 2 CSF -----------------------------------------
    n_brain = smooth_noise(rng, shape, cells=4)
    brain = blob_level(coords, (0.0, 0.0, -0.05), (rng.uniform(0.72, 0.8), rng.uniform(0.84, 0.92),
                                                   rng.uniform(0.7, 0.78)), 0.04, n_brain)
    inside = brain > 0
    n_fine = smooth_noise(rng, shape, cells=14)
    tissue = np.where(brain + 0.05 * n_fine < rng.uniform(0.12, 0.18), 1, 0).astype(np.int8)
    for side in (-1.0, 1.0):
        vent = blob_level(coords, (side * 0.1, rng.uniform(-0.1, 0.05), 0.05),
                          (0.06, rng.uniform(0.25, 0.32), 0.12), 0.1, n_fine)
        tissue[vent > 0] = 2
    # sulci: thin CSF in the cortical rim
    tissue[(tissue == 1) & (n_fine > 1.2)] = 2

    # ---- tumour: nested irregular shells ---------------------------------------------------
    label = np.zeros(shape, np.uint8)
    side = rng.choice([-1.0, 1.0])
    tc = (side * rng.uniform(0.2, 0.42), rng.uniform(-0.4, 0.4), rng.uniform(-0.25, 0.3))
    r_core = rng.uniform(0.12, 0.22)  # outer radius of the ET shell
    n_t = smooth_noise(rng, shape, cells=10)
    radii = np.array([1.0, rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)])
    core_lvl = blob_level(coords, tc, r_core * radii, 0.12, n_t)
    r_edema = r_core * rng.uniform(1.6, 2.3)
    edema_lvl = blob_level(coords, tc, r_edema * radii * rng.uniform(0.85, 1.15, 3), 0.2,
                           smooth_noise(rng, shape, cells=6))
    has_netc = bool(rng.uniform() < shift["p_netc"])
    rim = rng.uniform(0.25, 0.5)  # ET rim thickness as a fraction of the core level
    label[(edema_lvl > 0) & inside] = 2
    label[(core_lvl > 0) & inside] = 3
    if has_netc:
        label[(core_lvl > rim) & inside] = 1

    # ---- intensities -------------------------------------------------------------------------
    cls = tissue.astype(np.int8)
    cls = np.where(label == 1, 3, np.where(label == 2, 4, np.where(label == 3, 5, cls)))
    k = min(shape) / 64.0
    img = np.empty((4,) + tuple(shape), np.int16)
    for ch in range(4):
        v = _TISSUE[ch][cls]
        v = v * (1.0 + 0.04 * n_fine)  # tissue texture
        v = v * np.exp(shift["bias_strength"] * smooth_noise(rng, shape, cells=2))
        v = v * shift["channel_scale"][ch] + shift["channel_offset"][ch]
        v = np.where(inside, v, 0.0).astype(f32)
        v = ndimage.gaussian_filter(v, sigma=shift["blur_sigma"][ch] * k)
        v = v + shift["noise_sigma"][ch] * rng.standard_normal(shape).astype(f32)
        v = np.where(inside, np.clip(v, 0.0, None) * UNIT, 0.0)
        img[ch] = np.round(v).astype(np.int16)
    return img, label, {"netc": has_netc}
