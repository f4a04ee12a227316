"""Sparse wire format of a private release, and the server filter that densifies it.

With ``keep_fraction`` p < 1 a site releases only the kept coordinates. Instead of a dense
array with zeros, its ``WEIGHT_DIFF`` DXO then carries one entry::

    {"__adpfl_sparse__": {
        "format": "adpfl-sparse-v1",
        "keys": [...], "shapes": [[...], ...], "dtypes": ["float32", ...],
        "numel": N,                      # total coordinates of the update
        "count": K,                      # kept coordinates (= privacy meta kept_coordinates)
        "values": float32[K],            # kept values, in increasing flat-index order
        "index_coding": "bitmask" | "gaps_varint" | "indices",
        "index_data": uint8[...] | int32/int64[K],
    }}

Flat indices run over the keys in order (each key's array flattened C-style). The kept
set is encoded in whichever of three codings is smallest:

- ``bitmask``: ``np.packbits`` of the N-bit keep mask (N/8 bytes; best for p >~ 0.15),
- ``gaps_varint``: the gaps between consecutive kept indices (first index, then
  ``idx[i] - idx[i-1] - 1``) as LEB128 varints (about 1 byte per kept coordinate for a
  random mask with p >~ 0.01),
- ``indices``: plain int32 (int64 when N >= 2**31) flat indices.

The first two encode strictly increasing indices by construction; all three are checked on
decode (range, uniqueness/order, count). Numpy arrays travel through FLARE's own numpy
decomposer; nothing here needs pickling.

:class:`SparseDensifyFilter` is a server-side task-result filter: FLARE's ServerRunner runs
task-result filters before it hands the result to the controller, so the aggregator and the
privacy widget (``BEFORE_CONTRIBUTION_ACCEPT``, fired by ScatterAndGather) see a dense
update with the DXO meta (privacy metadata included) untouched. A malformed sparse payload
is rejected: the result is replaced by a ``BAD_TASK_DATA`` reply carrying no data, which the
controller disregards (``ignore_result_error``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from nvflare.apis.filter import Filter

SPARSE_KEY = "__adpfl_sparse__"
FORMAT = "adpfl-sparse-v1"
INDEX_CODINGS = ("bitmask", "gaps_varint", "indices")
_ALLOWED_DTYPES = ("float16", "bfloat16", "float32", "float64")
_MAX_VARINT_BYTES = 10  # enough for any uint64


class SparsePayloadError(ValueError):
    """A sparse payload that does not decode to a valid update."""


# ---------------------------------------------------------------------------- varints
def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 encoding of non-negative integers (vectorised); returns uint8 bytes."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    nbytes = np.ones(v.shape, dtype=np.int64)
    for j in range(1, _MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1) << np.uint64(7 * j)
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        chunk = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (chunk | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`; raises SparsePayloadError on truncated/overlong input."""
    b = np.asarray(data)
    if b.dtype != np.uint8 or b.ndim != 1:
        raise SparsePayloadError(f"varint data must be a 1-D uint8 array, got {b.dtype} {b.shape}")
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    end = (b & 0x80) == 0
    if not end[-1]:
        raise SparsePayloadError("varint data is truncated (last byte has the continuation bit)")
    group = np.concatenate(([0], np.cumsum(end)[:-1]))
    n = int(end.sum())
    first = np.flatnonzero(np.concatenate(([True], end[:-1])))
    pos = np.arange(b.size) - first[group]
    if pos.max() >= _MAX_VARINT_BYTES:
        raise SparsePayloadError("varint longer than 10 bytes")
    out = np.zeros(n, dtype=np.uint64)
    for j in range(int(pos.max()) + 1):
        sel = pos == j
        out[group[sel]] |= (b[sel] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


# ---------------------------------------------------------------------------- encode
def _index_dtype(numel: int):
    return np.int32 if numel < 2**31 else np.int64


def encode_indices(indices: np.ndarray, numel: int, coding: str = "auto") -> tuple[str, np.ndarray]:
    """Encode sorted unique flat ``indices`` of an update with ``numel`` coordinates."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    candidates = {}
    bitmask_bytes = (numel + 7) // 8
    # varints take >= 1 byte and plain indices 4 bytes per index: skip them when they cannot win
    if coding == "auto" and idx.size >= bitmask_bytes:
        coding = "bitmask"
    if coding in ("auto", "indices") and not (coding == "auto" and 4 * idx.size >= bitmask_bytes):
        candidates["indices"] = idx.astype(_index_dtype(numel))
    if coding in ("auto", "bitmask"):
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        candidates["bitmask"] = np.packbits(mask)
    if coding in ("auto", "gaps_varint"):
        gaps = np.diff(idx, prepend=-1) - 1 if idx.size else idx
        if idx.size and gaps.min() < 0:
            raise ValueError("indices must be strictly increasing")
        candidates["gaps_varint"] = varint_encode(gaps)
    if not candidates:
        raise ValueError(f"index coding must be auto or one of {INDEX_CODINGS}, got {coding!r}")
    name = min(candidates, key=lambda k: candidates[k].nbytes)
    return name, candidates[name]


def encode_sparse(
    indices: np.ndarray,
    values: np.ndarray,
    keys: Sequence[str],
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[str] | None = None,
    coding: str = "auto",
) -> dict:
    """The DXO data of a sparse release (see module docstring)."""
    shapes = [[int(d) for d in s] for s in shapes]
    numel = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    vals = np.asarray(values).reshape(-1)
    if idx.size != vals.size:
        raise ValueError(f"{idx.size} indices but {vals.size} values")
    if idx.size and (idx[0] < 0 or idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
        raise ValueError("indices must be strictly increasing and within the update")
    name, data = encode_indices(idx, numel, coding)
    if dtypes is None:
        dtypes = [str(vals.dtype)] * len(keys)
    return {
        SPARSE_KEY: {
            "format": FORMAT,
            "keys": [str(k) for k in keys],
            "shapes": shapes,
            "dtypes": [str(d) for d in dtypes],
            "numel": numel,
            "count": int(idx.size),
            "values": np.ascontiguousarray(vals),
            "index_coding": name,
            "index_data": data,
        }
    }


def encode_release(sparse_release, coding: str = "auto") -> dict:
    """DXO data of an :class:`adpfl.privacy.pipeline.SparseRelease` (torch tensors)."""
    spec = sparse_release.spec
    idx = sparse_release.indices.detach().to("cpu").numpy()
    vals = sparse_release.values.detach().to("cpu").numpy()
    dtypes = [str(d).replace("torch.", "") for d in spec.dtypes]
    return encode_sparse(idx, vals, spec.keys, spec.shapes, dtypes, coding)


def is_sparse(data) -> bool:
    return isinstance(data, Mapping) and SPARSE_KEY in data


# ---------------------------------------------------------------------------- decode
def decode_indices(coding: str, data, numel: int, count: int) -> np.ndarray:
    arr = np.asarray(data)
    if coding == "bitmask":
        if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != (numel + 7) // 8:
            raise SparsePayloadError(f"bitmask must be uint8[{(numel + 7) // 8}], got {arr.dtype}{list(arr.shape)}")
        bits = np.unpackbits(arr)
        if bits[numel:].any():
            raise SparsePayloadError("bitmask has bits set beyond the update's size")
        idx = np.flatnonzero(bits[:numel])
    elif coding == "gaps_varint":
        gaps = varint_decode(arr)
        if gaps.size and gaps.max() >= np.uint64(numel):
            raise SparsePayloadError("index gap beyond the update's size")
        idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    elif coding == "indices":
        if arr.ndim != 1 or arr.dtype not in (np.int32, np.int64):
            raise SparsePayloadError(f"indices must be a 1-D int32/int64 array, got {arr.dtype}{list(arr.shape)}")
        idx = arr.astype(np.int64)
        if idx.size and np.any(np.diff(idx) <= 0):
            if np.unique(idx).size != idx.size:
                raise SparsePayloadError("indices are not unique")
            raise SparsePayloadError("indices are not in increasing order")
    else:
        raise SparsePayloadError(f"unknown index coding {coding!r}; expected one of {INDEX_CODINGS}")
    if idx.size and (idx[0] < 0 or idx[-1] >= numel):
        raise SparsePayloadError(f"indices outside [0, {numel})")
    if idx.size != count:
        raise SparsePayloadError(f"payload decodes to {idx.size} indices, its count says {count}")
    return idx


def decode_sparse(data: Mapping, expected_count: int | None = None) -> dict[str, np.ndarray]:
    """Dense update {key: array} of a sparse DXO data dict; raises SparsePayloadError."""
    if not is_sparse(data):
        raise SparsePayloadError("not a sparse payload")
    if len(data) != 1:
        raise SparsePayloadError(f"a sparse payload carries only {SPARSE_KEY!r}, got extra keys {sorted(data)[:5]}")
    p = data[SPARSE_KEY]
    if not isinstance(p, Mapping):
        raise SparsePayloadError("sparse payload is not a dict")
    if p.get("format") != FORMAT:
        raise SparsePayloadError(f"unknown sparse format {p.get('format')!r}")
    missing = [
        k for k in ("keys", "shapes", "dtypes", "numel", "count", "values", "index_coding", "index_data") if k not in p
    ]
    if missing:
        raise SparsePayloadError(f"sparse payload lacks {missing}")
    keys, shapes, dtypes = list(p["keys"]), list(p["shapes"]), list(p["dtypes"])
    if not keys or len(keys) != len(shapes) or len(keys) != len(dtypes) or len(set(keys)) != len(keys):
        raise SparsePayloadError("keys/shapes/dtypes must be non-empty, of equal length, with unique keys")
    sizes = []
    for k, s, d in zip(keys, shapes, dtypes):
        if not isinstance(k, str) or not isinstance(s, (list, tuple)):
            raise SparsePayloadError(f"bad entry {k!r}: shape {s!r}")
        if any(not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 0 for x in s):
            raise SparsePayloadError(f"bad shape {s!r} of {k!r}")
        if d not in _ALLOWED_DTYPES:
            raise SparsePayloadError(f"dtype {d!r} of {k!r} is not a float dtype")
        sizes.append(int(np.prod(s, dtype=np.int64)))
    numel, count = p["numel"], p["count"]
    if not isinstance(numel, (int, np.integer)) or numel != sum(sizes):
        raise SparsePayloadError(f"numel={numel!r} does not equal the shapes' total {sum(sizes)}")
    if not isinstance(count, (int, np.integer)) or not 0 <= count <= numel:
        raise SparsePayloadError(f"count={count!r} outside [0, {numel}]")
    if expected_count is not None and int(expected_count) != int(count):
        raise SparsePayloadError(
            f"payload count {count} differs from the privacy meta kept_coordinates {expected_count}"
        )
    values = np.asarray(p["values"])
    if values.ndim != 1 or values.size != count or not np.issubdtype(values.dtype, np.floating):
        raise SparsePayloadError(
            f"values must be a float array of {count} entries, got {values.dtype}{list(values.shape)}"
        )
    if not np.all(np.isfinite(values)):
        raise SparsePayloadError("values contain NaN or Inf")
    idx = decode_indices(p["index_coding"], p["index_data"], int(numel), int(count))
    flat = np.zeros(int(numel), dtype=values.dtype)
    flat[idx] = values
    out, offset = {}, 0
    for k, s, d, n in zip(keys, shapes, dtypes, sizes):
        arr = flat[offset : offset + n].reshape([int(x) for x in s])
        out[k] = arr.astype(d if d != "bfloat16" else "float32", copy=False)
        offset += n
    return out


def payload_nbytes(data: Mapping) -> int:
    """Array bytes of a DXO data dict (sparse or dense), numpy nbytes."""
    if is_sparse(data):
        p = data[SPARSE_KEY]
        return int(np.asarray(p["values"]).nbytes + np.asarray(p["index_data"]).nbytes)
    return int(sum(np.asarray(v).nbytes for v in data.values()))


def serialized_nbytes(dxo) -> int:
    """Bytes of the DXO's shareable serialised with FLARE's fobs (what goes on the wire)."""
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    common_decomposers.register()  # numpy arrays, as FLARE registers them in a job
    return len(fobs.dumps(dxo.to_shareable()))


# ---------------------------------------------------------------------------- FLARE filter
class SparseDensifyFilter(Filter):
    """Server-side task-result filter: sparse release -> dense WEIGHT_DIFF before aggregation.

    Dense results (DP-FL, keep_fraction 1, NP-FL) pass through unchanged. The privacy
    metadata in the DXO meta is kept as is (the privacy widget checks it next); its
    ``kept_coordinates`` must equal the payload's count.
    """

    def __init__(self, require_privacy_meta: bool = True):
        """Args:
        require_privacy_meta: a sparse payload must carry the adpfl privacy metadata
            (with kept_coordinates); off only for testing the wire format alone.
        """
        super().__init__()
        self.require_privacy_meta = require_privacy_meta

    def process(self, shareable, fl_ctx):
        from nvflare.apis.dxo import DataKind, from_shareable
        from nvflare.apis.fl_constant import ReturnCode

        if shareable.get_return_code() != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return shareable  # not a DXO: nothing of ours
        if not is_sparse(dxo.data):
            return shareable
        site = fl_ctx.get_peer_context().get_identity_name() if fl_ctx.get_peer_context() else "unknown"
        try:
            if dxo.data_kind != DataKind.WEIGHT_DIFF:
                raise SparsePayloadError(f"a sparse payload must be WEIGHT_DIFF, got {dxo.data_kind}")
            expected = self._expected_count(dxo)
            dense = decode_sparse(dxo.data, expected)
        except Exception as e:
            self.log_error(fl_ctx, f"rejected the sparse contribution of {site}: {e}")
            return self._reject(shareable)
        p = dxo.data[SPARSE_KEY]
        wire = payload_nbytes(dxo.data)
        dense_bytes = int(sum(v.nbytes for v in dense.values()))
        dxo.data = dense
        dxo.set_meta_prop("adpfl_wire", {"format": FORMAT, "index_coding": p["index_coding"], "array_bytes": wire,
                                         "dense_bytes": dense_bytes})
        self.log_info(
            fl_ctx,
            f"densified {site}'s sparse update: {p['count']}/{p['numel']} coordinates, {p['index_coding']}, "
            f"{wire} array bytes vs {dense_bytes} dense ({wire / max(dense_bytes, 1):.3f})",
        )
        return dxo.update_shareable(shareable)

    def _expected_count(self, dxo) -> int | None:
        from adpfl.privacy.metadata import PRIVACY_META_KEY

        meta = dxo.get_meta_prop(PRIVACY_META_KEY)
        if isinstance(meta, Mapping) and "kept_coordinates" in meta:
            return int(meta["kept_coordinates"])
        if self.require_privacy_meta:
            raise SparsePayloadError("sparse payload without privacy metadata kept_coordinates")
        return None

    @staticmethod
    def _reject(shareable):
        from nvflare.apis.fl_constant import ReturnCode
        from nvflare.apis.shareable import ReservedHeaderKey, make_reply

        reply = make_reply(ReturnCode.BAD_TASK_DATA)
        for key, value in (shareable.get(ReservedHeaderKey.HEADERS) or {}).items():
            if key != ReservedHeaderKey.RC:
                reply.set_header(key, value)
        reply.set_return_code(ReturnCode.BAD_TASK_DATA)
        return reply


__all__ = [
    "FORMAT",
    "SPARSE_KEY",
    "SparseDensifyFilter",
    "SparsePayloadError",
    "decode_sparse",
    "encode_release",
    "encode_sparse",
    "is_sparse",
    "payload_nbytes",
    "serialized_nbytes",
    "varint_decode",
    "varint_encode",
]
