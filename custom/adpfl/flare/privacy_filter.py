"""Client-side task-result filter: the ADP pipeline on every outgoing update.

A thin FLARE adapter over :class:`adpfl.privacy.PrivacyPipeline`
(sparsify -> clip -> noise, accounted in the site's own ledger on disk).

Fails closed: whatever goes wrong (bad result, wrong data kind, non-finite values,
budget exhausted, ledger not writable, device error), the reply that leaves the site
carries no model data at all, only an error code. The clean update never leaves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from adpfl._io import write_json_atomic
from adpfl.flare.site_config import is_simulation, read_site_config, resolve_ledger_dir
from adpfl.privacy.config import PrivacyConfig
from adpfl.privacy.errors import BudgetExhausted, PrivacyConfigError
from adpfl.privacy.ledger import PrivacyLedger
from adpfl.privacy.metadata import PRIVACY_META_KEY, RECORD_PRIVACY_META_KEY, public_record_meta
from adpfl.privacy.pipeline import PrivacyPipeline
from adpfl.privacy.public_signals import PUBLIC_INFO_PROP

_D = PrivacyConfig()  # the defaults of every privacy setting (one source: adpfl.privacy.config)


class ADPFilter(DXOFilter):
    #: True only for the site's own filter attached by its privacy scope (SitePolicyFilter)
    enforced_by_site = False

    def __init__(
        self,
        mode: str = _D.mode,
        target_epsilon: float | None = _D.target_epsilon,
        delta: float = _D.delta,
        planned_rounds: int | None = _D.planned_rounds,
        keep_fraction: float = _D.keep_fraction,
        mask_policy: str = _D.mask_policy,
        clip_norm: float = _D.clip_norm,
        clip_percentile: float = _D.clip_percentile,
        clip_learning_rate: float = _D.clip_learning_rate,
        clip_indicator_noise: float = _D.clip_indicator_noise,
        clip_min: float = _D.clip_min,
        clip_max: float = _D.clip_max,
        noise_multiplier: float | None = _D.noise_multiplier,
        noise_type: str = _D.noise_type,
        noise_min_factor: float = _D.noise_min_factor,
        noise_max_factor: float = _D.noise_max_factor,
        accountant: str = _D.accountant,
        track_prv: bool = _D.track_prv,
        ledger_name: str = "privacy_ledger",
        ledger_dir: str = "",
        device: str = "auto",
    ):
        """The site's privacy policy for outgoing updates.

        Args:
            mode ... track_prv: the settings of :class:`adpfl.privacy.config.PrivacyConfig`,
                under the same names, with its defaults, units and validation (see its field
                metadata and the README's privacy settings table).
            ledger_name: the ledger's file name (one ledger per site and dataset).
            ledger_dir: where the ledger lives (default: the site's workspace; the site's
                ``local/adpfl_site.json`` or ``ADPFL_LEDGER_DIR`` override it).
            device: where the pipeline runs ("auto": the GPU when there is one).

        Raises:
            PrivacyConfigError: a bad setting, naming it (the job stops at start-up).
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        # stored under the argument names: the constructor arguments are the job-config surface
        self.mode = mode
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.planned_rounds = planned_rounds
        self.keep_fraction = keep_fraction
        self.mask_policy = mask_policy
        self.clip_norm = clip_norm
        self.clip_percentile = clip_percentile
        self.clip_learning_rate = clip_learning_rate
        self.clip_indicator_noise = clip_indicator_noise
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.noise_multiplier = noise_multiplier
        self.noise_type = noise_type
        self.noise_min_factor = noise_min_factor
        self.noise_max_factor = noise_max_factor
        self.accountant = accountant
        self.track_prv = track_prv
        self.ledger_name = ledger_name
        self.ledger_dir = ledger_dir
        self.device = device
        if not ledger_name or os.sep in ledger_name or ledger_name.startswith("."):
            raise PrivacyConfigError(f"ledger_name must be a plain file name, got {ledger_name!r}")
        if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
            raise PrivacyConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        # validated now: a bad privacy setting stops the job at start-up, naming the setting
        self._config = self._make_config(target_epsilon).validate()
        self._pipeline: PrivacyPipeline | None = None
        self._generator_factory = None  # production: OS entropy per release (tests inject one)
        self._ledger_path: str | None = None
        self._state_path: str | None = None
        self._cache = None  # (job_id, round, DXO) of the last release, resent on a retry
        self._lock = threading.Lock()

    def _make_config(self, target_epsilon) -> PrivacyConfig:
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(PrivacyConfig)}
        settings["target_epsilon"] = target_epsilon
        return PrivacyConfig(**settings)

    # ------------------------------------------------------------------ FLARE entry
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Never returns the clean update: either the protected release or an empty error reply."""
        try:
            if not self.enforced_by_site:
                # a site whose privacy scope already protected this result: pass its verified
                # release on, never noise and spend a second time (adpfl.flare.site_policy)
                from adpfl.flare.site_policy import defer_to_site_policy

                deferred = defer_to_site_policy(self, shareable, fl_ctx)
                if deferred is not None:
                    return deferred
            with self._lock:
                return self._protect(shareable, fl_ctx)
        except BudgetExhausted as e:
            self.log_error(fl_ctx, f"privacy budget: refusing to release this round's update: {e}")
        except Exception as e:  # fail closed on anything else
            self.log_exception(fl_ctx, f"privacy pipeline failed; nothing is released this round: {e}")
        return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):  # pragma: no cover - unused
        raise RuntimeError("ADPFilter handles whole shareables in process()")

    # ------------------------------------------------------------------ pipeline
    def _setup(self, fl_ctx: FLContext) -> None:
        if self._pipeline is not None:
            return
        site = fl_ctx.get_identity_name()
        ws = fl_ctx.get_engine().get_workspace() if fl_ctx.get_engine() else None
        ws_root = ws.get_root_dir() if ws is not None else None
        site_cfg = read_site_config(ws_root)
        target = self.target_epsilon
        site_cap = site_cfg.get("max_epsilon")
        if site_cap is not None:
            # the site's own cap wins over a job asking for more (or setting no budget at all)
            target = float(site_cap) if target is None else min(float(target), float(site_cap))
        config = self._make_config(target).validate()
        folder = os.path.join(resolve_ledger_dir(self.ledger_dir, ws_root, is_simulation(fl_ctx)), site)
        os.makedirs(folder, exist_ok=True)
        self._ledger_path = os.path.join(folder, f"{self.ledger_name}.json")
        ledger = PrivacyLedger.load_or_create(self._ledger_path, delta=config.delta, target_epsilon=target)
        self._pipeline = PrivacyPipeline(
            config, ledger, ledger_path=self._ledger_path, generator_factory=self._generator_factory
        )
        # the key releases are accounted under: FLARE's job id, except in the simulator, whose
        # job id is always "simulate_job" (every simulator run in a workspace would collide)
        job_id = fl_ctx.get_job_id()
        self._run_key = f"{job_id}@{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}" if is_simulation(fl_ctx) else job_id
        self._state_path = os.path.join(folder, f"{self.ledger_name}.state.json")
        self._state_checked = False
        spent = ledger.epsilon() if ledger.entries else 0.0
        self.log_info(
            fl_ctx,
            f"{site}: privacy ledger {self._ledger_path} ({len(ledger.entries)} earlier releases, epsilon "
            f"{spent:.4g} of {target} at delta={config.delta}); {self._pipeline.describe()}",
        )

    def _load_state(self, current_round: int, fl_ctx: FLContext) -> None:
        """Continue the adaptive clip/noise state (post-processing of earlier releases) when
        this process continues a run: the same run restarted, or a resumed run (first
        round > 0). A run starting at round 0 starts fresh."""
        self._state_checked = True
        if not os.path.exists(self._state_path):
            return
        with open(self._state_path) as f:
            saved = json.load(f)
        same_run = saved.get("run_key") == self._run_key
        if not (same_run or current_round > 0):
            return
        if (saved.get("state") or {}).get("mode") != self.mode:
            self.log_info(fl_ctx, f"{self._state_path} holds the state of a {saved.get('state', {}).get('mode')} run; "
                                  "starting this run's adaptive state fresh")
            return
        self._pipeline.load_state_dict(saved["state"])
        self.log_info(fl_ctx, f"continuing the adaptive privacy state of run {saved.get('run_key')} "
                              f"(last released round {saved.get('round')}) from {self._state_path}")

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _protect(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            # pass the error on, but never any content the executor may have attached
            return make_reply(rc)
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise PrivacyConfigError(f"only WEIGHT_DIFF updates can be released privately, got {dxo.data_kind}")
        if not dxo.data:
            raise ValueError("the update to release is empty")
        self._setup(fl_ctx)
        job_id = self._run_key
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        if current_round is None:
            raise ValueError("the task carries no current_round header; cannot account the release")
        current_round = int(current_round)
        if not self._state_checked:
            self._load_state(current_round, fl_ctx)
        if self._cache is not None and self._cache[:2] == (job_id, current_round):
            # the same round asked again (retry): resend the same noisy release, spend nothing more
            self.log_warning(fl_ctx, f"round {current_round} was already released; resending the same release")
            return self._reply(shareable, self._cache[2])

        device = self._device()
        update = {}
        for k, v in dxo.data.items():
            arr = np.asarray(v)
            if not np.issubdtype(arr.dtype, np.floating):
                raise PrivacyConfigError(f"update entry {k!r} has non-float dtype {arr.dtype}; cannot be noised")
            update[k] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)
        public = fl_ctx.get_prop(PUBLIC_INFO_PROP) or {}
        public_scores = None
        if public.get("public_scores") is not None:
            public_scores = {k: torch.as_tensor(v) for k, v in public["public_scores"].items()}
        sparse, meta = self._pipeline.release_sparse(
            update,
            current_round,
            public_scores=public_scores,
            global_change=public.get("global_change"),
            job_id=job_id,
        )
        write_json_atomic(self._state_path,
                          {"run_key": job_id, "round": current_round, "state": self._pipeline.state_dict()},
                          default=_json_default)
        out_meta = {
            # equal weights in private jobs: the true local step count stays at the site
            MetaKey.NUM_STEPS_CURRENT_ROUND: 1,
            PRIVACY_META_KEY: {k: _plain(v) for k, v in meta.items()},
        }
        record = dxo.get_meta_prop(RECORD_PRIVACY_META_KEY)
        if record is not None:
            # DP-SGD's record-level accounting travels on, rebuilt from its schema's public
            # fields only (anything else under the key would leave un-noised); invalid: error reply
            out_meta[RECORD_PRIVACY_META_KEY] = public_record_meta(record)
        initial = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
        if initial is not None:
            out_meta[MetaKey.INITIAL_METRICS] = float(initial)
        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=_wire_data(sparse), meta=out_meta)
        self._cache = (job_id, current_round, out)
        self.log_info(
            fl_ctx,
            f"released round {current_round}: z={meta['noise_multiplier']:.4g}, C={meta['clip_norm']:.4g}, "
            f"keep={meta['keep_fraction']:.3g} ({meta['mask_policy']}), epsilon_rdp={meta['epsilon_rdp']:.4g} "
            f"at delta={meta['delta']}",
        )
        return self._reply(shareable, out)

    @staticmethod
    def _reply(original: Shareable, dxo: DXO) -> Shareable:
        """A fresh shareable holding only the protected DXO plus the original's headers
        (routing information such as the round and task id; headers carry no model data)."""
        reply = dxo.to_shareable()
        for key, value in (original.get(ReservedHeaderKey.HEADERS) or {}).items():
            reply.set_header(key, value)
        reply.set_return_code(ReturnCode.OK)
        return reply


def _wire_data(sparse) -> dict:
    """DXO data of a release: the sparse wire format (adpfl.flare.sparse, densified by the
    server's SparseDensifyFilter) when coordinates were dropped and it is smaller, else dense."""
    from adpfl.flare.sparse import encode_release, payload_nbytes
    from adpfl.privacy.mechanisms import unflatten_update

    numel = sparse.spec.numel
    if sparse.indices.numel() < numel:
        data = encode_release(sparse)
        if payload_nbytes(data) < numel * sparse.values.element_size():
            return data
        dense = sparse.to_dense()
    else:
        dense = unflatten_update(sparse.values, sparse.spec)
    return {k: v.detach().to("cpu").numpy() for k, v in dense.items()}


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"cannot store {type(o)} in the privacy state file")
