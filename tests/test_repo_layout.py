"""The README's two set-up commands and CI agree."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- setup-commands -->(.*?)<!-- /setup-commands -->", text, re.S)
    assert m, "README must mark its set-up commands block"
    return [ln.strip() for ln in re.findall(r"```(?:bash|sh)?\n(.*?)```", m.group(1), re.S)]


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line"
    assert "pip install" in cmds[0] and "adpfl run" in cmds[0]
    assert "pip install" in cmds[1] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_top_level_shape():
    for name in ("README.md", "requirements.txt", "jobs", "custom", "poc", "tests"):
        assert (REPO / name).exists(), name
    assert "-e ." in (REPO / "requirements.txt").read_text().splitlines()
