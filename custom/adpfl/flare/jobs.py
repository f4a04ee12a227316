"""The one definition of every FLARE job in this bundle (Job API: ``FedJob``).

``jobs/<task>_<mode>`` folders are exported from here (``adpfl jobs export``) and a test
checks that the checked-in folders equal a fresh export, so the task x mode jobs cannot
drift apart. The same ``FedJob`` objects run directly through the Job API
(``build_job(...).simulator_run(...)``, see ``adpfl run --job-api``).

Every number a user can set reaches the components as their constructor arguments. The
executor's settings start from the registry's defaults (:mod:`adpfl.settings`, i.e. the
config dataclasses); ``TASK_DEFAULTS`` / ``MODE_EXECUTOR`` below list only what a task or a
mode sets differently, and ``MODE_DEFAULTS`` the privacy filter's settings per mode.
"""

from __future__ import annotations

import copy
import os
import tempfile

#: per-task federation, local-training and task-specific privacy settings
#: (simulator defaults sized for a CPU machine; raise image_size/epochs on a GPU)
TASK_DEFAULTS: dict[str, dict] = {
    "skin2d": {
        "num_rounds": 5,
        "min_clients": 3,
        # the data_size preset's cases (tiny: 40 / 20), 2 local epochs of batch 8 at the task's default size
        "executor": {"task": "skin2d", "learning_rate": 0.002},
        # update norms of this UNet after 2 local epochs: about 5 (round 1) falling to 1.5
        "privacy": {"clip_norm": 2.0},
    },
    # both 3D tasks: the data_size preset's cases per site (tiny: 8/4 at 64^3, 48^3 patches)
    **{
        task: {
            "num_rounds": 5,
            "min_clients": 3,
            "executor": {
                "task": task,
                "local_epochs": 5,
                "batch_size": 2,
                "learning_rate": 0.002,
            },
            "privacy": {"clip_norm": 2.0},
        }
        for task in ("kidney3d", "brain3d")
    },
}

#: privacy settings per mode (None = no privacy filter). Units: site-level update DP,
#: replace-one, sensitivity 2 * clip_norm, delta per site, sample rate 1 per round.
#: DP-FL and ADP-FL share one target epsilon so they are compared at equal accounted
#: privacy. The figure is large because update-level DP on a whole UNet update needs
#: z ~ 1e-3 to keep the update useful (see README, "Privacy guarantees").
MODE_DEFAULTS: dict[str, dict | None] = {
    "npfl": None,
    "dpfl": {
        "mode": "dpfl",
        "target_epsilon": 1.0e5,
        "delta": 1e-5,
        "keep_fraction": 1.0,
        "noise_multiplier": None,  # None = calibrated from target_epsilon over planned_rounds
        "clip_learning_rate": 0.0,
        "noise_type": "gaussian",
    },
    "adpfl": {
        "mode": "adpfl",
        "target_epsilon": 1.0e5,
        "delta": 1e-5,
        "keep_fraction": 0.5,
        "mask_policy": "topk_public",
        "clip_percentile": 0.5,
        "clip_learning_rate": 0.2,
        "clip_indicator_noise": 1.0,
        "noise_min_factor": 0.5,
        "noise_max_factor": 1.5,
        "noise_type": "gaussian",
    },
    # no update-level filter: the executor trains with record-level DP-SGD (MODE_EXECUTOR)
    "dpsgd": None,
    "adpsgd": None,
}

#: executor settings per mode: record-level DP-SGD (Opacus) for "dpsgd". Unit: one training
#: image/patient of a site, add/remove-one, Poisson sampling; the budget is the site's,
#: cumulative over every DP-SGD job on its data (record-level ledger in the site workspace).
MODE_EXECUTOR: dict[str, dict] = {
    # delta, clip and z (None: calibrated over the job's rounds) are DPSGDConfig's defaults;
    # the network is the standard UNet (the registry's default): with the hand-written per-sample
    # gradients (adpfl.training.grad_samplers) its DP-SGD step is 1.8-2.2x the plain step, and the
    # `dp` variant learned unreliably in NP-FL (skin2d seed 2: 0.50 vs 0.88; brain3d 0.50 vs 0.71;
    # docs/benchmarks.md, "DP-SGD step vs plain step")
    "dpsgd": {"dpsgd": True, "dpsgd_target_epsilon": 8.0},
    # ADP-SGD: the same record-level budget and ledger, with adaptive clipping (Andrew et al.)
    # and the progress-driven noise schedule (adpfl.privacy.record_adaptive)
    "adpsgd": {"dpsgd": True, "dpsgd_adaptive": True, "dpsgd_target_epsilon": 8.0},
}


BYOC_NOTE = (
    "This folder is intentionally (almost) empty.\n"
    "The adpfl package is installed at each site (pip install -r requirements.txt);\n"
    "a custom/ folder marks the job as carrying custom code (BYOC), which lets FLARE\n"
    "instantiate adpfl.* classes without a site allow-list. Sites that refuse custom code\n"
    "allow-list the installed package instead (see README, 'Deploy to real sites').\n"
)


def job_name(task: str, mode: str) -> str:
    return f"{task}_{mode}"


def job_settings(task: str, mode: str, **overrides) -> dict:
    """Full settings of one job: task defaults, mode defaults, then ``overrides``.

    ``overrides`` may name top-level keys (``num_rounds``, ``min_clients``) or
    ``executor`` / ``privacy`` dicts whose keys replace the defaults one by one.
    """
    if task not in TASK_DEFAULTS:
        raise ValueError(f"task must be one of {tuple(TASK_DEFAULTS)}, got {task!r}")
    if mode not in MODE_DEFAULTS:
        raise ValueError(f"mode must be one of {tuple(MODE_DEFAULTS)}, got {mode!r}")
    from adpfl.settings import defaults

    s = copy.deepcopy(TASK_DEFAULTS[task])
    s["executor"] = dict(defaults("executor"), **s["executor"])
    task_privacy = s.pop("privacy", {})
    privacy = copy.deepcopy(MODE_DEFAULTS[mode])
    if privacy is not None:
        privacy = dict(privacy, **task_privacy, planned_rounds=s["num_rounds"], ledger_name=task)
    s["privacy"] = privacy
    s["executor"].update(copy.deepcopy(MODE_EXECUTOR.get(mode, {})))
    if s["executor"].get("dpsgd"):
        s["executor"]["dpsgd_planned_rounds"] = s["num_rounds"]
    s["task"], s["mode"] = task, mode
    # seconds the final evaluation waits for each site's answer (a dead site must not hold
    # the run open for FLARE's default of 6000 s)
    s.setdefault("validation_timeout", 600)
    # seconds a round waits for the remaining sites once min_clients have answered (a round
    # ends at once when every site has answered; this only matters when a site is slow or gone)
    s.setdefault("wait_time_after_min_received", 10)
    # the federation's site names: each gets aggregation weight 1.0 (FLARE's aggregator
    # warns for every contribution from a site it has no weight for). None: site-1 ..
    # site-<min_clients>, the names of the simulator and of `adpfl poc`
    s.setdefault("sites", None)
    for key, value in overrides.items():
        if key in ("executor", "privacy") and isinstance(value, dict):
            if key == "privacy" and s["privacy"] is None:
                raise ValueError(f"mode {mode} has no privacy filter; privacy overrides {sorted(value)} do not apply")
            s[key].update(value)
        elif key in s:
            s[key] = value
        else:
            raise ValueError(f"unknown job setting {key!r}; known: {sorted(s)}")
    if (
        s["privacy"] is not None
        and "num_rounds" in overrides
        and "planned_rounds" not in (overrides.get("privacy") or {})
    ):
        s["privacy"]["planned_rounds"] = s["num_rounds"]
    ex = s["executor"]
    if (
        ex.get("dpsgd")
        and "num_rounds" in overrides
        and "dpsgd_planned_rounds" not in (overrides.get("executor") or {})
    ):
        ex["dpsgd_planned_rounds"] = s["num_rounds"]
    if s["sites"] is None:
        s["sites"] = [f"site-{i}" for i in range(1, int(s["min_clients"]) + 1)]
    if not (isinstance(s["sites"], (list, tuple)) and s["sites"] and all(isinstance(n, str) and n for n in s["sites"])):
        raise ValueError(f"sites must be a non-empty list of site names, got {s['sites']!r}")
    s["sites"] = list(s["sites"])
    return s


def build_job(task: str, mode: str, name: str | None = None, **overrides):
    """The FedJob of ``task`` x ``mode`` (components configured from ``job_settings``)."""
    from nvflare.apis.dxo import DataKind
    from nvflare.app_common.aggregators import InTimeAccumulateWeightedAggregator
    from nvflare.app_common.shareablegenerators import FullModelShareableGenerator
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
    from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
    from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
    from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.job_config.api import FedJob

    from adpfl.flare.executor import SegmentationExecutor
    from adpfl.flare.final_selection import FinalModelSelection
    from adpfl.flare.progress import RunProgressWidget
    from adpfl.flare.validation_widget import ContributionValidator
    from adpfl.tasks.network import TaskNetwork

    s = job_settings(task, mode, **overrides)
    update_private = s["privacy"] is not None
    record_private = bool(s["executor"].get("dpsgd"))
    private = update_private or record_private
    job = FedJob(name=name or job_name(task, mode), min_clients=s["min_clients"])
    job.set_app_packages(["adpfl"])

    # ---- server
    if s["executor"].get("initial_checkpoint"):  # the server may run elsewhere than the caller's folder
        s["executor"]["initial_checkpoint"] = os.path.abspath(s["executor"]["initial_checkpoint"])
    # the initial global model: drawn from the job's seed, or the public warm start (checked here and
    # again where the server builds it)
    network = _explicit(TaskNetwork(task=task, network=s["executor"]["network"], init_seed=s["executor"].get("seed"),
                                    initial_checkpoint=s["executor"].get("initial_checkpoint")))
    job.to_server(_explicit(PTFileModelPersistor(model=network)), id="persistor")
    job.to_server(_explicit(FullModelShareableGenerator()), id="shareable_generator")
    # private jobs weigh sites equally: the un-noised local step count must not steer aggregation
    job.to_server(
        _explicit(
            InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF, weigh_by_local_iter=not private,
                                               aggregation_weights={site: 1.0 for site in s["sites"]})
        ),
        id="aggregator",
    )
    job.to_server(_explicit(ContributionValidator()), id="contribution_validator")
    # records the last persisted round (run_progress.json) so a stopped run can be resumed
    job.to_server(
        _explicit(RunProgressWidget(task=task, mode=mode, num_rounds=s["num_rounds"], start_round=0,
                                    settings={k: s[k] for k in ("num_rounds", "min_clients", "sites", "executor",
                                                                "privacy")})),
        id="run_progress",
    )
    job.to_server(_explicit(IntimeModelSelector(key_metric="val_dice")), id="model_selector")
    job.to_server(_explicit(PTFileModelLocator(pt_persistor_id="persistor")), id="model_locator")
    job.to_server(_explicit(ValidationJsonGenerator()), id="json_generator")
    job.to_server(
        _explicit(TBAnalyticsReceiver(events=["fed.analytix_log_stats", "analytix_log_stats"])), id="tb_receiver"
    )
    if private:
        from adpfl.flare.privacy_widget import PrivacyAccountingWidget

        job.to_server(
            _explicit(PrivacyAccountingWidget(**_widget_args(s["privacy"], s["executor"]))), id="privacy_accountant"
        )
    if update_private:
        from adpfl.flare.sparse import SparseDensifyFilter

        # task-result filters run before the controller: sparse releases are densified (and
        # malformed ones rejected) before the widget and the aggregator see them
        job.to_server(_explicit(SparseDensifyFilter()), tasks=["train"], filter_type=_result_filter_type())
    job.to_server(
        _explicit(ScatterAndGather(
            min_clients=s["min_clients"],
            num_rounds=s["num_rounds"],
            wait_time_after_min_received=s["wait_time_after_min_received"],
            aggregator_id="aggregator",
            persistor_id="persistor",
            shareable_generator_id="shareable_generator",
            train_task_name="train",
            train_timeout=0,
            # a site that refuses to release (privacy budget, pipeline error) costs a round
            # of its contribution, not the run
            ignore_result_error=True,
        )),
        id="scatter_and_gather",
    )
    # the last aggregate is scored by the sites and enters the best-model selection (the
    # in-round selector never sees it): "best" is then the best model of the run
    job.to_server(
        _explicit(FinalModelSelection(persistor_id="persistor", model_selector_id="model_selector",
                                      validation_task_name="validate", validation_timeout=s["validation_timeout"])),
        id="final_model_selection",
    )
    job.to_server(
        _explicit(
            GlobalModelEval(
                model_locator_id="model_locator",
                validation_task_name="validate",
                validation_timeout=s["validation_timeout"],
            )
        ), id="global_eval"
    )

    # ---- clients
    job.to_clients(_explicit(SegmentationExecutor(**s["executor"])), tasks=["train", "validate"])
    job.to_clients(
        ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."), id="event_to_fed"
    )
    if update_private:
        from adpfl.flare.privacy_filter import ADPFilter

        job.to_clients(_explicit(ADPFilter(**s["privacy"])), tasks=["train"], filter_type=_result_filter_type())

    note = _byoc_note_file()
    job.add_file_to_server(note, app_folder_type="custom")
    job.add_file_to_clients(note, app_folder_type="custom")
    return job


def _explicit(obj):
    """Make the exported config list every constructor argument, defaults included, so a
    job folder shows all of its settings (FedJob otherwise drops default-valued ones)."""
    import inspect

    params = [p for p in inspect.signature(type(obj).__init__).parameters if p not in ("self", "args", "kwargs")]
    present = [p for p in params if p in obj.__dict__ or "_" + p in obj.__dict__]
    obj._always_serialize_args = tuple(present)
    return obj


def _byoc_note_file() -> str:
    """The placeholder that goes into each app's custom/ folder (copied at export time)."""
    folder = os.path.join(tempfile.gettempdir(), f"adpfl_byoc_{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "README_custom.txt")
    with open(path, "w") as f:
        f.write(BYOC_NOTE)
    return path


def _result_filter_type():
    from nvflare.job_config.defs import FilterType

    return FilterType.TASK_RESULT


def _widget_args(privacy: dict | None, executor: dict) -> dict:
    """The server's mirror of the sites' policy, including the least noise a site may
    claim (:func:`adpfl.privacy.policy.noise_floor`). DP-SGD sites are held to the
    record-level budget (their epsilon is recomputed by the widget)."""
    from adpfl.privacy.policy import noise_floor

    args = {}
    if executor.get("dpsgd"):
        args.update(record_level=True, record_target_epsilon=float(executor["dpsgd_target_epsilon"]),
                    record_delta=float(executor["dpsgd_delta"]))
    if privacy is None:
        args["update_level"] = False
        args["planned_rounds"] = int(executor.get("dpsgd_planned_rounds") or 0)
        return args
    args.update({k: privacy[k] for k in ("target_epsilon", "delta", "planned_rounds", "noise_type") if k in privacy})
    if privacy.get("noise_type", "gaussian") == "gaussian":
        args["min_noise_multiplier"] = noise_floor(privacy)
    return args


def export_job(task: str, mode: str, jobs_dir: str, **overrides) -> str:
    """Write ``<jobs_dir>/<task>_<mode>`` from the definition; returns its path."""
    job = build_job(task, mode, **overrides)
    os.makedirs(jobs_dir, exist_ok=True)
    job.export_job(jobs_dir)
    return os.path.join(jobs_dir, job.name)


def all_jobs():
    return [(t, m) for t in TASK_DEFAULTS for m in MODE_DEFAULTS]


def export_all(jobs_dir: str) -> list:
    return [export_job(t, m, jobs_dir) for t, m in all_jobs()]
