"""ADPFilter as FLARE calls it: protected release or an empty error reply, never the clean update."""

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, make_reply
from nvflare.app_common.app_constant import AppConstants

from adpfl.flare.privacy_filter import ADPFilter
from adpfl.flare.sparse import decode_sparse
from adpfl.privacy.errors import PrivacyConfigError
from adpfl.privacy.metadata import PRIVACY_META_KEY, check_privacy_meta
from adpfl.privacy.public_signals import PUBLIC_INFO_PROP


def _ctx(site="site-1", job="job-1", public=None):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=True)
    if public is not None:
        ctx.set_prop(PUBLIC_INFO_PROP, public, private=True, sticky=False)
    return ctx


def _update(seed=0, n=5000):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.normal(size=(n,)).astype(np.float32), "b.bias": rng.normal(size=(10,)).astype(np.float32)}


def _result(update, round_=0, kind=DataKind.WEIGHT_DIFF, steps=7):
    s = DXO(
        data_kind=kind, data=update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps, MetaKey.INITIAL_METRICS: 0.5}
    ).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_)
    return s


def _dpfl(tmp_path, **kw):
    args = dict(mode="dpfl", target_epsilon=50.0, delta=1e-5, planned_rounds=3, noise_multiplier=1.0,
                clip_norm=1.0, clip_learning_rate=0.0, ledger_dir=str(tmp_path), device="cpu")
    args.update(kw)
    return ADPFilter(**args)


def _has_no_model_data(reply):
    try:
        dxo = from_shareable(reply)
    except Exception:
        return True
    return not dxo.data


def test_release_is_noised_clipped_and_accounted(tmp_path):
    f = _dpfl(tmp_path)
    upd = _update()
    out = f.process(_result(upd), _ctx())
    assert out.get_return_code() == ReturnCode.OK
    dxo = from_shareable(out)
    meta = check_privacy_meta(dxo.get_meta_prop(PRIVACY_META_KEY), delta=1e-5)
    # noise std = z * 2C on every coordinate (replace-one sensitivity)
    assert meta["noise_std"] == pytest.approx(1.0 * 2 * 1.0)
    released = np.concatenate([dxo.data[k].ravel() for k in sorted(dxo.data)])
    clean = np.concatenate([upd[k].ravel() for k in sorted(upd)])
    assert np.std(released - clean) > 1.5  # clipped to norm 1 and noised at std 2
    # the true local step count stays at the site: equal weights
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 1
    assert not any(k in json.dumps(meta) for k in ("pre_clip", "raw_norm"))
    ledger = json.loads((tmp_path / "site-1" / "privacy_ledger.json").read_text())
    assert len(ledger["entries"]) == 1 and ledger["entries"][0]["epsilon_rdp"] == pytest.approx(meta["epsilon_rdp"])


def test_refuses_past_budget_and_sends_nothing(tmp_path):
    f = _dpfl(tmp_path, target_epsilon=6.0)  # z=1: 4.73 after one round, 7.08 after two
    assert f.process(_result(_update(), 0), _ctx()).get_return_code() == ReturnCode.OK
    reply = f.process(_result(_update(), 1), _ctx())
    assert reply.get_return_code() != ReturnCode.OK
    assert _has_no_model_data(reply)
    ledger = json.loads((tmp_path / "site-1" / "privacy_ledger.json").read_text())
    assert len(ledger["entries"]) == 1  # the refused round cost nothing


def test_budget_persists_across_filters_and_jobs(tmp_path):
    _dpfl(tmp_path, target_epsilon=6.0).process(_result(_update(), 0), _ctx(job="job-1"))
    # a new job on the same site starts from the first job's spend
    reply = _dpfl(tmp_path, target_epsilon=6.0).process(_result(_update(), 0), _ctx(job="job-2"))
    assert reply.get_return_code() != ReturnCode.OK and _has_no_model_data(reply)


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda u: _result({**u, "a.weight": np.full_like(u["a.weight"], np.nan)}),  # NaN in the update
        lambda u: _result(u, kind=DataKind.WEIGHTS),  # full weights instead of a difference
        lambda u: _result({**u, "c.count": np.arange(3)}),  # integer tensor
        lambda u: _no_round(_result(u)),  # round unknown: cannot be accounted
    ],
    ids=["nan", "weights", "integer", "no-round"],
)
def test_fails_closed_on_bad_results(tmp_path, make_bad):
    reply = _dpfl(tmp_path).process(make_bad(_update()), _ctx())
    assert reply.get_return_code() != ReturnCode.OK
    assert _has_no_model_data(reply)


def _no_round(s):
    s[ReservedHeaderKey.HEADERS].pop(AppConstants.CURRENT_ROUND, None)
    return s


def test_fails_closed_when_ledger_unwritable(tmp_path):
    blocker = tmp_path / "ledgers"
    blocker.write_text("not a folder")
    reply = _dpfl(tmp_path, ledger_dir=str(blocker)).process(_result(_update()), _ctx())
    assert reply.get_return_code() != ReturnCode.OK and _has_no_model_data(reply)


def test_error_results_pass_on_without_content(tmp_path):
    err = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    err["smuggled"] = _update()
    reply = _dpfl(tmp_path).process(err, _ctx())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "smuggled" not in reply


def test_retry_of_same_round_resends_same_release(tmp_path):
    f = _dpfl(tmp_path)
    a = from_shareable(f.process(_result(_update(), 0), _ctx())).data
    b = from_shareable(f.process(_result(_update(), 0), _ctx())).data
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ledger = json.loads((tmp_path / "site-1" / "privacy_ledger.json").read_text())
    assert len(ledger["entries"]) == 1


def test_two_releases_differ(tmp_path):
    a = from_shareable(_dpfl(tmp_path / "a").process(_result(_update()), _ctx())).data["a.weight"]
    b = from_shareable(_dpfl(tmp_path / "b").process(_result(_update()), _ctx())).data["a.weight"]
    assert not np.allclose(a, b)


def test_adpfl_topk_public_uses_public_scores(tmp_path):
    f = ADPFilter(mode="adpfl", target_epsilon=1e5, planned_rounds=3, keep_fraction=0.1, mask_policy="topk_public",
                  clip_norm=1.0, clip_indicator_noise=1.0, ledger_dir=str(tmp_path), device="cpu")
    upd = _update()
    scores = {k: np.zeros_like(v) for k, v in upd.items()}
    scores["a.weight"][:501] = 1.0  # public scores pick the first 501 coordinates of 5010 (10 %)
    out = f.process(_result(upd), _ctx(public={"round": 0, "global_change": None, "public_scores": scores}))
    dxo = from_shareable(out)
    assert "__adpfl_sparse__" in dxo.data  # only the kept coordinates travel
    data = decode_sparse(dxo.data)
    assert np.count_nonzero(data["a.weight"][:501]) == 501
    assert np.count_nonzero(data["a.weight"][501:]) == 0 and np.count_nonzero(data["b.bias"]) == 0
    assert dxo.get_meta_prop(PRIVACY_META_KEY)["mask_covered"] is True


def test_settings_are_validated_at_construction(tmp_path):
    with pytest.raises(PrivacyConfigError, match="keep_fraction"):
        ADPFilter(mode="adpfl", target_epsilon=10, planned_rounds=5, keep_fraction=1.5)
    with pytest.raises(PrivacyConfigError, match="unreachable"):
        ADPFilter(mode="adpfl", target_epsilon=1e-6, planned_rounds=50, clip_indicator_noise=1e4)
    with pytest.raises(TypeError, match="test_seed"):  # fixed noise is no job setting
        ADPFilter(mode="dpfl", noise_multiplier=1.0, target_epsilon=10, planned_rounds=2, test_seed=3)


def _real_meta(tmp_path, **kw):
    out = _dpfl(tmp_path, **kw).process(_result(_update()), _ctx())
    return dict(from_shareable(out).get_meta_prop(PRIVACY_META_KEY))


@pytest.mark.parametrize("change,match", [
    ({"noise_scale": 2.0}, "unknown for a gaussian release"),          # Laplace field in a Gaussian release
    ({"epsilon_round": 1.0}, "unknown for a gaussian release"),
    ({"pre_clip_scale": 1.0}, "unknown"),                              # a field the server does not know
    ({"sensitivity": 1.0}, "contradicts 2 \\* clip_norm"),
    ({"mask_covered": False}, "contradicts mask_policy"),
    ({"mask_policy": "random"}, "contradicts keep_fraction"),           # a mask named but every coordinate kept
    ({"update_noise_multiplier": 0.5}, "exceeds update_noise_multiplier"),
    ({"round": -1}, "round"),
    ({"accountant": "gdp"}, "unknown accountant"),
    ({"seeded": "no"}, "seeded"),
])
def test_server_refuses_unknown_or_contradictory_metadata(tmp_path, change, match):
    meta = _real_meta(tmp_path)
    check_privacy_meta(dict(meta), delta=1e-5)  # the real release passes as it is
    meta.update(change)
    with pytest.raises(ValueError, match=match):
        check_privacy_meta(meta, delta=1e-5)


def test_laplace_release_needs_its_fields_and_consistent_scale(tmp_path):
    meta = _real_meta(tmp_path, noise_type="laplace", target_epsilon=50.0)
    assert check_privacy_meta(dict(meta), delta=1e-5)["mechanism"] == "laplace"
    with pytest.raises(ValueError, match="lacks"):
        check_privacy_meta({k: v for k, v in meta.items() if k != "epsilon_round"}, delta=1e-5)
    with pytest.raises(ValueError, match="noise_scale"):
        check_privacy_meta(dict(meta, noise_scale=meta["noise_scale"] / 4), delta=1e-5)
    with pytest.raises(ValueError, match="contradicts a Laplace scale"):
        check_privacy_meta(dict(meta, noise_std=meta["noise_std"] / 4), delta=1e-5)


def test_record_metadata_travels_only_as_its_public_schema(tmp_path):
    """A DP-SGD result's record-level metadata is rebuilt from its schema's fields; anything
    else a job put under the key (or a contradictory record) gives an error reply, no data."""
    from adpfl.privacy.metadata import RECORD_PRIVACY_META_KEY
    from adpfl.privacy.record import opacus_rdp_epsilon

    rec = {"unit": "record", "mechanism": "dpsgd", "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.5,
           "max_grad_norm": 1.0, "steps_per_round": 2, "round": 0, "history": [[1.0, 0.5, 2]],
           "epsilon_rdp": opacus_rdp_epsilon([(1.0, 0.5, 2)], 1e-5), "target_epsilon": 8.0}
    res = _result(_update())
    dxo = from_shareable(res)
    dxo.set_meta_prop(RECORD_PRIVACY_META_KEY, dict(rec))
    res = dxo.to_shareable()
    res.set_header(AppConstants.CURRENT_ROUND, 0)
    out = _dpfl(tmp_path).process(res, _ctx())
    assert from_shareable(out).get_meta_prop(RECORD_PRIVACY_META_KEY) == rec
    smuggled = dict(rec, images=[0.1] * 1000)
    dxo.set_meta_prop(RECORD_PRIVACY_META_KEY, smuggled)
    res2 = dxo.to_shareable()
    res2.set_header(AppConstants.CURRENT_ROUND, 1)
    bad = _dpfl(tmp_path).process(res2, _ctx(job="job-2"))
    assert bad.get_return_code() != ReturnCode.OK and _has_no_model_data(bad)


def test_site_cap_applies_when_the_job_sets_no_budget(tmp_path):
    """A DP-FL job with a fixed z and no target_epsilon, on a site with max_epsilon: the
    site's cap is the budget (it used to crash on float(None) every round)."""
    f = _dpfl(tmp_path, target_epsilon=None, noise_multiplier=3.0)  # epsilon 1.39, 2.03, 2.54, 2.99, 3.38
    ws = tmp_path / "site_ws"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / "adpfl_site.json").write_text(json.dumps({"max_epsilon": 3.0}))

    class _WS:
        def get_root_dir(self):
            return str(ws)

    class _Engine:
        def get_workspace(self):
            return _WS()

        def fire_event(self, *args, **kwargs):  # the filter logs a refusal as an event
            pass

    ctx = _ctx()
    ctx.set_prop(ReservedKey.ENGINE, _Engine(), private=True, sticky=False)
    outs = [f.process(_result(_update(), round_=r), ctx) for r in range(6)]
    codes = [o.get_return_code() for o in outs]
    assert codes[:4] == [ReturnCode.OK] * 4  # released under the site's cap
    assert all(c != ReturnCode.OK and _has_no_model_data(o) for c, o in zip(codes[4:], outs[4:]))
    ledger = json.loads((tmp_path / "site-1" / "privacy_ledger.json").read_text())
    assert ledger["target_epsilon"] == 3.0 and max(e["epsilon_rdp"] for e in ledger["entries"]) <= 3.0


def test_paper_laplace_configuration_through_the_filter(tmp_path):
    """The grid's adpfl_paper settings through the FLARE filter: a sparse Laplace release
    scaled to the adaptive clip, accepted by the server's check, accounted at 1 / z_eff."""
    f = ADPFilter(mode="adpfl", noise_type="laplace", target_epsilon=40.0, delta=1e-5, planned_rounds=4,
                  keep_fraction=0.5, mask_policy="random", clip_norm=50.0, clip_indicator_noise=1.0,
                  ledger_dir=str(tmp_path), device="cpu")
    out = f.process(_result(_update()), _ctx())
    assert out.get_return_code() == ReturnCode.OK
    meta = check_privacy_meta(from_shareable(out).get_meta_prop(PRIVACY_META_KEY), delta=1e-5)
    assert meta["mechanism"] == "laplace" and meta["epsilon_round"] == pytest.approx(10.0)
    assert meta["noise_scale"] == pytest.approx(meta["update_noise_multiplier"] * 2 * 50.0)
    assert f._pipeline.clip_norm != 50.0  # the percentile clip moved
