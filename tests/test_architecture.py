"""The architecture is checked, not remembered: the import contracts of pyproject.toml
([tool.importlinter]) hold, and breaking one is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
               "lint_imports_command()", "--no-cache"]  # fmt: skip
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def test_import_contracts_hold() -> None:
    pytest.importorskip("importlinter")
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """The model importing the engine (an arrow upwards) breaks the layers contract."""
    pytest.importorskip("importlinter")
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "opir_engine", copy / "opir_engine")
    shutil.copytree(ROOT / "kernels", copy / "opir_kernels")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    nafnet = copy / "opir_engine" / "model" / "nafnet.py"
    nafnet.write_text(nafnet.read_text() + "\nfrom opir_engine.inference import engine  # noqa\n")
    env_code = f"import sys; sys.path.insert(0, {str(copy)!r}); "
    command = [sys.executable, "-c", env_code + "from importlinter.cli import "
               "lint_imports_command; lint_imports_command()", "--no-cache"]  # fmt: skip
    result = subprocess.run(command, cwd=copy, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "opir_engine.model.nafnet -> opir_engine.inference" in result.stdout
