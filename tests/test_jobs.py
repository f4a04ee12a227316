"""The checked-in job folders are exactly what the one job definition exports."""

import filecmp
import json
from pathlib import Path

import pytest

from adpfl.flare.jobs import all_jobs, export_job, job_name, job_settings

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("task,mode", all_jobs())
def test_checked_in_job_matches_definition(task, mode, tmp_path):
    fresh = Path(export_job(task, mode, str(tmp_path)))
    checked_in = REPO / "jobs" / job_name(task, mode)
    assert checked_in.is_dir(), f"{checked_in} missing: run `adpfl jobs export`"
    assert _tree(fresh) == _tree(checked_in)
    for rel in _tree(fresh):
        a, b = fresh / rel, checked_in / rel
        if rel.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), (
                f"{checked_in / rel} differs from the job definition: run `adpfl jobs export`"
            )
        else:
            assert filecmp.cmp(a, b, shallow=False), rel


def test_no_stray_job_folders():
    expected = {job_name(t, m) for t, m in all_jobs()}
    present = {p.name for p in (REPO / "jobs").iterdir() if p.is_dir()}
    assert present == expected


def test_job_has_byoc_custom_folder_and_no_copied_code(tmp_path):
    fresh = Path(export_job("skin2d", "npfl", str(tmp_path)))
    custom = [p.name for p in (fresh / "app" / "custom").iterdir()]
    assert custom == ["README_custom.txt"], "adpfl code must come from the installed package, not be copied"


def test_job_settings_validation():
    with pytest.raises(ValueError, match="task must be one of"):
        job_settings("liver", "npfl")
    with pytest.raises(ValueError, match="mode must be one of"):
        job_settings("skin2d", "dp")
    with pytest.raises(ValueError, match="unknown job setting 'rounds'"):
        job_settings("skin2d", "npfl", rounds=3)
    s = job_settings("skin2d", "npfl", num_rounds=2, executor={"local_epochs": 1})
    assert s["num_rounds"] == 2 and s["executor"]["local_epochs"] == 1 and s["executor"]["task"] == "skin2d"
