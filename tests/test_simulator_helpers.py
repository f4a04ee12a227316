"""adpfl.flare.simulator: the one place that knows the simulator's command, environment
and result folders (used by `adpfl run`, `adpfl compare`, `adpfl run --resume` and tests)."""

import os
import sys

import pytest

from adpfl.cli import main
from adpfl.flare.resume import ResumeError, prepare_simulator_resume
from adpfl.flare.simulator import (
    last_started_round,
    nvflare_bin,
    result_dir,
    server_log,
    simulator_command,
    simulator_env,
)


def test_nvflare_bin_is_the_running_interpreters():
    assert nvflare_bin() == os.path.join(os.path.dirname(sys.executable), "nvflare")


def test_simulator_command_defaults_to_one_thread_per_site(tmp_path):
    cmd = simulator_command(tmp_path / "job", tmp_path / "ws", 3)
    assert cmd[1:] == ["simulator", str(tmp_path / "job"), "-w", str(tmp_path / "ws"), "-n", "3", "-t", "3"]
    assert simulator_command("j", "w", 4, threads=2)[-2:] == ["-t", "2"]


def test_simulator_env_shares_the_cores_and_keeps_the_users_setting(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert simulator_env(3, base={})["OMP_NUM_THREADS"] == "2"
    assert simulator_env(16, base={})["OMP_NUM_THREADS"] == "1"
    assert simulator_env(3, base={"OMP_NUM_THREADS": "5"})["OMP_NUM_THREADS"] == "5"
    env = simulator_env(2, {"OMP_NUM_THREADS": "1", "ADPFL_DATA_ROOT": "/d"}, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "ADPFL_DATA_ROOT": "/d"}


def test_result_dir_prefers_simulate_job_and_names_the_workspace_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "server")):
        result_dir(tmp_path)
    (tmp_path / "server" / "simulate_job_3").mkdir(parents=True)
    assert result_dir(tmp_path).name == "simulate_job_3"
    (tmp_path / "server" / "simulate_job_0").mkdir()
    assert result_dir(tmp_path).name == "simulate_job_0"
    (tmp_path / "server" / "simulate_job").mkdir()
    assert result_dir(tmp_path).name == "simulate_job"


def test_last_started_round_reads_the_server_log(tmp_path):
    assert server_log(tmp_path) is None and last_started_round(None) is None
    log = tmp_path / "server" / "simulate_job" / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("starting\n")
    assert last_started_round(server_log(tmp_path)) is None
    log.write_text("Round 0 started.\n...\nRound 1 started.\n")
    assert server_log(tmp_path) == log and last_started_round(log) == 1


def test_summary_and_resume_without_a_run_are_clear_errors(tmp_path, capsys):
    assert main(["summary", "-w", str(tmp_path)]) == 2
    assert f"no simulator run under {tmp_path / 'server'}" in capsys.readouterr().err
    with pytest.raises(ResumeError, match="nothing to resume"):
        prepare_simulator_resume(str(tmp_path), str(tmp_path / "jobs"))
