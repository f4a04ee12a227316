"""The privacy metadata a site attaches to each released update (moved from flare/privacy_meta.py).

One place defines the key and the fields, so the site filter and the server widget agree.
Raw update norms never appear here: ``clip_norm`` is the public sensitivity bound.
"""

from __future__ import annotations

import math
from typing import Any, Dict

PRIVACY_META_KEY = "adpfl_privacy"
#: record-level (DP-SGD) accounting a site attaches to a result trained with DP-SGD
RECORD_PRIVACY_META_KEY = "adpfl_record_privacy"
RECORD_REQUIRED_FIELDS = ("unit", "mechanism", "delta", "noise_multiplier", "sample_rate", "max_grad_norm",
                          "steps_per_round", "round", "history", "epsilon_rdp")

REQUIRED_FIELDS = (
    "mechanism",
    "noise_multiplier",
    "noise_std",
    "clip_norm",
    "keep_fraction",
    "mask_policy",
    "mask_covered",
    "delta",
    "round",
    "epsilon_rdp",
)
FORBIDDEN_FIELDS = ("norm", "pre_clip_norm", "raw_norm", "update_norm", "indicator")


def check_privacy_meta(meta: Any, delta: float, min_noise_multiplier: float = 0.0) -> Dict[str, Any]:
    """Validate a contribution's privacy metadata; returns it or raises ValueError (why)."""
    if not isinstance(meta, dict):
        raise ValueError("no privacy metadata attached (a private job accepts only noised releases)")
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"privacy metadata lacks {missing}")
    leaked = [k for k in meta if k in FORBIDDEN_FIELDS]
    if leaked:
        raise ValueError(f"privacy metadata carries private values {leaked}")
    if meta["mechanism"] not in ("gaussian", "laplace"):
        raise ValueError(f"unknown mechanism {meta['mechanism']!r}")
    for k in ("noise_multiplier", "noise_std", "clip_norm", "keep_fraction", "delta"):
        v = meta[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"privacy metadata field {k}={v!r} is not a positive finite number")
    if not 0 < meta["keep_fraction"] <= 1:
        raise ValueError(f"keep_fraction={meta['keep_fraction']} outside (0, 1]")
    if abs(float(meta["delta"]) - float(delta)) > 1e-15:
        raise ValueError(f"site accounted delta={meta['delta']}, the job's delta is {delta}")
    if meta["noise_multiplier"] < min_noise_multiplier:
        raise ValueError(
            f"claims noise_multiplier={meta['noise_multiplier']:.4g} below the job's policy minimum "
            f"{min_noise_multiplier:.4g}"
        )
    if meta["mechanism"] == "gaussian":
        # std must match z * sensitivity (2 * C) for the update's own noise multiplier
        z_u = float(meta.get("update_noise_multiplier", meta["noise_multiplier"]))
        expected = z_u * 2.0 * float(meta["clip_norm"])
        if not math.isclose(float(meta["noise_std"]), expected, rel_tol=1e-4):
            raise ValueError(
                f"noise_std={meta['noise_std']:.6g} does not equal update_noise_multiplier * 2 * clip_norm "
                f"= {expected:.6g}"
            )
    return meta


def check_record_meta(meta: Any, delta: float) -> Dict[str, Any]:
    """Validate a DP-SGD result's record-level metadata; returns it with
    ``epsilon_recomputed`` (Opacus RDP over the reported history, the figure the server
    uses instead of the site's claim) or raises ValueError (why)."""
    from .record import opacus_rdp_epsilon

    if not isinstance(meta, dict):
        raise ValueError("no record-level (DP-SGD) privacy metadata attached")
    missing = [k for k in RECORD_REQUIRED_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"record-level privacy metadata lacks {missing}")
    if meta["unit"] != "record" or meta["mechanism"] != "dpsgd":
        raise ValueError(f"record-level metadata names unit={meta['unit']!r}, mechanism={meta['mechanism']!r}")
    for k in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
        v = meta[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"record-level metadata field {k}={v!r} is not a positive finite number")
    if abs(float(meta["delta"]) - float(delta)) > 1e-15:
        raise ValueError(f"site accounted record-level delta={meta['delta']}, the job's is {delta}")
    hist = meta["history"]
    if not isinstance(hist, list) or not hist:
        raise ValueError("record-level history is empty: a DP-SGD result must account its steps")
    clean = []
    for i, h in enumerate(hist):
        try:
            z, q, n = float(h[0]), float(h[1]), int(h[2])
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"record-level history entry {i} is not [z, q, steps]: {h!r}") from None
        if not (z > 0 and math.isfinite(z) and 0 < q <= 1 and n >= 0):
            raise ValueError(f"record-level history entry {i} has invalid (z, q, steps) = ({z}, {q}, {n})")
        clean.append((z, q, n))
    out = dict(meta)
    out["epsilon_recomputed"] = opacus_rdp_epsilon(clean, float(delta))
    return out
