"""PrivacyAccountingWidget as FLARE calls it, with a bare FLContext (NVFlare's unit-test style):
a good contribution is accounted, a bad one is rejected before aggregation."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from adpfl.flare.privacy_widget import PrivacyAccountingWidget
from adpfl.privacy import PrivacyLedger
from adpfl.privacy.metadata import PRIVACY_META_KEY
from seeded_filter import SeededADPFilter

JOB = "job-1"


def _site_ctx(site="site-1"):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB, private=False, sticky=True)
    return ctx


def _update(n=2000):
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(n,)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def _site_result(round_=0, seed=7, **filter_args):
    """What a site sends: the executor's result through the site's (seeded, test-only) filter."""
    args = dict(mode="dpfl", target_epsilon=50.0, planned_rounds=3, noise_multiplier=1.0, clip_norm=1.0,
                clip_learning_rate=0.0, device="cpu", noise_seed=seed)
    args.update(filter_args)
    f = SeededADPFilter(**args)
    s = DXO(data_kind=DataKind.WEIGHT_DIFF, data=_update(), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 5}).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_)
    return f, s


def _contribute(widget, result, site="site-1", round_=0):
    result.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    ctx = FLContext()
    ctx.set_prop(ReservedKey.RUN_NUM, JOB, private=False, sticky=True)
    ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_, private=True, sticky=False)
    widget.handle_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, ctx)
    return result


def _widget(**kw):
    args = dict(target_epsilon=50.0, delta=1e-5, planned_rounds=3, min_noise_multiplier=0.9)
    args.update(kw)
    return PrivacyAccountingWidget(**args)


def test_good_contribution_is_accounted_with_the_servers_own_epsilon(tmp_path):
    f, raw = _site_result(ledger_dir=str(tmp_path))
    released = f.process(raw, _site_ctx())
    assert released.get_return_code() == ReturnCode.OK
    w = _widget()
    out = _contribute(w, released)
    assert out.get_return_code() == ReturnCode.OK  # accepted
    report = w.report()
    site = report["sites"]["site-1"]
    assert site["releases"] == 1 and report["rejected_contributions"] == []
    # recomputed by the server from the released z, not copied from the site's claim
    assert site["epsilon_rdp"] == pytest.approx(PrivacyLedger(delta=1e-5).projected_epsilon(1.0))
    assert report["seeded_noise"] is True  # the test-only filter's fixed noise is flagged


@pytest.mark.parametrize(
    "tamper, why",
    [
        (lambda m: m.pop("noise_std"), "lacks"),
        (lambda m: m.update(noise_multiplier=0.5, update_noise_multiplier=0.5, noise_std=1.0), "policy minimum"),
        (lambda m: m.update(pre_clip_norm=3.2), "private values"),
        (lambda m: m.update(delta=1e-3), "delta"),
    ],
    ids=["missing-field", "below-noise-floor", "raw-norm", "other-delta"],
)
def test_bad_metadata_is_rejected_before_aggregation(tmp_path, tamper, why):
    f, raw = _site_result(ledger_dir=str(tmp_path))
    released = f.process(raw, _site_ctx())
    dxo = from_shareable(released)
    meta = dict(dxo.get_meta_prop(PRIVACY_META_KEY))
    tamper(meta)
    dxo.set_meta_prop(PRIVACY_META_KEY, meta)
    bad = dxo.to_shareable()
    bad.set_header(AppConstants.CURRENT_ROUND, 0)
    w = _widget()
    out = _contribute(w, bad)
    assert out.get_return_code() == ReturnCode.BAD_TASK_DATA  # the aggregator disregards it
    rejected = w.report()["rejected_contributions"]
    assert len(rejected) == 1 and why in rejected[0]["reason"]
    assert "site-1" not in w.report()["sites"]  # nothing accounted from a rejected release


def test_unprotected_update_is_rejected():
    clean = DXO(data_kind=DataKind.WEIGHT_DIFF, data=_update()).to_shareable()
    w = _widget()
    assert _contribute(w, clean).get_return_code() == ReturnCode.BAD_TASK_DATA
    assert "no privacy metadata" in w.report()["rejected_contributions"][0]["reason"]


def test_second_release_of_a_round_is_rejected(tmp_path):
    w = _widget()
    for i in range(2):
        f, raw = _site_result(ledger_dir=str(tmp_path / str(i)))
        out = _contribute(w, f.process(raw, _site_ctx()))
    assert out.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert w.report()["sites"]["site-1"]["releases"] == 1


def test_seeded_filter_repeats_its_release_and_production_filter_does_not(tmp_path):
    a = from_shareable(_site_result(seed=3, ledger_dir=str(tmp_path / "a"))[0].process(
        _site_result()[1], _site_ctx())).data
    b = from_shareable(_site_result(seed=3, ledger_dir=str(tmp_path / "b"))[0].process(
        _site_result()[1], _site_ctx())).data
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("eps,rounds", [(1.0, 20), (8.0, 20), (0.5, 5), (1e5, 5)])
def test_server_noise_floor_never_rejects_the_sites_own_floor(eps, rounds):
    """The widget's floor is computed as the site computes its own (the schedule's
    min_factor * z_plan), rounded down: a release at the schedule's floor is accepted."""
    from adpfl.privacy.policy import noise_floor
    from adpfl.privacy.schedule import AdaptiveNoiseSchedule

    settings = {"mode": "adpfl", "target_epsilon": eps, "delta": 1e-5, "planned_rounds": rounds,
                "noise_min_factor": 0.5, "ledger_name": "x"}  # non-config keys are ignored
    site = AdaptiveNoiseSchedule(eps, 1e-5, rounds, min_factor=0.5)
    floor = noise_floor(settings)
    assert floor <= site.min_factor * site.z_plan
    assert floor >= site.min_factor * site.z_plan * (1 - 2e-3)  # 4 significant digits, rounded down
