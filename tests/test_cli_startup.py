"""The `opir` command starts without torch: help and --version come from the command line alone;
and its help reads cleanly.

Each check runs the real command in a fresh interpreter (`python -m opir_engine`, what the
`opir` script runs) and reads `-X importtime`'s list of every module that interpreter imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
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


def test_models_lists_the_shipped_checkpoints_without_torch() -> None:
    """`opir models` reads the cards beside the weights: no torch, no numpy."""
    from opir_engine.shipped import DEFAULT_WEIGHTS, list_shipped, read_card

    done, imported = _run_opir("models")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    names = [name for name, _ in list_shipped()]
    assert DEFAULT_WEIGHTS in names
    for name, path in list_shipped():
        assert name in done.stdout
        assert str(read_card(path)["steps"]) in done.stdout


def test_version_prints_the_installed_version_without_torch() -> None:
    done, imported = _run_opir("--version")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"opir {importlib.metadata.version('opir')}\n"
    assert not imported & set(HEAVY)


COMMANDS = ("restore", "eval", "synth", "train", "train-classifier", "profile", "models")


def _help(*args: str) -> str:
    """`opir ARGS --help` as a user reads it, on a terminal wide enough that rich keeps each
    option's help on one line and without colour codes."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "opir_engine", *args, "--help"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("command", [(), *((c,) for c in COMMANDS)])
def test_help_names_values_not_types(command: tuple[str, ...]) -> None:
    """Values are named (INPUT, PATH, N), flags take none; no Typer type tags, no argument
    in braces, and no word left before a lone "." where rich ate a "[...]" as markup."""
    text = _help(*command)
    assert re.search(r"<(bool|str|int|float|path|list\[\w+\]|int range|float range)>", text) is None
    assert re.search(r"\{\w+\}", text) is None
    assert re.search(r"\w \.(\s|$)", text, re.MULTILINE) is None
    assert "--help" in text


def test_restore_usage_and_run_time_defaults_read_truthfully() -> None:
    from opir_engine.weights import DEFAULT_WEIGHTS  # the test may load torch; the CLI not

    text = _help("restore")
    assert "restore [OPTIONS] INPUT OUTPUT" in text
    compile_line = next(line for line in text.splitlines() if "--compile" in line)
    assert "[default: on CUDA only]" in compile_line
    quality_line = next(line for line in text.splitlines() if "--quality" in line)
    assert "[default: JPEG: the input JPEG's own quality, else 95; WebP: lossless]" in quality_line
    assert f"[default: {DEFAULT_WEIGHTS}]" in text
    assert "[RESTORED_DIR] [TARGET_DIR]" in _help("eval")


def test_profile_help_says_it_times_the_shipped_weights() -> None:
    from opir_engine.weights import DEFAULT_WEIGHTS

    weights_line = next(line for line in _help("profile").splitlines() if "--weights" in line)
    assert f"[default: {DEFAULT_WEIGHTS}, what opir restore uses]" in weights_line
