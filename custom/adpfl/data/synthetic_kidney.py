"""Synthetic abdominal CT volumes for the ``kidney3d`` task (KiTS23 stand-in).

Volume: 1 channel, int16 Hounsfield-like units, default 64^3, array axes (x, y, z) =
(left-right, anterior-posterior, inferior-superior), isotropic spacing ``320 / size`` mm.
Label (uint8, KiTS23 numbering): 0 background, 1 kidney, 2 tumour, 3 cyst.

Anatomy (normalised coordinates in [-1, 1]):

* air -1000 outside an irregular elliptic body cross-section; subcutaneous fat (~ -100 HU)
  in a rim below the skin and perirenal fat around each kidney;
* soft tissue ~40 HU with smooth texture, liver (~60 HU), vertebral body (~450 HU, with
  ~80 HU discs), contrast-filled aorta (~180 HU), a few bowel gas pockets (~ -900 HU);
* two bean-shaped kidneys (ellipsoid minus a medial hilum notch, rough surface), cortex
  ~(100 + 80 * enhancement) HU and medulla ~(60 + 50 * enhancement) HU;
* optional tumour (label 2): irregular blob sitting on or in one kidney, heterogeneous
  ~70 HU with a darker necrotic centre when large;
* optional cyst (label 3): smooth water-like blob ~10 HU;
* then an additive low-frequency bias field, scanner scale/offset, Gaussian blur
  (anisotropic along z = slice thickness) and Gaussian noise.

Per-site scanner shift (``site_index``: "site-1" -> 0, ...)
---------------------------------------------------------
=====  ========  =========  =======  =======  ======  ===========  =========  =======
index  HU scale  HU offset  noise σ  blur xy  blur z  enhancement  p(tumour)  p(cyst)
=====  ========  =========  =======  =======  ======  ===========  =========  =======
0      1.00      0          12       0.5      0.6     1.0          0.80       0.30
1      0.95      +15        20       0.7      1.2     0.8          0.60       0.50
2      1.06      -20        28       0.4      0.8     1.2          0.95       0.15
3      0.90      +5         16       0.9      1.5     0.7          0.50       0.60
>=4    drawn uniformly within the ranges above with ``default_rng(index)``
=====  ========  =========  =======  =======  ======  ===========  =========  =======

Blur sigmas are in voxels (at 64^3; scaled with ``size / 64``).  Cases without tumour
or cyst are normal: class prevalence differs per site.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._fields import blob_level, grid, smooth_noise

_KIDNEY_TABLE = [
    # scale, offset, noise, blur_xy, blur_z, enhancement, p_tumour, p_cyst
    (1.00, 0.0, 12.0, 0.5, 0.6, 1.0, 0.80, 0.30),
    (0.95, 15.0, 20.0, 0.7, 1.2, 0.8, 0.60, 0.50),
    (1.06, -20.0, 28.0, 0.4, 0.8, 1.2, 0.95, 0.15),
    (0.90, 5.0, 16.0, 0.9, 1.5, 0.7, 0.50, 0.60),
]
_KEYS = ("hu_scale", "hu_offset", "noise_sigma", "blur_xy", "blur_z", "enhancement",
         "p_tumour", "p_cyst")


def kidney_domain_shift(index: int) -> dict:
    if index < len(_KIDNEY_TABLE):
        vals = _KIDNEY_TABLE[index]
    else:
        r = np.random.default_rng(index)
        lo = np.min(np.array(_KIDNEY_TABLE), axis=0)
        hi = np.max(np.array(_KIDNEY_TABLE), axis=0)
        vals = r.uniform(lo, hi)
    return {k: round(float(v), 4) for k, v in zip(_KEYS, vals)}


def make_kidney_case(rng: np.random.Generator, shape: tuple[int, int, int], shift: dict):
    """Return ``(ct int16 (X, Y, Z) in HU, label uint8 (X, Y, Z) in {0..3}, meta dict)``."""
    x, y, z = grid(shape)
    coords = [x, y, z]
    f32 = np.float32

    # ---- body, fat, organs ----------------------------------------------------------------
    body_noise = smooth_noise(rng, shape, cells=3)
    ax, ay = rng.uniform(0.85, 0.95), rng.uniform(0.62, 0.72)
    body = blob_level([x, y], (0.0, 0.05), (ax, ay), 0.03, body_noise)
    body = np.broadcast_to(body, shape)
    hu = np.full(shape, -1000.0, f32)
    inside = body > 0
    tissue = 40.0 + 10.0 * smooth_noise(rng, shape, cells=8)
    fat_rim = rng.uniform(0.08, 0.16)
    hu = np.where(inside, np.where(body < fat_rim, -100.0 + 15 * body_noise, tissue), hu)

    liver = blob_level(coords, (-0.35, -0.05, 0.45), (0.42, 0.38, 0.55), 0.05, body_noise)
    hu = np.where((liver > 0) & inside, 60.0 + 6.0 * body_noise, hu)
    spine_c = (0.0, 0.45 + rng.uniform(-0.03, 0.03))
    spine = blob_level([x, y], spine_c, (0.13, 0.11))
    disc = np.cos(z * np.pi * rng.uniform(4.5, 6.0) + rng.uniform(0, 6.3)) > 0.75
    hu = np.where(np.broadcast_to(spine > 0, shape), np.where(disc, 80.0, 450.0), hu)
    aorta = blob_level([x, y], (0.1, 0.22), (0.06, 0.06))
    hu = np.where(np.broadcast_to(aorta > 0, shape), 180.0 * shift["enhancement"] ** 0.5, hu)
    for _ in range(int(rng.integers(0, 4))):
        c = (rng.uniform(-0.4, 0.4), rng.uniform(-0.45, -0.1), rng.uniform(-0.6, 0.4))
        gas = blob_level(coords, c, (rng.uniform(0.04, 0.09),) * 3, 0.1, body_noise)
        hu = np.where((gas > 0) & inside, -900.0, hu)

    # ---- kidneys ---------------------------------------------------------------------------
    label = np.zeros(shape, np.uint8)
    kid_noise = smooth_noise(rng, shape, cells=10)
    kidneys = []
    enh = shift["enhancement"]
    for side in (-1.0, 1.0):
        c = np.array([side * rng.uniform(0.40, 0.48), rng.uniform(0.20, 0.28), rng.uniform(-0.2, 0.2)])
        r = np.array([rng.uniform(0.16, 0.20), rng.uniform(0.13, 0.16), rng.uniform(0.28, 0.36)])
        lev = blob_level(coords, c, r, 0.06, kid_noise)
        hilum_c = c + np.array([-side * r[0] * 0.95, 0.0, 0.0])
        hilum = blob_level(coords, hilum_c, r * np.array([0.5, 0.45, 0.35]), 0.05, kid_noise)
        lev = np.minimum(lev, -hilum)
        # perirenal fat capsule
        fat = (lev > -0.2) & (lev <= 0) & inside & (spine <= 0)
        hu = np.where(fat, -90.0 + 10 * kid_noise, hu)
        cortex = 100.0 + 80.0 * enh + 8 * kid_noise
        medulla = 60.0 + 50.0 * enh + 8 * kid_noise
        hu = np.where(lev > 0, np.where(lev < 0.3, cortex, medulla), hu)
        label[lev > 0] = 1
        kidneys.append((c, r))

    # ---- lesions ---------------------------------------------------------------------------
    has_cyst = bool(rng.uniform() < shift["p_cyst"])
    has_tumour = bool(rng.uniform() < shift["p_tumour"])
    les_noise = smooth_noise(rng, shape, cells=12)
    if has_cyst:
        c, r = kidneys[int(rng.integers(0, 2))]
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        cc = c + d * r * rng.uniform(0.3, 0.9)
        cr = rng.uniform(0.05, 0.09)
        cyst = blob_level(coords, cc, (cr, cr, cr * rng.uniform(0.8, 1.2)), 0.03, les_noise)
        hu = np.where(cyst > 0, 10.0 + 3 * les_noise, hu)
        label[cyst > 0] = 3
    if has_tumour:
        c, r = kidneys[int(rng.integers(0, 2))]
        d = rng.standard_normal(3)
        d[1] = abs(d[1]) * 0.5  # prefer lateral/polar positions
        d /= np.linalg.norm(d)
        tc = c + d * r * rng.uniform(0.5, 1.0)
        tr = rng.uniform(0.07, 0.16)
        t_radii = (tr, tr * rng.uniform(0.8, 1.2), tr * rng.uniform(0.8, 1.3))
        tumour = blob_level(coords, tc, t_radii, 0.15, les_noise)
        tmask = (tumour > 0) & inside
        tum_hu = 70.0 + 15.0 * enh + 18.0 * smooth_noise(rng, shape, cells=16)
        if tr > 0.12:  # necrotic centre
            tum_hu = np.where(tumour > 0.55, 30.0 + 10 * les_noise, tum_hu)
        hu = np.where(tmask, tum_hu, hu)
        label[tmask] = 2

    # ---- acquisition -------------------------------------------------------------------------
    hu = hu + np.where(inside, 15.0 * smooth_noise(rng, shape, cells=2), 0.0)
    hu = hu * shift["hu_scale"] + shift["hu_offset"] * inside
    k = min(shape) / 64.0
    hu = ndimage.gaussian_filter(hu, sigma=(shift["blur_xy"] * k, shift["blur_xy"] * k, shift["blur_z"] * k))
    hu = hu + shift["noise_sigma"] * rng.standard_normal(shape).astype(f32)
    ct = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return ct, label, {"tumour": has_tumour, "cyst": has_cyst and bool((label == 3).any())}
