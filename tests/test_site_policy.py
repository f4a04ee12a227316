"""The site-enforced privacy policy (FLARE privacy scope + SitePolicyFilter), with bare FLContexts.

Filters are applied with FLARE's own ``apply_filters`` (scope filters, then the job's), as
the client runner does, so the order of the two filters is FLARE's, not the test's.
"""

import json
import os

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants
from nvflare.private.fed.app.fl_conf import create_privacy_manager
from nvflare.private.privacy_manager import PrivacyService, Scope

from adpfl.flare.privacy_filter import ADPFilter
from adpfl.flare.site_policy import SitePolicyFilter, privacy_json_document, write_privacy_json
from adpfl.privacy.errors import PrivacyConfigError, PrivacyError
from adpfl.privacy.ledger import PrivacyLedger
from adpfl.privacy.metadata import PRIVACY_META_KEY, RECORD_PRIVACY_META_KEY
from adpfl.privacy.site_policy import (
    FORWARD_ERROR,
    PASS_METRICS,
    PROTECT,
    REFUSE,
    check_site_release,
    classify_result,
    release_digest,
)

N = 4000


def _update(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": (0.01 * rng.normal(size=(N,))).astype(np.float32), "b": np.zeros(10, np.float32)}


def _result(update, round_=0, kind=DataKind.WEIGHT_DIFF, meta=None):
    s = DXO(data_kind=kind, data=update, meta=dict({MetaKey.NUM_STEPS_CURRENT_ROUND: 7}, **(meta or {}))).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_)
    return s


def _site_filter(tmp_path, **kw):
    args = dict(target_epsilon=20.0, planned_rounds=3, ledger_dir=str(tmp_path / "site"), device="cpu")
    args.update(kw)
    return SitePolicyFilter(**args)


def _job_filter(tmp_path):
    return ADPFilter(mode="dpfl", target_epsilon=50.0, planned_rounds=3, noise_multiplier=0.5, clip_norm=1.0,
                     clip_learning_rate=0.0, ledger_dir=str(tmp_path / "job"), device="cpu")


def _ctx(site_filter=None, job="job-1"):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=True)
    if site_filter is not None:
        scope = Scope()
        scope.set_name("private")
        scope.add_task_result_filter(site_filter, FilterKey.OUT)
        ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=True)
    return ctx


def _send(result, ctx, job_filters=()):
    """The client runner's result filtering: the scope's filters, then the job's on task 'train'."""
    table = {"train" + FilterKey.DELIMITER + FilterKey.OUT: list(job_filters)} if job_filters else {}
    return apply_filters(Scope.TASK_RESULT_FILTERS_NAME, result, ctx, table, "train", FilterKey.OUT)


def _entries(path):
    return json.loads(path.read_text())["entries"] if path.exists() else []


def _no_model_data(reply):
    try:
        return not from_shareable(reply).data
    except Exception:
        return True


# ------------------------------------------------------------------ pure decisions
def test_classify_result_rules():
    assert classify_result(False, "WEIGHT_DIFF", {"w": 1})[0] == FORWARD_ERROR
    assert classify_result(True, "WEIGHT_DIFF", {"w": np.zeros(3)})[0] == PROTECT
    assert classify_result(True, "METRICS", {"dice_mean": 0.5, "hd95": np.float32(3.0), "n": None})[0] == PASS_METRICS
    assert classify_result(True, "METRICS", {"dice": np.zeros(4)})[0] == REFUSE  # an array disguised as a metric
    assert classify_result(True, "METRICS", {})[0] == REFUSE
    assert classify_result(True, "WEIGHTS", {"w": np.zeros(3)})[0] == REFUSE
    assert classify_result(True, None, None)[0] == REFUSE


def test_release_digest_sees_every_byte_and_the_metadata():
    upd = _update()
    d = release_digest(upd, {"m": 1})
    assert d == release_digest({k: v.copy() for k, v in reversed(list(upd.items()))}, {"m": 1})
    changed = {k: v.copy() for k, v in upd.items()}
    changed["w"][17] += 1e-7
    assert release_digest(changed, {"m": 1}) != d
    assert release_digest({k: v.astype(np.float64) for k, v in upd.items()}, {"m": 1}) != d
    assert release_digest(upd, {"m": 2}) != d


def test_check_site_release_needs_the_recorded_digest_and_the_ledger_on_disk(tmp_path):
    path = tmp_path / "site_policy.json"
    ledger = PrivacyLedger(delta=1e-5)
    ledger.record(round=2, noise_multiplier=1.0, clip_norm=1.0, job_id="job-1")
    ledger.save(path)
    check_site_release(("job-1", 2, "abc"), "abc", 2, str(path))
    with pytest.raises(PrivacyError, match="released nothing"):
        check_site_release(None, "abc", 2, str(path))
    with pytest.raises(PrivacyError, match="claims round 3"):
        check_site_release(("job-1", 2, "abc"), "abc", 3, str(path))
    with pytest.raises(PrivacyError, match="differs"):
        check_site_release(("job-1", 2, "abc"), "abd", 2, str(path))
    with pytest.raises(PrivacyError, match="holds no release"):
        check_site_release(("job-2", 2, "abc"), "abc", 2, str(path))
    with pytest.raises(PrivacyError, match="holds no release"):
        check_site_release(("job-1", 2, "abc"), "abc", 2, str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ the site's filter
def test_npfl_result_leaves_noised_and_accounted_in_the_site_ledger(tmp_path):
    site = _site_filter(tmp_path)
    upd = _update()
    out = _send(_result(upd), _ctx(site))  # an NP-FL job: no filter of its own
    assert out.get_return_code() == ReturnCode.OK
    dxo = from_shareable(out)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    meta = dxo.get_meta_prop(PRIVACY_META_KEY)
    assert meta["job_id"] == "job-1" and meta["round"] == 0 and meta["noise_multiplier"] > 0
    diff = np.concatenate([np.asarray(dxo.data[k]).ravel() - upd[k].ravel() for k in upd])
    # the noise std is z * 2C per coordinate; the clean update is tiny beside it
    assert np.std(diff) == pytest.approx(meta["noise_std"], rel=0.1)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 1  # the true step count stays at the site
    entries = _entries(tmp_path / "site" / "site-1" / "site_policy.json")
    assert [(e["job_id"], e["round"]) for e in entries] == [("job-1", 0)]


def test_private_job_filter_passes_the_site_release_on_without_a_second_spend(tmp_path):
    site, job = _site_filter(tmp_path), _job_filter(tmp_path)
    ctx = _ctx(site)
    for r in (0, 1):
        out = _send(_result(_update(r), round_=r), ctx, job_filters=[job])
        assert out.get_return_code() == ReturnCode.OK
        meta = from_shareable(out).get_meta_prop(PRIVACY_META_KEY)
        z = site._pipeline.schedule.noise_multiplier
        assert meta["round"] == r and meta["noise_multiplier"] == pytest.approx(z)
    assert [e["round"] for e in _entries(tmp_path / "site" / "site-1" / "site_policy.json")] == [0, 1]
    assert not (tmp_path / "job").exists() or not any((tmp_path / "job").rglob("*.json"))  # the job's ledger: nothing


def test_job_filter_refuses_a_release_changed_after_the_site_filter(tmp_path):
    from nvflare.apis.filter import Filter

    class Tamper(Filter):  # a job filter between the site's filter and the job's ADPFilter
        def process(self, shareable, fl_ctx):
            dxo = from_shareable(shareable)
            dxo.data["w"] = np.asarray(dxo.data["w"]) * 0.5
            return dxo.update_shareable(shareable)

    site = _site_filter(tmp_path)
    out = _send(_result(_update()), _ctx(site), job_filters=[Tamper(), _job_filter(tmp_path)])
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and _no_model_data(out)


def test_job_filter_refuses_when_the_site_ledger_on_disk_lacks_the_release(tmp_path):
    site, job = _site_filter(tmp_path), _job_filter(tmp_path)
    ctx = _ctx(site)
    released = site.process(_result(_update()), ctx)
    assert released.get_return_code() == ReturnCode.OK
    path = tmp_path / "site" / "site-1" / "site_policy.json"
    data = json.loads(path.read_text())
    data["entries"] = []
    path.write_text(json.dumps(data))
    out = job.process(released, ctx)
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and _no_model_data(out)


def test_job_filter_without_site_policy_protects_as_before(tmp_path):
    job = _job_filter(tmp_path)
    out = _send(_result(_update()), _ctx(), job_filters=[job])
    assert out.get_return_code() == ReturnCode.OK
    assert [e["round"] for e in _entries(tmp_path / "job" / "site-1" / "privacy_ledger.json")] == [0]


def test_dpsgd_result_gets_the_site_noise_and_keeps_its_record_level_claim(tmp_path):
    from adpfl.privacy.record import opacus_rdp_epsilon

    record = {"unit": "record", "mechanism": "dpsgd", "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1,
              "max_grad_norm": 1.0, "steps_per_round": 10, "round": 0, "history": [[1.1, 0.1, 10]],
              "epsilon_rdp": opacus_rdp_epsilon([(1.1, 0.1, 10)], 1e-5)}
    out = _send(_result(_update(), meta={RECORD_PRIVACY_META_KEY: record}), _ctx(_site_filter(tmp_path)))
    dxo = from_shareable(out)
    assert dxo.get_meta_prop(PRIVACY_META_KEY)["noise_multiplier"] > 0
    assert dxo.get_meta_prop(RECORD_PRIVACY_META_KEY) == record
    assert len(_entries(tmp_path / "site" / "site-1" / "site_policy.json")) == 1
    # a record-level key holding anything but its public schema never leaves (error reply, no data)
    smuggled = dict(record, steps=10, payload=[0.5] * 100)
    bad = _send(_result(_update(), meta={RECORD_PRIVACY_META_KEY: smuggled}), _ctx(_site_filter(tmp_path)))
    assert bad.get_return_code() != ReturnCode.OK and _no_model_data(bad)


def test_metrics_pass_as_plain_numbers_other_results_are_refused(tmp_path):
    site = _site_filter(tmp_path)
    ctx = _ctx(site)
    m = DXO(data_kind=DataKind.METRICS, data={"dice_mean": np.float32(0.25), "hd95_lesion": 3.0},
            meta={"smuggled": np.ones(5)}).to_shareable()
    out = _send(m, ctx)
    dxo = from_shareable(out)
    assert dxo.data == {"dice_mean": 0.25, "hd95_lesion": 3.0} and not dxo.meta
    weights = _send(_result(_update(), kind=DataKind.WEIGHTS), ctx)
    assert weights.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and _no_model_data(weights)
    bad_metrics = _send(DXO(data_kind=DataKind.METRICS, data={"dice": np.ones(50)}).to_shareable(), ctx)
    assert _no_model_data(bad_metrics)
    err = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    err["DXO"] = {"smuggled": 1}
    forwarded = _send(err, ctx)
    assert forwarded.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "DXO" not in forwarded
    assert not (tmp_path / "site" / "site-1" / "site_policy.json").exists()  # nothing spent


def test_site_budget_refuses_once_spent_and_the_job_filter_passes_only_the_refusal(tmp_path):
    site, job = _site_filter(tmp_path, planned_rounds=1, target_epsilon=5.0), _job_filter(tmp_path)
    ctx = _ctx(site, job="job-a")
    assert _send(_result(_update()), ctx, [job]).get_return_code() == ReturnCode.OK
    # a second job on the same site: the site's budget (one release) is spent
    site2 = _site_filter(tmp_path, planned_rounds=1, target_epsilon=5.0)
    out = _send(_result(_update()), _ctx(site2, job="job-b"), [_job_filter(tmp_path)])
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and _no_model_data(out)


def test_site_filter_settings_are_checked(tmp_path):
    with pytest.raises(PrivacyConfigError, match="keep_fraction"):
        SitePolicyFilter(mode="adpfl", keep_fraction=0.5, ledger_dir=str(tmp_path))
    with pytest.raises(PrivacyConfigError, match="unreachable"):
        privacy_json_document(target_epsilon=1e-6, planned_rounds=50)


# ------------------------------------------------------------------ privacy.json as FLARE reads it
def test_privacy_json_is_read_by_flare_with_the_private_scope_as_default(tmp_path):
    site_dir = tmp_path / "site-1"
    for sub in ("local", "startup"):  # the folders of a site's startup kit
        (site_dir / sub).mkdir(parents=True)
    path = write_privacy_json(str(site_dir), target_epsilon=8.0, planned_rounds=10)
    assert path == site_dir / "local" / "privacy.json"
    mgr = create_privacy_manager(Workspace(str(site_dir), "site-1"), names_only=False)
    scope = mgr.get_scope("")  # a job without a scope
    assert scope is not None and scope.name == "private"
    (f,) = scope.task_result_filters[FilterKey.OUT]
    assert isinstance(f, SitePolicyFilter) and f.target_epsilon == 8.0 and f.planned_rounds == 10
    old = PrivacyService.get_manager()
    try:
        PrivacyService.initialize(mgr)
        assert PrivacyService.is_scope_allowed("") and PrivacyService.is_scope_allowed("private")
        assert not PrivacyService.is_scope_allowed("public")  # FLARE refuses the job's deployment
    finally:
        PrivacyService.initialize(old)


def test_write_privacy_json_needs_a_startup_kit(tmp_path):
    with pytest.raises(ValueError, match="local/"):
        write_privacy_json(str(tmp_path / "nowhere"), 8.0, 10)
    assert not os.path.exists(tmp_path / "nowhere")


def test_poc_prepare_refuses_an_unreachable_site_budget_before_writing_anything(tmp_path):
    from adpfl import poc

    with pytest.raises(poc.PocError, match="site privacy policy .*unreachable"):
        poc.prepare(str(tmp_path / "ws"), sites=1, home=str(tmp_path / "home"), site_epsilon=1e-6, site_rounds=50)
    assert not (tmp_path / "ws").exists()
