"""Helpers for tests that run real `nvflare simulator` processes on tiny synthetic data."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from adpfl.flare.jobs import export_job
from adpfl.flare.simulator import nvflare_bin, result_dir, simulator_command, simulator_env  # noqa: F401 (nvflare_bin: for tests)

# tiny, fast CPU settings shared by every integration test
TINY_EXECUTOR = {
    "num_train": 6,
    "num_val": 3,
    "image_size": 32,
    "local_epochs": 1,
    "batch_size": 3,
}


def run_simulator(job_dir: Path, workspace: Path, data_root: Path, n_sites: int = 3, extra_env=None, timeout=600):
    env = simulator_env(n_sites, {"ADPFL_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1", **(extra_env or {})})
    cmd = simulator_command(job_dir, workspace, n_sites)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_job(tmp_path: Path, task: str, mode: str, num_rounds: int = 2, executor=None, privacy=None, **more) -> Path:
    overrides = {"num_rounds": num_rounds, "executor": dict(TINY_EXECUTOR, **(executor or {})), **more}
    if privacy:
        overrides["privacy"] = privacy
    return Path(export_job(task, mode, str(tmp_path / "jobs"), **overrides))


def inject_faults(job_dir: Path, faults: str) -> Path:
    """Make ``job_dir``'s sites run the test-only ``FaultInjectingExecutor`` (tests/fault_components.py)
    with ``faults`` ("<site>:<fault>[:<round>]", comma-separated). The module is copied into the
    job's ``app/custom/`` folder, which FLARE puts on the site processes' ``sys.path``."""
    app = Path(job_dir) / "app"
    shutil.copy(Path(__file__).with_name("fault_components.py"), app / "custom" / "fault_components.py")
    cfg_path = app / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    executor = cfg["executors"][0]["executor"]
    assert executor["path"] == "adpfl.flare.executor.SegmentationExecutor", executor["path"]
    executor["path"] = "fault_components.FaultInjectingExecutor"
    executor["args"]["faults"] = faults
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return Path(job_dir)


def run_dir(workspace: Path) -> Path:
    return result_dir(workspace)


def read_scalars(tb_dir: Path) -> dict:
    """All scalar series under ``tb_dir`` as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def logs(workspace: Path) -> str:
    text = []
    for p in sorted(workspace.rglob("log.txt")):
        text.append(p.read_text(errors="replace"))
    return "\n".join(text)


def load_json(p: Path):
    return json.loads(p.read_text())
