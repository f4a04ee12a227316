"""The privacy metadata a site attaches to each released update (moved from flare/privacy_meta.py).

One place defines the key and the fields, so the site filter and the server widget agree.
Raw update norms never appear here: ``clip_norm`` is the public sensitivity bound.
"""

from __future__ import annotations

import math
from typing import Any

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
#: fields an update-level release may carry besides the required ones (anything else is refused:
#: an unknown field is either a leak or a release from code the server does not understand)
OPTIONAL_FIELDS = (
    "update_noise_multiplier",
    "sensitivity",
    "kept_coordinates",
    "epsilon_prv",
    "target_epsilon",
    "accountant",
    "job_id",
    "seeded",
    "sensitivity_convention",
)
#: fields only a Laplace release carries; in a Gaussian release they contradict the mechanism
LAPLACE_FIELDS = ("noise_scale", "epsilon_round")
RECORD_OPTIONAL_FIELDS = ("target_epsilon", "keep_fraction", "gradient_noise_multiplier", "clip_count_noise")
#: record-level mechanisms: DP-SGD, and ADP-SGD (adaptive clip + noise schedule; privacy/record_adaptive.py)
RECORD_MECHANISMS = ("dpsgd", "adpsgd")
#: the mask policy a release names when it keeps every coordinate
NO_MASK = "none"
#: relative tolerance for fields that must agree (float round-off of one computation)
_AGREE = 1e-6


def check_privacy_meta(meta: Any, delta: float, min_noise_multiplier: float = 0.0,
                       noise_type: str | None = None) -> dict[str, Any]:
    """Validate a contribution's privacy metadata; returns it or raises ValueError (why).
    ``noise_type``: the job's mechanism, which the release must use (None: either)."""
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
    if noise_type is not None and meta["mechanism"] != noise_type:
        raise ValueError(f"released with {meta['mechanism']}, the job's noise_type is {noise_type}")
    allowed = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    if meta["mechanism"] == "laplace":
        allowed |= set(LAPLACE_FIELDS)
        missing = [k for k in LAPLACE_FIELDS if k not in meta]
        if missing:
            raise ValueError(f"Laplace privacy metadata lacks {missing}")
    unknown = sorted(k for k in meta if k not in allowed)
    if unknown:
        raise ValueError(f"privacy metadata has fields unknown for a {meta['mechanism']} release: {unknown}")
    _check_update_consistency(meta)
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


def _positive_number(meta: dict[str, Any], key: str, what: str = "privacy metadata") -> float:
    v = meta[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} field {key}={v!r} is not a positive finite number")
    return float(v)


def _check_update_consistency(meta: dict[str, Any]) -> None:
    """Fields that are functions of each other must agree (a release that contradicts itself
    is refused rather than accounted by whichever field the server happens to read)."""
    from .mechanisms import MASK_POLICIES, mask_is_covered

    policies = (NO_MASK,) + tuple(MASK_POLICIES)
    if meta["mask_policy"] not in policies:
        raise ValueError(f"unknown mask_policy {meta['mask_policy']!r} (known: {policies})")
    if meta["mask_covered"] is not mask_is_covered(meta["mask_policy"]):
        raise ValueError(f"mask_covered={meta['mask_covered']!r} contradicts mask_policy={meta['mask_policy']!r}")
    if (meta["mask_policy"] == NO_MASK) != (float(meta["keep_fraction"]) == 1.0):
        raise ValueError(f"mask_policy={meta['mask_policy']!r} contradicts keep_fraction={meta['keep_fraction']}")
    r = meta["round"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"privacy metadata round={r!r} is not a round number")
    clip = _positive_number(meta, "clip_norm")
    if "sensitivity" in meta and not math.isclose(_positive_number(meta, "sensitivity"), 2.0 * clip, rel_tol=_AGREE):
        raise ValueError(f"sensitivity={meta['sensitivity']} contradicts 2 * clip_norm = {2.0 * clip}")
    if "update_noise_multiplier" in meta:
        z_u = _positive_number(meta, "update_noise_multiplier")
        # the effective multiplier composes the update's noise with the clip indicator's: never larger
        if _positive_number(meta, "noise_multiplier") > z_u * (1 + _AGREE):
            raise ValueError(f"noise_multiplier={meta['noise_multiplier']} exceeds update_noise_multiplier={z_u}")
    if "kept_coordinates" in meta:
        k = meta["kept_coordinates"]
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"kept_coordinates={k!r} is not a positive count")
    if "accountant" in meta and meta["accountant"] not in ("rdp", "prv"):
        raise ValueError(f"unknown accountant {meta['accountant']!r}")
    if "seeded" in meta and not isinstance(meta["seeded"], bool):
        raise ValueError(f"seeded={meta['seeded']!r} is not true/false")
    if meta["mechanism"] == "laplace":
        scale = _positive_number(meta, "noise_scale")
        z_u = float(meta.get("update_noise_multiplier", meta["noise_multiplier"]))
        if not math.isclose(scale, z_u * 2.0 * clip, rel_tol=1e-4):
            raise ValueError(f"noise_scale={scale:.6g} does not equal update_noise_multiplier * 2 * clip_norm")
        if not math.isclose(_positive_number(meta, "noise_std"), scale * math.sqrt(2.0), rel_tol=1e-4):
            raise ValueError(f"noise_std={meta['noise_std']:.6g} contradicts a Laplace scale of {scale:.6g}")
        if not math.isclose(_positive_number(meta, "epsilon_round"), 1.0 / float(meta["noise_multiplier"]),
                            rel_tol=1e-4):
            raise ValueError(f"epsilon_round={meta['epsilon_round']} contradicts 1 / noise_multiplier")


def check_record_meta(meta: Any, delta: float) -> dict[str, Any]:
    """Validate a DP-SGD result's record-level metadata; returns it with
    ``epsilon_recomputed`` (Opacus RDP over the reported history, the figure the server
    uses instead of the site's claim) or raises ValueError (why)."""
    from .record import opacus_rdp_epsilon

    if not isinstance(meta, dict):
        raise ValueError("no record-level (DP-SGD) privacy metadata attached")
    missing = [k for k in RECORD_REQUIRED_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"record-level privacy metadata lacks {missing}")
    if meta["unit"] != "record" or meta["mechanism"] not in RECORD_MECHANISMS:
        raise ValueError(f"record-level metadata names unit={meta['unit']!r}, mechanism={meta['mechanism']!r}")
    unknown = sorted(k for k in meta if k not in set(RECORD_REQUIRED_FIELDS) | set(RECORD_OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"record-level privacy metadata has unknown fields {unknown}")
    for k in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
        v = meta[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"record-level metadata field {k}={v!r} is not a positive finite number")
    if abs(float(meta["delta"]) - float(delta)) > 1e-15:
        raise ValueError(f"site accounted record-level delta={meta['delta']}, the job's is {delta}")
    _check_record_split(meta)
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
    z_meta, q_meta = float(meta["noise_multiplier"]), float(meta["sample_rate"])
    if not any(math.isclose(z, z_meta, rel_tol=_AGREE) and math.isclose(q, q_meta, rel_tol=_AGREE)
               for z, q, n in clean if n > 0):
        # this round's steps are in the history (other jobs' rounds on the same data may follow them)
        raise ValueError(
            f"record-level metadata (z={z_meta}, q={q_meta}) contradicts its history: no entry has those "
            "steps"
        )
    out = dict(meta)
    out["epsilon_recomputed"] = opacus_rdp_epsilon(clean, float(delta))
    claimed = meta["epsilon_rdp"]
    if not isinstance(claimed, (int, float)) or isinstance(claimed, bool) or not math.isfinite(claimed):
        raise ValueError(f"record-level epsilon_rdp={claimed!r} is not a finite number")
    if not math.isclose(float(claimed), out["epsilon_recomputed"], rel_tol=_AGREE, abs_tol=1e-9):
        raise ValueError(
            f"record-level epsilon_rdp={claimed} contradicts its own history (Opacus RDP: "
            f"{out['epsilon_recomputed']:.9g})"
        )
    return out


def _check_record_split(meta: dict[str, Any]) -> None:
    """ADP-SGD's effective multiplier must be the composition of its gradient noise and its
    clip count's noise (Andrew et al. 2021, Theorem 1); only ADP-SGD carries the split."""
    from .record_adaptive import effective_noise_multiplier

    split = [k for k in ("gradient_noise_multiplier", "clip_count_noise") if k in meta]
    if split and meta["mechanism"] != "adpsgd":
        raise ValueError(f"record-level metadata of mechanism {meta['mechanism']!r} carries ADP-SGD fields {split}")
    if "keep_fraction" in meta and not (isinstance(meta["keep_fraction"], (int, float))
                                        and 0 < meta["keep_fraction"] <= 1):
        raise ValueError(f"record-level keep_fraction={meta['keep_fraction']!r} outside (0, 1]")
    if "gradient_noise_multiplier" not in meta:
        if "clip_count_noise" in meta:
            raise ValueError("record-level metadata has clip_count_noise but no gradient_noise_multiplier")
        return
    z_g = _positive_number(meta, "gradient_noise_multiplier", "record-level metadata")
    z = _positive_number(meta, "noise_multiplier", "record-level metadata")
    expected = z_g
    if "clip_count_noise" in meta:
        expected = effective_noise_multiplier(z_g, _positive_number(meta, "clip_count_noise", "record-level metadata"))
    if not math.isclose(z, expected, rel_tol=_AGREE):
        raise ValueError(f"record-level noise_multiplier={z} contradicts its gradient noise {z_g} and clip count "
                         f"noise (effective {expected:.9g})")


def public_record_meta(meta: Any) -> dict[str, Any]:
    """The record-level metadata a site may forward with a release: validated by
    :func:`check_record_meta` at its own delta (so unknown or contradictory fields raise
    ValueError) and rebuilt from the schema's fields as plain numbers, strings and lists --
    nothing else a job put under the key travels."""
    if not isinstance(meta, dict):
        raise ValueError("record-level (DP-SGD) privacy metadata is not a mapping")
    checked = check_record_meta(meta, float(meta.get("delta", float("nan"))))
    out: dict[str, Any] = {"unit": "record", "mechanism": checked["mechanism"]}
    for k in ("delta", "noise_multiplier", "sample_rate", "max_grad_norm", "epsilon_rdp"):
        out[k] = float(checked[k])
    out["steps_per_round"] = int(checked["steps_per_round"])
    out["round"] = int(checked["round"])
    out["history"] = [[float(h[0]), float(h[1]), int(h[2])] for h in checked["history"]]
    for k in ("target_epsilon", "keep_fraction", "gradient_noise_multiplier", "clip_count_noise"):
        if checked.get(k) is not None:
            out[k] = float(checked[k])
    return out

