"""Tensor-level mechanisms: flatten, sparsify, clip, noise.

Pure PyTorch, no loops over elements. Everything runs on the device of the tensors it
is given (noise included, with a generator created on that device).

Non-float tensors (for example BatchNorm ``num_batches_tracked``) are **refused** by
:func:`flatten_update` with a ``ValueError`` naming the key: an integer counter cannot
carry Gaussian noise and must not leave the site un-noised, so the caller drops such
entries before calling the privacy pipeline (they are training bookkeeping, not
weights). Float16/bfloat16 entries are computed and released in float32.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

MASK_POLICIES = ("random", "topk_public", "topk_private")

#: ``(device, round_index) -> torch.Generator``: where a release's randomness comes from
GeneratorFactory = Callable[[torch.device, int], torch.Generator]


# --------------------------------------------------------------------- randomness
def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device``.

    ``seed=None`` (production) seeds it with 63 bits from the operating system's
    entropy (``secrets``). An explicit seed is for tests only.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return gen


def seeded_generators(seed: int) -> GeneratorFactory:
    """A generator factory with fixed noise, one stream per round, for tests and
    reproducible experiments only (fixed noise is not private). Inject it into
    :class:`adpfl.privacy.pipeline.PrivacyPipeline`; no job setting reaches it."""
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")

    def factory(device: torch.device, round_index: int) -> torch.Generator:
        return make_generator(device, (int(seed) * 1_000_003 + int(round_index)) % (2**63))

    return factory


# --------------------------------------------------------------- flatten/unflatten
@dataclass(frozen=True)
class FlatSpec:
    """Layout of a flattened update: key order, shapes, dtypes and offsets."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(sum(self.numels))

    def key_at(self, flat_index: int) -> str:
        """The key that owns flat coordinate ``flat_index``."""
        offset = 0
        for key, n in zip(self.keys, self.numels):
            if flat_index < offset + n:
                return key
            offset += n
        raise IndexError(flat_index)


def release_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for computation/release of a float tensor: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def flatten_update(update: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, FlatSpec]:
    """Concatenate a ``{name: tensor}`` update into one 1-D float tensor.

    The flat tensor is float64 if any entry is float64, else float32. All tensors must
    be floating point and on one device; otherwise ``ValueError`` naming the key.
    """
    if not update:
        raise ValueError("the update is empty: nothing to release")
    keys, shapes, dtypes, numels, parts = [], [], [], [], []
    device = None
    for key, value in update.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"update entry {key!r} is not a torch.Tensor (got {type(value).__name__})")
        if not value.is_floating_point():
            raise ValueError(
                f"update entry {key!r} has non-float dtype {value.dtype}; integer/bool tensors "
                "(e.g. BatchNorm num_batches_tracked) cannot be noised and must be dropped "
                "from the update before the privacy pipeline"
            )
        if device is None:
            device = value.device
        elif value.device != device:
            raise ValueError(f"update entry {key!r} is on {value.device}, others on {device}")
        keys.append(str(key))
        shapes.append(tuple(value.shape))
        dtypes.append(value.dtype)
        numels.append(value.numel())
        parts.append(value.detach().reshape(-1))
    compute = torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32
    flat = torch.cat([p.to(compute) for p in parts]) if len(parts) > 1 else parts[0].to(compute).clone()
    return flat, FlatSpec(tuple(keys), tuple(shapes), tuple(dtypes), tuple(numels))


def unflatten_update(flat: torch.Tensor, spec: FlatSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_update`; each entry in :func:`release_dtype` of its
    original dtype (float32 for half types, else the original dtype)."""
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"flat tensor has {flat.numel()} elements, spec expects {spec.numel}")
    out: dict[str, torch.Tensor] = {}
    for key, shape, dtype, chunk in zip(spec.keys, spec.shapes, spec.dtypes, torch.split(flat, list(spec.numels))):
        out[key] = chunk.reshape(shape).to(release_dtype(dtype))
    return out


def first_nonfinite_key(flat: torch.Tensor, spec: FlatSpec) -> str | None:
    """Name of the first entry that holds a NaN/Inf, or None.

    Fast path: the L2 norm is finite iff every value is finite (barring overflow of
    the norm itself, reported as the key holding the largest magnitude)."""
    if bool(torch.isfinite(torch.linalg.vector_norm(flat))):
        return None
    bad = ~torch.isfinite(flat)
    if bool(bad.any()):
        return spec.key_at(int(bad.nonzero()[0, 0]))
    return spec.key_at(int(flat.abs().argmax()))


# --------------------------------------------------------------------- sparsify
def keep_count(numel: int, keep_fraction: float) -> int:
    """Exactly ``k = max(1, round(keep_fraction * numel))`` coordinates are kept."""
    if not (0.0 < keep_fraction <= 1.0):
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    return min(numel, max(1, int(round(keep_fraction * numel))))


def _random_k_mask(numel: int, k: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniformly random k-subset from fresh randomness: the k smallest of i.i.d.
    uniforms, independent of the update.

    The k-th smallest is found in a narrow band around k/n (a few binomial standard
    deviations), so only a few thousand values are ranked; ties at the threshold
    (float32 uniforms have 2^-24 resolution) are broken by position, and an exact
    ``topk`` fallback covers a band miss. Neither affects independence from the data.
    """
    if k >= numel:
        return torch.ones(numel, dtype=torch.bool, device=device)
    u = torch.rand(numel, generator=generator, device=device, dtype=torch.float32)
    p = k / numel
    margin = 6.0 * math.sqrt(p * (1.0 - p) / numel) + 16.0 / numel + 2.0**-22
    lo, hi = p - margin, p + margin
    below = int(torch.count_nonzero(u < lo))
    need = k - below
    band = u[(u >= lo) & (u < hi)]
    if 1 <= need <= band.numel():
        threshold = torch.kthvalue(band, need).values
        mask = u <= threshold
        extra = int(torch.count_nonzero(mask)) - k
        if extra > 0:  # ties at the threshold: drop the last ones by position
            ties = (u == threshold).nonzero().squeeze(1)
            mask[ties[ties.numel() - extra :]] = False
        return mask
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[torch.topk(u, k, largest=False, sorted=False).indices] = True
    return mask


def _topk_abs_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest |values| (exactly k).

    A full ``topk`` over millions of scores costs ~200 ms on a CPU core, most of a release.
    Instead: bracket the k-th largest with quantiles of a strided sample (every layer is
    sampled in proportion), take everything above the bracket, and run ``topk`` only inside
    the bracket (a few percent of the values). A missed bracket falls back to the exact full
    ``topk``. Either way the result is exactly the top-k set (ties broken arbitrarily, which
    is harmless: the scores are public or the opt-out's).
    """
    flat = values.reshape(-1).abs()
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        mask[:] = True
        return mask
    if n >= 200_000:
        sample = flat[:: max(1, n // 65536)].float()
        q = 1.0 - k / n
        t_lo, t_hi = torch.quantile(sample, torch.tensor([max(0.0, q - 0.02), min(1.0, q + 0.02)], device=flat.device))
        above = flat > t_hi
        have = int(torch.count_nonzero(above))
        if have <= k:
            band = ((flat >= t_lo) & ~above).nonzero().squeeze(1)
            need = k - have
            if need <= band.numel():
                mask = above
                if need:
                    mask[band[torch.topk(flat[band], need, sorted=False).indices]] = True
                return mask
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask


def sparsify_mask(
    numel: int,
    keep_fraction: float,
    policy: str,
    generator: torch.Generator,
    public_scores: torch.Tensor | None = None,
    private_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask with exactly ``max(1, round(keep_fraction * numel))`` True entries.

    * ``"random"``: random-k from the generator only (independent of the update).
    * ``"topk_public"``: top-k of ``|public_scores|`` (public information, e.g. the last
      global model change); ``ValueError`` if missing.
    * ``"topk_private"``: top-k of ``|private_values|`` (the update itself). The mask
      then depends on private data and its cost is NOT accounted: callers must flag
      the release ``mask_covered=False`` (see :func:`mask_is_covered`).
    """
    k = keep_count(numel, keep_fraction)
    device = generator.device
    if policy == "random":
        return _random_k_mask(numel, k, generator, device)
    if policy == "topk_public":
        if public_scores is None:
            raise ValueError("mask_policy='topk_public' needs public_scores (e.g. the last global model change)")
        if public_scores.numel() != numel:
            raise ValueError(f"public_scores has {public_scores.numel()} elements, expected {numel}")
        return _topk_abs_mask(public_scores, k)
    if policy == "topk_private":
        if private_values is None:
            raise ValueError("mask_policy='topk_private' needs private_values")
        if private_values.numel() != numel:
            raise ValueError(f"private_values has {private_values.numel()} elements, expected {numel}")
        return _topk_abs_mask(private_values, k)
    raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {policy!r}")


def mask_is_covered(policy: str) -> bool:
    """Whether the mask's privacy cost is covered by the accounting (False only for topk_private)."""
    return policy != "topk_private"


# ------------------------------------------------------------------------ clip
def clip_l2(flat: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``flat`` so its L2 norm is at most ``clip_norm``.

    Returns ``(clipped, pre_clip_norm)``; the norm is a 0-dim tensor on the same device
    (no host sync). Pass only the kept coordinates.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    norm = torch.linalg.vector_norm(flat, ord=2)
    scale = torch.clamp(clip_norm / torch.clamp(norm, min=1e-30), max=1.0)
    return flat * scale, norm


def clip_l1(flat: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`clip_l2` with the L1 norm (for the Laplace mechanism)."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    norm = torch.linalg.vector_norm(flat, ord=1)
    scale = torch.clamp(clip_norm / torch.clamp(norm, min=1e-30), max=1.0)
    return flat * scale, norm


# ----------------------------------------------------------------------- noise
# Float-safe noise (issue 12). ``torch.randn`` in float32 is Box-Muller on 24-bit uniforms:
# its radius sqrt(-2 ln u) never exceeds sqrt(2 * 24 ln 2) ~ 5.768, so no coordinate is ever
# beyond ~5.77 standard deviations, where a true Gaussian puts mass 8e-9 per coordinate.
# Over millions of coordinates and many rounds, an observer who sees a coordinate beyond
# that support learns with certainty that it is not "neighbour + float32 noise", and the
# stated delta is no longer true. Every release path therefore draws its noise in float64
# on the tensor's own device, adds it to the float64 value, and rounds the SUM once to the
# wire dtype (float32 for float32/half updates).
#
# What floating-point exposure remains (documented, not claimed away):
# * float64 Box-Muller (CPU and CUDA) uses 53-bit uniforms: its support ends near 8.5
#   standard deviations (mass beyond ~1e-17 per coordinate), far below any delta used here;
# * float64 samples lie on a grid, so Mironov-style attacks on floating-point samplers
#   (Mironov 2012; Jin et al. 2022, arXiv:2112.05307) -- telling neighbouring inputs apart
#   from the low-order bits of ``x + noise`` -- are not excluded in principle; rounding the
#   sum to float32 discards 29 of those bits, which makes such attacks harder but is not a
#   proof (the rounding is post-processing of the float64 noisy value, so it never weakens
#   the float64 mechanism's guarantee). Opacus' ``secure_mode`` (sum of several draws) and
#   a discrete Gaussian would close more of this; they are not used here.


def gaussian_noised(
    values: torch.Tensor, std: float, generator: torch.Generator, out_dtype: torch.dtype
) -> torch.Tensor:
    """``values + N(0, std^2)`` per coordinate: noise drawn in float64 on ``values``' device
    from ``generator``, added in float64, the sum rounded once to ``out_dtype``."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    noise = torch.randn(values.shape, generator=generator, device=values.device, dtype=torch.float64)
    return noise.mul_(float(std)).add_(values.to(torch.float64)).to(out_dtype)


def laplace_noised(
    values: torch.Tensor, scale: float, generator: torch.Generator, out_dtype: torch.dtype
) -> torch.Tensor:
    """``values + Laplace(0, scale)`` per coordinate (difference of two float64
    exponentials on ``values``' device), added in float64, rounded once to ``out_dtype``."""
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"laplace scale must be finite and >= 0, got {scale}")
    e1 = torch.empty(values.shape, device=values.device, dtype=torch.float64).exponential_(generator=generator)
    e2 = torch.empty(values.shape, device=values.device, dtype=torch.float64).exponential_(generator=generator)
    return e1.sub_(e2).mul_(float(scale)).add_(values.to(torch.float64)).to(out_dtype)


def _noise_dtype(flat: torch.Tensor) -> torch.dtype:
    return torch.float64 if flat.dtype == torch.float64 else torch.float32


def add_gaussian_noise(flat: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """New tensor ``flat + N(0, std^2)`` per coordinate (float32 at least), float-safe
    (see :func:`gaussian_noised`)."""
    return gaussian_noised(flat, std, generator, _noise_dtype(flat))


def add_laplace_noise(flat: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """New tensor ``flat + Laplace(0, scale)`` per coordinate (float32 at least), float-safe
    (see :func:`laplace_noised`)."""
    return laplace_noised(flat, scale, generator, _noise_dtype(flat))


__all__ = [
    "MASK_POLICIES",
    "FlatSpec",
    "GeneratorFactory",
    "add_gaussian_noise",
    "add_laplace_noise",
    "clip_l1",
    "clip_l2",
    "first_nonfinite_key",
    "flatten_update",
    "gaussian_noised",
    "keep_count",
    "laplace_noised",
    "make_generator",
    "mask_is_covered",
    "release_dtype",
    "seeded_generators",
    "sparsify_mask",
    "unflatten_update",
]
