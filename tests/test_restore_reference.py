"""The shipped samples restore as they did when the shipped weights were recorded.

`tests/data/restore_reference/` holds the PNG outputs of `opir restore samples/ OUT --format png`
and `record.json`, the task, confidence and working size each file got. They were made at commit
e560799 (before the code was split into folders, so the restructure changed no pixel) and made
again when new weights were shipped (2026-12-07): a code change that moves an output fails here.
The real CLI runs here as a subprocess on the CPU, with its defaults, and its outputs are
compared with those files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
REFERENCE = ROOT / "tests" / "data" / "restore_reference"
RECORD = json.loads((REFERENCE / "record.json").read_text())["files"]
RESTORED = sorted(name for name, row in RECORD.items() if row["task"] != "clean")
PASSED_THROUGH = sorted(name for name, row in RECORD.items() if row["task"] == "clean")


def _pixels(path: Path) -> np.ndarray:
    """A decoded image as uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """Runs the CLI once on samples/: the output folder and the report's rows by file name."""
    out = tmp_path_factory.mktemp("restored")
    report = out / "report.json"
    # The reference was made on a CPU; on a CUDA machine auto would pick the GPU (and compile).
    # It was made with 512-px tiles pooling on their own, the defaults then (rocket_haze is
    # 640 px wide): the tiles of today's defaults are checked in test_tile_agreement.py.
    command = [sys.executable, "-m", "opir_engine", "restore", str(SAMPLES), str(out / "png"),
               "--format", "png", "--report", str(report), "--device", "cpu",
               "--tile", "512", "--tile-overlap", "32", "--pooling", "global",
               "--quiet"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = json.loads(report.read_text())["files"]
    return out / "png", {Path(row["input"]).name: row for row in rows}


def test_every_sample_gets_the_recorded_task_and_confidence(
    restored: tuple[Path, dict[str, dict]],
) -> None:
    _, rows = restored
    assert sorted(rows) == sorted(RECORD)
    for name, expected in RECORD.items():
        row = rows[name]
        assert row["status"] == "done", (name, row["error"])
        assert row["task"] == expected["task"], name
        assert round(row["confidence"], 4) == expected["confidence"], name
        assert row["restored_at"] == expected["restored_at"], name


@pytest.mark.parametrize("name", RESTORED)
def test_restored_samples_equal_the_reference_outputs(
    restored: tuple[Path, dict[str, dict]], name: str
) -> None:
    out, _ = restored
    stem = Path(name).stem
    ours, reference = _pixels(out / f"{stem}.png"), _pixels(REFERENCE / f"{stem}.png")
    assert ours.shape == reference.shape
    # Equal bit for bit on the machine that made the reference. Another CPU may sum floats in
    # another order (other SIMD widths, thread splits) and round a few pixels to the next
    # 8-bit level, so that much is allowed; anything more is a change in the numerics.
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    identical = float((difference == 0).all(axis=-1).mean())
    assert int(difference.max()) <= 1, f"{name}: max difference {difference.max()} levels"
    assert identical >= 0.999, f"{name}: {identical:.4%} of pixels identical"


@pytest.mark.parametrize("name", PASSED_THROUGH)
def test_clean_samples_pass_through_unchanged(
    restored: tuple[Path, dict[str, dict]], name: str
) -> None:
    out, _ = restored
    ours, source = _pixels(out / f"{Path(name).stem}.png"), _pixels(SAMPLES / name)
    assert np.array_equal(ours, source), name
