"""The `opir` command starts without torch: help and --version come from the command line alone.

Each check runs the real command in a fresh interpreter (`python -m opir_engine`, what the
`opir` script runs) and reads `-X importtime`'s list of every module that interpreter imported.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

HEAVY = ("torch", "triton", "numpy", "PIL")


def _run_opir(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `opir ARGS` in a fresh interpreter; (the finished process, top-level packages it
    imported)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "opir_engine", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    imported = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            imported.add(name.split(".")[0])
    assert "opir_engine" in imported, done.stderr[-2000:]  # importtime did report
    return done, imported


@pytest.mark.parametrize(
    "args", [("--help",), ("restore", "--help"), ("profile", "--help"), ("train", "--help")]
)
def test_help_runs_without_importing_torch_or_triton(args: tuple[str, ...]) -> None:
    done, imported = _run_opir(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_version_prints_the_installed_version_without_torch() -> None:
    done, imported = _run_opir("--version")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"opir {importlib.metadata.version('opir')}\n"
    assert not imported & set(HEAVY)
