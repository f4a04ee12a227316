"""House rules checked on the source (no imports executed): ruff is clean, the pure layers
import no FLARE, privacy/ imports no upper layer, and no module is over 500 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "custom" / "adpfl"
MAX_LINES = 500

#: layer -> module prefixes it must never import
FORBIDDEN = {
    "privacy": ("nvflare", "adpfl.flare", "adpfl.training", "adpfl.poc", "adpfl.experiments", "adpfl.cli"),
    "data": ("nvflare", "adpfl.flare"),
    "tasks": ("nvflare", "adpfl.flare"),
    "training": ("nvflare", "adpfl.flare"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """(line, module) of every import in ``path``, function-level ones included; relative
    imports resolved against the module's package."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from adpfl import flare` imports adpfl.flare
                yield node.lineno, f"{module}.{alias.name}"


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_import_resolution_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "adpfl" / "privacy"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("from ..training import loop\n\ndef g():\n    import nvflare.apis\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "adpfl")
    found = {m for _, m in imported_modules(f)}
    assert {"adpfl.training", "adpfl.training.loop", "nvflare.apis"} <= found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layering(layer):
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            for prefix in FORBIDDEN[layer]:
                if _matches(module, prefix):
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, f"{layer}/ must not import {FORBIDDEN[layer]}:\n" + "\n".join(sorted(set(bad)))


def test_no_module_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_ruff_is_clean():
    """`ruff check` with the pyproject.toml rules (pinned in requirements-dev.txt)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "custom", "tests", "bench"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
