"""Sparse wire format of private releases: encode/decode, rejection, size, and a real run."""

import copy

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext

from adpfl.flare.sparse import (
    SPARSE_KEY,
    SparseDensifyFilter,
    SparsePayloadError,
    decode_sparse,
    encode_release,
    encode_sparse,
    payload_nbytes,
    serialized_nbytes,
    varint_decode,
    varint_encode,
)
from adpfl.privacy import PrivacyConfig, PrivacyLedger, PrivacyPipeline
from adpfl.privacy.mechanisms import seeded_generators
from adpfl.privacy.metadata import PRIVACY_META_KEY

KEYS, SHAPES = ["a.weight", "b.bias", "c.weight"], [[40, 25], [7], [3, 4, 5]]
NUMEL = 40 * 25 + 7 + 60


def _random_sparse(p, seed=0, numel=NUMEL):
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(rng.random(numel) < p)
    vals = rng.standard_normal(idx.size).astype(np.float32)
    return idx, vals


def _dense_ref(idx, vals, numel=NUMEL):
    ref = np.zeros(numel, np.float32)
    ref[idx] = vals
    return ref


def _flat(d):
    return np.concatenate([d[k].ravel() for k in KEYS])


@pytest.mark.parametrize("coding", ["auto", "bitmask", "gaps_varint", "indices"])
@pytest.mark.parametrize("p", [0.02, 0.1, 0.5, 0.9])
def test_round_trip(coding, p):
    idx, vals = _random_sparse(p, seed=int(p * 100))
    data = encode_sparse(idx, vals, KEYS, SHAPES, coding=coding)
    out = decode_sparse(data, expected_count=idx.size)
    assert [list(out[k].shape) for k in KEYS] == SHAPES
    assert all(out[k].dtype == np.float32 for k in KEYS)
    np.testing.assert_array_equal(_flat(out), _dense_ref(idx, vals))


def test_round_trip_edges():
    for idx in (np.array([], dtype=np.int64), np.array([0]), np.array([NUMEL - 1]), np.arange(NUMEL)):
        vals = np.arange(idx.size, dtype=np.float32) + 1
        for coding in ("bitmask", "gaps_varint", "indices"):
            out = decode_sparse(encode_sparse(idx, vals, KEYS, SHAPES, coding=coding))
            np.testing.assert_array_equal(_flat(out), _dense_ref(idx, vals))


def test_varint_round_trip_and_truncation():
    v = np.array([0, 1, 127, 128, 16383, 16384, 2**31, 2**40, 2**64 - 1], dtype=np.uint64)
    enc = varint_encode(v)
    np.testing.assert_array_equal(varint_decode(enc), v)
    with pytest.raises(SparsePayloadError, match="truncated"):
        varint_decode(enc[:-1])


def test_release_sparse_matches_dense_release():
    cfg = PrivacyConfig(mode="adpfl", keep_fraction=0.3, mask_policy="random", clip_norm=1.0, clip_learning_rate=0.2,
                        clip_indicator_noise=1.0, target_epsilon=1e5, delta=1e-5, planned_rounds=3)
    upd = {k: torch.randn(s) for k, s in zip(KEYS, SHAPES)}
    sp, meta = PrivacyPipeline(
        cfg, PrivacyLedger(delta=1e-5), generator_factory=seeded_generators(3)
    ).release_sparse(upd, 0)
    dense, _ = PrivacyPipeline(cfg, PrivacyLedger(delta=1e-5), generator_factory=seeded_generators(3)).release(upd, 0)
    out = decode_sparse(encode_release(sp), expected_count=meta["kept_coordinates"])
    for k in KEYS:
        np.testing.assert_allclose(out[k], dense[k].numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.5, 0.2, 0.1])
def test_bytes_within_1_3_p_dense(p):
    n = 200_000
    idx, vals = _random_sparse(p, seed=1, numel=n)
    data = encode_sparse(idx, vals, ["w"], [[n]])
    dense = {"w": _dense_ref(idx, vals, n)}
    assert payload_nbytes(data) <= 1.3 * p * payload_nbytes(dense)
    # and on the wire (FLARE fobs serialisation of the whole shareable)
    s = serialized_nbytes(DXO(DataKind.WEIGHT_DIFF, data=data))
    d = serialized_nbytes(DXO(DataKind.WEIGHT_DIFF, data=dense))
    assert s <= 1.3 * p * d


def _malformed_cases():
    idx, vals = _random_sparse(0.3)
    base = encode_sparse(idx, vals, KEYS, SHAPES, coding="indices")
    cases = {}

    def case(name, fn, payload=base):
        d = copy.deepcopy(payload)
        fn(d[SPARSE_KEY])
        cases[name] = d

    case("out_of_range", lambda p: p["index_data"].__setitem__(-1, NUMEL))
    case("negative", lambda p: p["index_data"].__setitem__(0, -1))
    case("duplicate", lambda p: p["index_data"].__setitem__(1, p["index_data"][0]))
    case("unsorted", lambda p: p.__setitem__("index_data", p["index_data"][::-1].copy()))
    case("count_mismatch", lambda p: p.__setitem__("count", p["count"] - 1))
    case("values_short", lambda p: p.__setitem__("values", p["values"][:-1]))
    case("nan_value", lambda p: p["values"].__setitem__(0, np.nan))
    case("int_values", lambda p: p.__setitem__("values", p["values"].astype(np.int32)))
    case("float_indices", lambda p: p.__setitem__("index_data", p["index_data"].astype(np.float32)))
    case("bad_shape_total", lambda p: p.__setitem__("numel", NUMEL + 1))
    case("negative_dim", lambda p: p["shapes"].__setitem__(0, [-40, -25]))
    case("dup_keys", lambda p: p.__setitem__("keys", ["a.weight", "a.weight", "c.weight"]))
    case("unknown_coding", lambda p: p.__setitem__("index_coding", "zip"))
    case("wrong_format", lambda p: p.__setitem__("format", "other"))
    case("missing_field", lambda p: p.pop("values"))
    case("int_dtype", lambda p: p.__setitem__("dtypes", ["int64"] * 3))
    bm = encode_sparse(idx, vals, KEYS, SHAPES, coding="bitmask")
    case("bitmask_short", lambda p: p.__setitem__("index_data", p["index_data"][:-1]), bm)
    case("bitmask_pad_bits", lambda p: p["index_data"].__setitem__(-1, 0xFF), bm)
    vi = encode_sparse(idx, vals, KEYS, SHAPES, coding="gaps_varint")
    case("varint_truncated", lambda p: p["index_data"].__setitem__(-1, 0x81), vi)
    case("varint_beyond_end", lambda p: p.__setitem__(
        "index_data", np.concatenate([p["index_data"][:-1], varint_encode(np.array([NUMEL]))])), vi)
    extra = copy.deepcopy(base)
    extra["a.weight"] = np.zeros((40, 25), np.float32)
    cases["extra_dense_key"] = extra
    return cases, int(idx.size)


@pytest.mark.parametrize("name", sorted(_malformed_cases()[0]))
def test_malformed_payload_rejected(name):
    cases, count = _malformed_cases()
    with pytest.raises(SparsePayloadError):
        decode_sparse(cases[name], expected_count=count)


def test_count_must_match_privacy_meta():
    idx, vals = _random_sparse(0.3)
    with pytest.raises(SparsePayloadError, match="kept_coordinates"):
        decode_sparse(encode_sparse(idx, vals, KEYS, SHAPES), expected_count=idx.size + 1)


# ---------------------------------------------------------------------------- the FLARE filter
def _shareable(data, meta):
    s = DXO(DataKind.WEIGHT_DIFF, data=data, meta=meta).to_shareable()
    s.set_return_code(ReturnCode.OK)
    return s


def _meta(count):
    return {MetaKey.NUM_STEPS_CURRENT_ROUND: 1, PRIVACY_META_KEY: {"kept_coordinates": count, "noise_std": 1.0}}


def test_filter_densifies_and_keeps_meta():
    idx, vals = _random_sparse(0.4)
    out = SparseDensifyFilter().process(
        _shareable(encode_sparse(idx, vals, KEYS, SHAPES), _meta(idx.size)), FLContext()
    )
    assert out.get_return_code() == ReturnCode.OK
    dxo = from_shareable(out)
    assert sorted(dxo.data) == sorted(KEYS)
    np.testing.assert_array_equal(_flat(dxo.data), _dense_ref(idx, vals))
    assert dxo.get_meta_prop(PRIVACY_META_KEY) == {"kept_coordinates": int(idx.size), "noise_std": 1.0}
    assert dxo.get_meta_prop("adpfl_wire")["dense_bytes"] == NUMEL * 4


def test_filter_passes_dense_through_and_rejects_malformed():
    dense = {k: np.ones(s, np.float32) for k, s in zip(KEYS, SHAPES)}
    s = _shareable(dense, {})
    assert SparseDensifyFilter().process(s, FLContext()) is s
    idx, vals = _random_sparse(0.4)
    bad = encode_sparse(idx, vals, KEYS, SHAPES)
    out = SparseDensifyFilter().process(_shareable(bad, _meta(idx.size + 3)), FLContext())
    assert out.get_return_code() == ReturnCode.BAD_TASK_DATA
    with pytest.raises(ValueError):
        from_shareable(out)  # no model data in the rejection
    # a sparse payload without the privacy meta is refused by default
    out = SparseDensifyFilter().process(_shareable(bad, {}), FLContext())
    assert out.get_return_code() == ReturnCode.BAD_TASK_DATA


def test_adp_filter_sends_sparse_release(tmp_path):
    from adpfl.flare.privacy_filter import ADPFilter
    from test_privacy_filter import _ctx, _result, _update

    f = ADPFilter(mode="adpfl", target_epsilon=1e5, planned_rounds=3, keep_fraction=0.2, mask_policy="random",
                  clip_norm=1.0, clip_indicator_noise=1.0, ledger_dir=str(tmp_path), device="cpu")
    upd = _update()
    out = f.process(_result(upd), _ctx())
    assert out.get_return_code() == ReturnCode.OK
    dxo = from_shareable(out)
    assert SPARSE_KEY in dxo.data
    meta = dxo.get_meta_prop(PRIVACY_META_KEY)
    dense = decode_sparse(dxo.data, expected_count=meta["kept_coordinates"])
    assert sorted(dense) == sorted(upd)
    nnz = sum(int(np.count_nonzero(v)) for v in dense.values())
    assert nnz == meta["kept_coordinates"]
    assert payload_nbytes(dxo.data) <= 1.3 * 0.2 * sum(v.nbytes for v in dense.values())

# (the real simulator run of a sparse ADP-FL job is
# tests/test_simulator.py::test_adpfl_run_writes_privacy_report_and_curves)
