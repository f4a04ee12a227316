"""The site-enforced privacy policy: a FLARE privacy scope whose result filter is the site's ADP filter.

A hospital writes ``<site startup kit>/local/privacy.json`` (:func:`write_privacy_json`)::

    {"scopes": [{"name": "private",
                 "task_result_filters": [{"path": "adpfl.flare.site_policy.SitePolicyFilter",
                                          "args": {"target_epsilon": 8.0, "planned_rounds": 20, ...}}]}],
     "default_scope": "private"}

What FLARE 2.9 does with it (nvflare/private/privacy_manager.py, private/fed/utils/app_deployer.py,
apis/utils/task_utils.py, private/fed/utils/fed_utils.py):

* a job whose ``meta.json`` names a scope the site does not define is refused at deployment
  by that site ("privacy scope '...' is not allowed");
* a job without a scope gets the site's ``default_scope``. This site policy makes the private
  scope the default and defines no other scope, so every job the site runs -- NP-FL jobs and
  jobs written by others included -- is protected by the site's own filter and budget. We chose
  this over refusing scope-less jobs: the protection is the same as an explicitly private
  job's, nothing clean can leave either way, and a job author need not know each site's scope
  names. A job asking for any other scope (e.g. an unprotected "public" one) is refused;
* the scope's result filters run BEFORE the job's own result filters, on the executor's clean
  result (``get_filters``: scope filters first, then the job's task filters).
* ``nvflare simulator`` loads ``privacy.json`` but never puts the scope into the job's
  context (``SimulatorClientRunManager.create_job_processing_context_properties`` sets only the
  job meta), so scope filters do not run there: the policy is a POC/provisioned-site feature.

Interplay with a job's own :class:`ADPFilter` (private jobs list one on ``train``): the site's
filter releases first; the job's filter finds the site's filter in the scope FLARE put into
its context and, instead of noising and spending a second time, passes the release on
unchanged only if :func:`adpfl.privacy.site_policy.check_site_release` verifies it (the digest
of what the site filter released, and the site's ledger file on disk recording it); otherwise
it refuses (an error reply, no model data). The job's own privacy settings are then superseded
by the site's.

The scope protects against jobs that do not configure protection; it is not a sandbox for a
job's custom code (an executor can do anything the site process can): a site that runs jobs it
does not trust also withholds the custom-code right (FLARE authorization policy, ``byoc``).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from adpfl._io import write_json_atomic
from adpfl.flare.privacy_filter import ADPFilter
from adpfl.privacy.errors import BudgetExhausted, PrivacyConfigError
from adpfl.privacy.site_policy import (
    FORWARD_ERROR,
    PASS_METRICS,
    PRIVATE_SCOPE,
    PROTECT,
    check_site_release,
    classify_result,
    plain_metrics,
    release_digest,
)

PRIVACY_JSON = "privacy.json"
SITE_LEDGER_NAME = "site_policy"


class SitePolicyFilter(ADPFilter):
    """The site's own ADP filter, attached to every job by the site's privacy scope.

    Same settings as :class:`ADPFilter` (they come from the site's ``privacy.json``, never
    from a job; the site's ``local/adpfl_site.json`` ``max_epsilon`` still caps the budget),
    with site-appropriate defaults: fixed clip and fixed noise (``mode="dpfl"``) calibrated
    so that ``target_epsilon`` covers ``planned_rounds`` releases of this site in total, over
    all jobs (one ledger, ``site_policy.json``, shared by every job on the site). Releases are
    dense (``keep_fraction`` must be 1): a job that did not plan for privacy has no
    server-side densifier for the sparse wire format.

    Results other than model updates: see :mod:`adpfl.privacy.site_policy`. Fails closed:
    any error gives an error reply without model data.
    """

    enforced_by_site = True

    def __init__(self, mode: str = "dpfl", target_epsilon: float = 8.0, planned_rounds: int = 20,
                 clip_norm: float = 1.0, clip_learning_rate: float = 0.0, ledger_name: str = SITE_LEDGER_NAME,
                 **kwargs):
        """Args: as :class:`ADPFilter` (see the README's settings table), with the defaults above."""
        super().__init__(mode=mode, target_epsilon=target_epsilon, planned_rounds=planned_rounds,
                         clip_norm=clip_norm, clip_learning_rate=clip_learning_rate, ledger_name=ledger_name,
                         **kwargs)
        if self.keep_fraction != 1.0:
            raise PrivacyConfigError(
                f"SitePolicyFilter releases dense updates (keep_fraction 1), got keep_fraction={self.keep_fraction}"
            )
        self._last_release: tuple | None = None  # (job key, round, digest) of the last release

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            rc = shareable.get_return_code()
            try:
                dxo = from_shareable(shareable) if rc == ReturnCode.OK else None
            except Exception:
                dxo = None
            action, reason = classify_result(
                rc == ReturnCode.OK, None if dxo is None else dxo.data_kind, None if dxo is None else dxo.data
            )
            if action == FORWARD_ERROR:
                return make_reply(rc)
            if action == PASS_METRICS:
                return self._reply(shareable, DXO(data_kind=DataKind.METRICS, data=plain_metrics(dxo.data)))
            if action != PROTECT:
                self.log_error(fl_ctx, f"site privacy policy: refusing the result of task "
                                       f"{fl_ctx.get_prop(FLContextKey.TASK_NAME)!r}: {reason}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            with self._lock:
                out = self._protect(shareable, fl_ctx)
                released = from_shareable(out)
                self._last_release = (self._run_key, int(shareable.get_header(AppConstants.CURRENT_ROUND)),
                                      release_digest(released.data, released.meta))
            return out
        except BudgetExhausted as e:
            self.log_error(fl_ctx, f"site privacy policy: the site's budget refuses this release: {e}")
        except Exception as e:  # fail closed on anything else
            self.log_exception(fl_ctx, f"site privacy policy failed; nothing is released: {e}")
        return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def confirm_release(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """What a job's own ADPFilter sends after this filter: the verified release, unchanged.

        Raises PrivacyError when the result is not this filter's recorded release."""
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            return make_reply(rc)
        dxo = from_shareable(shareable)
        with self._lock:
            check_site_release(self._last_release, release_digest(dxo.data, dxo.meta),
                               shareable.get_header(AppConstants.CURRENT_ROUND), self._ledger_path)
        return shareable


def site_policy_filter(fl_ctx: FLContext) -> SitePolicyFilter | None:
    """The site policy filter of the job's privacy scope (set by FLARE, not by the job), if any."""
    scope = fl_ctx.get_prop(FLContextKey.SCOPE_OBJECT)
    filters = getattr(scope, "task_result_filters", None) or {}
    for f in filters.get(FilterKey.OUT, []):
        if isinstance(f, SitePolicyFilter):
            return f
    return None


def defer_to_site_policy(job_filter: ADPFilter, shareable: Shareable, fl_ctx: FLContext) -> Shareable | None:
    """For a job's ADPFilter: None when no site policy is active (the job's filter protects
    the result itself), else the site's verified release (PrivacyError if it is not one)."""
    site = site_policy_filter(fl_ctx)
    if site is None or site is job_filter:
        return None
    if not getattr(job_filter, "_deferral_logged", False):
        job_filter._deferral_logged = True
        job_filter.log_info(fl_ctx, "the site's privacy scope protects this job's results with the site's own "
                                    "filter and budget; this job's ADPFilter settings are superseded (no second "
                                    "noise, no second spend)")
    return site.confirm_release(shareable, fl_ctx)


def privacy_json_document(target_epsilon: float, planned_rounds: int, delta: float = 1e-5, clip_norm: float = 1.0,
                          scope: str = PRIVATE_SCOPE, **filter_args) -> dict:
    """The ``local/privacy.json`` of a site enforcing its policy (validated before it is returned)."""
    args = dict(mode="dpfl", target_epsilon=float(target_epsilon), delta=float(delta),
                planned_rounds=int(planned_rounds), clip_norm=float(clip_norm), ledger_name=SITE_LEDGER_NAME)
    args.update(filter_args)
    SitePolicyFilter(**args)  # a bad setting fails here, naming it, not at the site's first job
    path = f"{SitePolicyFilter.__module__}.{SitePolicyFilter.__name__}"
    return {
        "scopes": [{"name": scope, "task_result_filters": [{"path": path, "args": args}]}],
        "default_scope": scope,
    }


def write_privacy_json(site_dir: str, target_epsilon: float, planned_rounds: int, **kwargs) -> Path:
    """Write ``<site_dir>/local/privacy.json`` (see :func:`privacy_json_document`)."""
    target = Path(site_dir) / "local" / PRIVACY_JSON
    if not target.parent.is_dir():
        raise ValueError(f"{site_dir} has no local/ folder; is it a site's startup kit?")
    write_json_atomic(target, privacy_json_document(target_epsilon, planned_rounds, **kwargs))
    return target
