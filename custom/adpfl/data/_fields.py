"""Small vectorised random-field helpers used by the synthetic generators (private)."""

from __future__ import annotations

import numpy as np


def _bspline_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells + 3) matrix of cubic B-spline weights mapping coarse nodes to a fine axis."""
    t = np.linspace(1.0, cells + 1.0, size, dtype=np.float64)[:, None]
    d = np.abs(t - np.arange(cells + 3, dtype=np.float64)[None, :])
    w = np.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape, cells: int = 6) -> np.ndarray:
    """Smooth zero-mean, ~unit-std random field of ``shape`` (float32).

    A coarse grid of ``cells + 3`` Gaussian values per axis is expanded with separable
    cubic B-spline weights (one small matrix product per axis), which is far cheaper than
    Gaussian-filtering full-resolution white noise.
    """
    shape = tuple(int(s) for s in shape)
    out = rng.standard_normal(tuple(cells + 3 for _ in shape)).astype(np.float32)
    for ax, s in enumerate(shape):
        m = _bspline_matrix(s, cells)
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [ax])), 0, ax)
    std = float(out.std())
    return (out - out.mean()) / (std if std > 1e-6 else 1.0)


def grid(shape, aspect_equal: bool = True) -> list[np.ndarray]:
    """Open (broadcastable) coordinate arrays in [-1, 1] per axis (float32)."""
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    out = []
    ref = min(shape) if aspect_equal else None
    for ax, s in enumerate(shape):
        c = np.linspace(-1.0, 1.0, s, dtype=np.float32)
        if ref is not None:
            c = c * (s / ref)
        sh = [1] * n
        sh[ax] = s
        out.append(c.reshape(sh))
    return out


def blob_level(
    coords: list[np.ndarray],
    center,
    radii,
    roughness: float = 0.0,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Implicit 'inside-ness' of an irregular ellipsoid: 1 at centre, 0 on the surface, <0 outside.

    ``noise`` (a smooth field broadcastable to the grid) scaled by ``roughness`` perturbs the
    surface so that blobs have irregular borders.
    """
    r2 = 0.0
    for c, m, r in zip(coords, center, radii):
        r2 = r2 + ((c - m) / r) ** 2
    level = 1.0 - np.sqrt(r2)
    if noise is not None and roughness:
        level = level + roughness * noise
    return level.astype(np.float32)
