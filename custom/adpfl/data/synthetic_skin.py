"""Synthetic dermoscopy-like images for the ``skin2d`` task (ISIC 2018 Task 1 stand-in).

Each image is RGB (uint8, default 128x128) with a binary mask (uint8 0/255):

* skin: per-image tone between light and dark skin, low-frequency blotchiness + fine grain;
* lesion: union of 1-3 lobes, each an ellipse whose radius is perturbed by a random radial
  Fourier series (harmonics 2-7) plus a smooth noise field, so borders are irregular; inside,
  colour goes from light brown at the (slightly fuzzy) border to a darker brown/black core,
  with optional blue-grey veil patches, dark globules and a faint reticular pattern;
  per-image lesion lightness varies so that some lesions are low-contrast;
* 0-5 dark, slightly curved hair strokes across skin and lesion (never part of the mask);
* vignetting (darker corners) and a per-image exposure gain (x0.72-1.18), then the per-site
  acquisition shift and sensor noise.

A simple threshold on one channel does not separate lesion from skin (dark skin tones,
light lesions, hair and vignetting overlap), but the lesions stay visibly distinct, so a
small UNet learns them in a few epochs.

Per-site domain shift (``site_index``: "site-1" -> 0, ...)
--------------------------------------------------------
=====  ===================  ==========  ========  =======  ===============  =========
index  colour cast (R,G,B)  brightness  contrast  noise σ  lesion radius μ  hair rate
=====  ===================  ==========  ========  =======  ===============  =========
0      1.00, 1.00, 1.00     +0.00       1.00      0.020    0.38             1.5
1      1.08, 0.97, 0.88     +0.05       0.90      0.035    0.30             2.5
2      0.90, 0.98, 1.10     -0.07       1.15      0.050    0.46             1.0
3      1.03, 1.06, 0.94     +0.03       0.80      0.060    0.26             3.0
>=4    drawn uniformly from the ranges spanned above with ``default_rng(index)``
=====  ===================  ==========  ========  =======  ===============  =========

Lesion radius is a fraction of the image half-width (std 0.07, clipped to [0.12, 0.65]).
Brightness/contrast act on [0, 1] intensities: ``(x - 0.5) * contrast + 0.5 + brightness``.
"""

from __future__ import annotations

import numpy as np

from ._fields import grid, smooth_noise

_SKIN_TABLE = [
    # cast(R,G,B),        brightness, contrast, noise, lesion_radius, hair_rate
    ((1.00, 1.00, 1.00), 0.00, 1.00, 0.020, 0.38, 1.5),
    ((1.08, 0.97, 0.88), 0.05, 0.90, 0.035, 0.30, 2.5),
    ((0.90, 0.98, 1.10), -0.07, 1.15, 0.050, 0.46, 1.0),
    ((1.03, 1.06, 0.94), 0.03, 0.80, 0.060, 0.26, 3.0),
]


def skin_domain_shift(index: int) -> dict:
    """Acquisition parameters of site ``index`` (see module docstring table)."""
    if index < len(_SKIN_TABLE):
        cast, bright, contrast, noise, radius, hair = _SKIN_TABLE[index]
    else:
        r = np.random.default_rng(index)
        cast = tuple(float(v) for v in r.uniform([0.90, 0.96, 0.88], [1.08, 1.06, 1.10]))
        bright = float(r.uniform(-0.07, 0.05))
        contrast = float(r.uniform(0.80, 1.15))
        noise = float(r.uniform(0.02, 0.06))
        radius = float(r.uniform(0.26, 0.46))
        hair = float(r.uniform(1.0, 3.0))
    return {
        "colour_cast": [round(float(c), 4) for c in cast],
        "brightness": round(float(bright), 4),
        "contrast": round(float(contrast), 4),
        "noise_sigma": round(float(noise), 4),
        "lesion_radius_mean": round(float(radius), 4),
        "lesion_radius_std": 0.07,
        "hair_rate": round(float(hair), 4),
    }


_LIGHT_SKIN = np.array([0.94, 0.80, 0.72], np.float32)
_DARK_SKIN = np.array([0.76, 0.56, 0.43], np.float32)
_LIGHT_LESION = np.array([0.66, 0.45, 0.34], np.float32)
_DARK_LESION = np.array([0.26, 0.15, 0.11], np.float32)
_BLUE_VEIL = np.array([0.40, 0.42, 0.50], np.float32)
_HAIR = np.array([0.14, 0.10, 0.08], np.float32)


def make_skin_case(rng: np.random.Generator, shape: tuple[int, int], shift: dict):
    """Return ``(image uint8 (H, W, 3), mask uint8 (H, W) in {0, 255})``."""
    h, w = shape
    yy, xx = grid(shape)  # (H,1), (1,W); min dimension spans [-1, 1]

    # ---- skin -------------------------------------------------------------------------
    tone = rng.uniform(0.0, 1.0)
    skin_col = (1 - tone) * _LIGHT_SKIN + tone * _DARK_SKIN
    blotch = smooth_noise(rng, shape, cells=4)
    grain = smooth_noise(rng, shape, cells=24)
    skin = skin_col[None, None, :] * (1.0 + 0.045 * blotch[..., None] + 0.02 * grain[..., None])
    skin = skin + 0.012 * rng.standard_normal((h, w, 1)).astype(np.float32)
    # faint redness (vascular) variation in the red channel
    skin[..., 0] += 0.02 * smooth_noise(rng, shape, cells=6)

    # ---- lesion level set -------------------------------------------------------------
    r_mean, r_std = shift["lesion_radius_mean"], shift["lesion_radius_std"]
    r0 = float(np.clip(rng.normal(r_mean, r_std), 0.12, 0.65))
    c0 = rng.uniform(-0.22, 0.22, size=2)
    n_lobes = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    level = np.full(shape, -np.inf, np.float32)
    for lobe in range(n_lobes):
        if lobe == 0:
            c, r, ecc = c0, r0, rng.uniform(0.75, 1.0)
        else:
            ang = rng.uniform(0, 2 * np.pi)
            c = c0 + 0.65 * r0 * np.array([np.sin(ang), np.cos(ang)])
            r, ecc = r0 * rng.uniform(0.45, 0.75), rng.uniform(0.7, 1.0)
        rot = rng.uniform(0, np.pi)
        dy, dx = yy - c[0], xx - c[1]
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = (-dx * np.sin(rot) + dy * np.cos(rot)) / ecc
        rho = np.sqrt(u * u + v * v) + 1e-6
        theta = np.arctan2(v, u)
        boundary = np.ones_like(theta)
        for k in range(2, 8):
            a = rng.normal(0.0, 0.11 / k**0.7)
            boundary = boundary + a * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        boundary = np.maximum(boundary, 0.35) * r
        level = np.maximum(level, 1.0 - rho / boundary)
    level = level + 0.07 * smooth_noise(rng, shape, cells=10)
    mask = level > 0.0

    # ---- lesion colour ------------------------------------------------------------------
    depth = np.clip(level / 0.55, 0.0, 1.0)[..., None]  # 0 at border, 1 in the core
    lightness = rng.uniform(0.0, 0.75)  # 0: dark lesion, 0.75: light low-contrast lesion
    outer = (1 - lightness) * _LIGHT_LESION + lightness * (0.5 * _LIGHT_LESION + 0.5 * skin_col)
    core = (1 - 0.6 * lightness) * _DARK_LESION + 0.6 * lightness * _LIGHT_LESION
    lesion = outer[None, None] * (1 - depth) + core[None, None] * depth
    lesion = lesion * (1.0 + 0.08 * smooth_noise(rng, shape, cells=8)[..., None])
    if rng.uniform() < 0.5:  # blue-grey veil
        veil = np.clip((smooth_noise(rng, shape, cells=5) - 0.6) * 2.0, 0, 0.55)
        veil = (veil * (depth[..., 0] > 0.25))[..., None]
        lesion = lesion * (1 - veil) + _BLUE_VEIL[None, None] * veil
    if rng.uniform() < 0.5:  # dark globules
        glob = (smooth_noise(rng, shape, cells=28) > 1.6) & (depth[..., 0] > 0.15)
        lesion = np.where(glob[..., None], lesion * 0.55, lesion)
    f = rng.uniform(14, 26)
    ret = 0.5 * (np.sin(f * xx * np.pi) + np.sin(f * yy * np.pi))
    lesion = lesion * (1.0 - 0.05 * ret[..., None])
    edge = rng.uniform(0.04, 0.12)  # fuzzy border width (in level units)
    alpha = np.clip(level / edge + 0.5, 0.0, 1.0)[..., None]
    img = skin * (1 - alpha) + lesion * alpha

    # ---- hair ---------------------------------------------------------------------------
    n_hair = int(min(rng.poisson(shift["hair_rate"]), 6))
    for _ in range(n_hair):
        p0 = rng.uniform(-0.9, 0.9, size=2)
        ang = rng.uniform(0, np.pi)
        t = (xx - p0[1]) * np.cos(ang) + (yy - p0[0]) * np.sin(ang)
        n = -(xx - p0[1]) * np.sin(ang) + (yy - p0[0]) * np.cos(ang)
        bend = rng.uniform(0.0, 0.12) * np.sin(rng.uniform(1.0, 4.0) * t + rng.uniform(0, 6.3))
        dist = np.abs(n - bend)
        width = rng.uniform(0.6, 1.4) * (2.0 / min(shape))
        length = rng.uniform(0.6, 2.8)
        a_h = np.exp(-((dist / width) ** 2)) * (np.abs(t) < length / 2) * rng.uniform(0.6, 0.9)
        img = img * (1 - a_h[..., None]) + _HAIR[None, None] * a_h[..., None]

    # ---- optics + site acquisition shift -------------------------------------------------
    rr2 = (xx**2 + yy**2) / float(np.max(xx**2) + np.max(yy**2))
    img = img * (1.0 - rng.uniform(0.1, 0.45) * rr2)[..., None]
    img = img * rng.uniform(0.72, 1.18)  # per-image exposure: defeats one global threshold
    img = (img - 0.5) * shift["contrast"] + 0.5 + shift["brightness"]
    img = img * np.asarray(shift["colour_cast"], np.float32)[None, None]
    img = img + shift["noise_sigma"] * rng.standard_normal(img.shape).astype(np.float32)
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return image, (mask.astype(np.uint8) * 255)
