"""``adpfl export``: a run's final global model as a MONAI bundle carrying its privacy card.

    <out>/configs/metadata.json   MONAI bundle metadata + "privacy_card"
    <out>/configs/inference.json  network, preprocessing, inferer, postprocessing (ConfigParser)
    <out>/models/model.pt         the state dict of adpfl.tasks.network.TaskNetwork
    <out>/docs/README.md          the card in words

The card is copied from the run, not restated: every epsilon, delta, accountant, unit and
the "not covered" list come from the run's ``privacy_report.json`` (written by the server's
privacy widget, whose "not covered" list is :data:`adpfl.privacy.policy.UNCOVERED`), the
rounds, sites and settings from its ``run_progress.json``. MONAI's bundle format and
``ConfigParser`` do the packaging and loading; only the card's layout is this module's.
"""

from __future__ import annotations

import os
from pathlib import Path

from adpfl._io import read_json, write_json_atomic

CARD_FORMAT = "adpfl-privacy-card/1"
MODEL_FILE = "FL_global_model.pt"


class ExportError(ValueError):
    """Why a run cannot be exported (names the folder or file)."""


def find_run_dir(path: str | os.PathLike) -> Path:
    """The server run folder at ``path``: the folder itself when it holds ``app_server/``,
    else the simulator run in the workspace ``path`` (either simulator layout)."""
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"--run {p} is not a folder")
    if (p / "app_server").is_dir():
        return p
    from adpfl.flare.simulator import result_dir

    try:
        return result_dir(p)
    except FileNotFoundError as e:
        raise ExportError(f"--run {p}: not a run folder (no app_server/) and {e}") from None


def inference_transforms(task: str, image_size):
    """The task's validation transforms for an image without a label: every dictionary
    transform skips the keys a case does not have (MONAI's ``allow_missing_keys``)."""
    from monai.transforms import MapTransform

    from adpfl.tasks.base import get_task

    chain = get_task(task).val_transforms(image_size)
    for t in chain.flatten().transforms:
        if isinstance(t, MapTransform):
            t.allow_missing_keys = True
    return chain


def privacy_card(report: dict | None, progress: dict, task: str, mode: str) -> dict:
    """The privacy card of a run from its privacy report and progress record (verbatim
    figures; nothing recomputed)."""
    from adpfl.privacy.policy import UNCOVERED

    settings = progress.get("settings") or {}
    executor = settings.get("executor") or {}
    last = progress.get("last_completed_round")
    card = {
        "format": CARD_FORMAT,
        "task": task,
        "mode": mode,
        "rounds": {"planned": progress.get("num_rounds"),
                   "completed": None if last is None else int(last) + 1,
                   "start_round": progress.get("start_round", 0),
                   "stopped_early": bool((report or {}).get("stopped_early")),
                   "stop_reason": (report or {}).get("stop_reason")},
        "sites": sorted(set(settings.get("sites") or []) | set((report or {}).get("sites") or {})
                        | set(((report or {}).get("record_level") or {}).get("sites") or {})),
        "data": _data_description(task, executor),
    }
    if not report:
        card.update(units=[], epsilon_per_site={}, delta={}, accountants={},
                    mechanism={"privacy": "none: this run trained without differential privacy"},
                    not_covered=["everything: no differential privacy was applied"] + list(UNCOVERED))
        return card
    units, eps, delta, accountants, target = [], {}, {}, {}, {}
    mechanism = {"job_settings": settings.get("privacy"),
                 "noise_type": report.get("noise_type"),
                 "noise_multiplier_convention": report.get("noise_multiplier_convention"),
                 "seeded_noise": report.get("seeded_noise"),
                 "mask_not_covered_sites": report.get("mask_not_covered_sites")}
    if report.get("update_level", True):
        units.append({"level": "update", "unit": report["unit"]})
        eps["update_level"] = {s: {k: i.get(k) for k in ("epsilon_rdp", "epsilon_prv", "epsilon_exact", "releases")}
                               for s, i in report["sites"].items()}
        delta["update_level"] = report["delta"]
        target["update_level"] = report.get("target_epsilon")
        accountants["update_level"] = report.get("accountants")
        mechanism["last_release_per_site"] = {
            s: {k: i["ledger"][-1].get(k) for k in ("mechanism", "noise_multiplier", "update_noise_multiplier",
                                                    "clip_norm", "keep_fraction", "mask_policy")}
            for s, i in report["sites"].items() if i.get("ledger")}
    rec = report.get("record_level")
    if rec:
        units.append({"level": "record", "unit": rec["unit"]})
        eps["record_level"] = {s: {k: i.get(k) for k in ("epsilon_rdp", "steps")} for s, i in rec["sites"].items()}
        delta["record_level"] = rec["delta"]
        target["record_level"] = rec.get("target_epsilon")
        accountants["record_level"] = rec.get("accountant")
        mechanism["dpsgd_per_site"] = {s: {k: i.get(k) for k in ("noise_multiplier", "sample_rate", "max_grad_norm",
                                                                  "steps_per_round")}
                                       for s, i in rec["sites"].items()}
        mechanism["dpsgd_settings"] = {k: v for k, v in executor.items() if k.startswith("dpsgd")}
    card.update(units=units, units_note=report.get("units_note"), epsilon_per_site=eps, delta=delta,
                target_epsilon=target, accountants=accountants, mechanism=mechanism,
                rejected_contributions=report.get("rejected_contributions"),
                not_covered=report.get("not_covered") or list(UNCOVERED))
    return card


def _data_description(task: str, executor: dict) -> dict:
    import importlib

    from adpfl.tasks.base import get_task

    t = get_task(task)
    doc = (importlib.import_module(f"adpfl.tasks.{task}").__doc__ or "").strip().splitlines()
    return {"task": doc[0] if doc else task,
            "channels": list(t.channel_names),
            "labels": {str(k): v for k, v in t.label_names.items()},
            "regions": {k: list(v) for k, v in t.regions.items()},
            "image_size": list(t.resolve_size(executor.get("image_size"))),
            "cases_per_site": {"train": executor.get("num_train"), "validation": executor.get("num_val")},
            "note": "each site's data stays at the site (its data_root, see the README); the server "
                    "never sees which files a site trained on, so the card names the job's settings only"}


def _inference_config(task: str, image_size: list[int]) -> dict:
    from adpfl.tasks.base import get_task

    t = get_task(task)
    if t.patch_size:
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": list(t.patch_size), "sw_batch_size": 4,
                   "overlap": 0.25}
    else:
        inferer = {"_target_": "SimpleInferer"}
    return {
        "imports": ["$import torch", "$from adpfl.experiments.bundle import inference_transforms"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "task": task,
        "image_size": image_size,
        "network_def": {"_target_": "adpfl.tasks.network.TaskNetwork", "task": "@task"},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "preprocessing": "$inference_transforms(@task, @image_size)",
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }


def export_bundle(run: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the bundle of the run at ``run`` into ``out``; returns the metadata written."""
    import monai
    import numpy
    import torch

    from adpfl.tasks.network import TaskNetwork

    rd = find_run_dir(run)
    progress_path = rd / "run_progress.json"
    if not progress_path.is_file():
        raise ExportError(f"{progress_path} missing: not an adpfl run folder, or no round completed")
    progress = read_json(progress_path)
    task, mode = progress.get("task"), progress.get("mode")
    if not task or not mode:
        raise ExportError(f"{progress_path} does not name the task and mode")
    model_path = rd / "app_server" / MODEL_FILE
    if not model_path.is_file():
        raise ExportError(f"{model_path} missing: the run saved no global model")
    report_path = rd / "privacy_report.json"
    report = read_json(report_path) if report_path.is_file() else None
    if report is None and mode != "npfl":
        raise ExportError(f"{report_path} missing: a {mode} run's model does not leave without its privacy report")

    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    weights = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(weights, dict):
        raise ExportError(f"{model_path} holds no 'model' state dict")
    state = {k: torch.as_tensor(v) for k, v in weights.items()}
    net = TaskNetwork(task=task)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"{model_path} does not hold a {task} network: {e}") from None

    card = privacy_card(report, progress, task, mode)
    card["source"] = {"run_dir": str(rd), "privacy_report": str(report_path) if report else None,
                      "model": str(model_path), "job_id": progress.get("job_id")}
    image_size = card["data"]["image_size"]
    spatial = "x".join(str(s) for s in image_size)
    from adpfl.tasks.base import get_task

    t = get_task(task)
    meta = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by adpfl export from {rd}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"adpfl": "see requirements.txt of the adpfl repository"},
        "name": f"adpfl_{task}_{mode}",
        "task": f"{card['data']['task']} (federated, {mode})",
        "description": f"final global model of a {mode} federated run of {task} ({len(card['sites'])} sites); "
                       "its privacy_card says what privacy it was trained under and what that does not cover",
        "authors": "adpfl export",
        "copyright": "see the data's licences at each site",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": t.in_channels,
                                 "spatial_shape": image_size, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": bool(t.patch_size), "channel_def": dict(enumerate(t.channel_names))}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": t.num_classes,
                                 "spatial_shape": image_size, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": bool(t.patch_size),
                                 "channel_def": {str(k): v for k, v in t.label_names.items()}}},
        },
        "privacy_card": card,
    }
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    torch.save(net.state_dict(), out / "models" / "model.pt")
    write_json_atomic(str(out / "configs" / "inference.json"), _inference_config(task, image_size), indent=2)
    write_json_atomic(str(out / "configs" / "metadata.json"), meta, indent=2)
    (out / "docs" / "README.md").write_text(card_text(card, spatial))
    return meta


def card_text(card: dict, spatial: str = "") -> str:
    """The card in words (docs/README.md of the bundle)."""
    lines = [f"# {card['task']} / {card['mode']}: privacy card", ""]
    if not card["units"]:
        lines.append("Trained without differential privacy.")
    for u in card["units"]:
        level = u["level"] + "_level"
        lines.append(f"- unit ({u['level']}-level): {u['unit']}")
        lines.append(f"  delta {card['delta'][level]}, target epsilon {card['target_epsilon'][level]}, "
                     f"accountant(s): {card['accountants'][level]}")
        for site, e in sorted(card["epsilon_per_site"][level].items()):
            lines.append(f"  - {site}: epsilon (RDP) {e['epsilon_rdp']}")
    r = card["rounds"]
    lines += ["", f"Rounds: {r['completed']} of {r['planned']} planned; sites: {', '.join(card['sites'])}; "
              f"image size {spatial}.", "", "Not covered:"] + [f"- {x}" for x in card["not_covered"]]
    return "\n".join(lines) + "\n"


def cmd_export(args) -> int:
    try:
        meta = export_bundle(args.run, args.out)
    except ExportError as e:
        raise ValueError(str(e)) from None
    card = meta["privacy_card"]
    print(f"wrote MONAI bundle {args.out} ({meta['name']}): configs/metadata.json (privacy_card), "
          f"configs/inference.json, models/model.pt")
    for u in card["units"]:
        level = u["level"] + "_level"
        eps = ", ".join(f"{s} {e['epsilon_rdp']:.4g}" for s, e in sorted(card["epsilon_per_site"][level].items()))
        print(f"  {u['level']}-level epsilon (RDP, delta={card['delta'][level]}): {eps}")
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="write a run's final global model as a MONAI bundle with its privacy card")
    e.add_argument("--run", required=True, help="the run folder (or the workspace of a simulator run)")
    e.add_argument("--out", required=True, help="the bundle folder to write")
    e.set_defaults(func=cmd_export)
