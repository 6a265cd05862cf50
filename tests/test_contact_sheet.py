"""The contact sheet: each row's crops land at 1:1 where the layout says, under a label; and
scripts/compare_sheet.py, which lays two checkpoints' outputs on one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from opir_engine.evaluation.contact_sheet import (
    CROP,
    LABEL,
    centre_crop,
    contact_sheet,
    write_contact_sheet,
)
from opir_engine.evaluation.metrics import psnr
from opir_engine.image_io import as_8bit, read_image
from opir_engine.inference.engine import OPIREngine

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_rows_hold_the_centre_crops_at_one_to_one() -> None:
    photo = read_image(SAMPLES / "chelsea_rain.jpg").rgb  # 451x300
    small = photo[:, :100, :150]  # smaller than a crop: kept whole
    rows = [("rain/a", photo, photo.flip(-1), photo * 0.5), ("haze/b", small, small, small)]
    sheet = contact_sheet(rows)
    assert sheet.shape == (3, 2 * (LABEL + CROP), 3 * CROP + 4)
    as_bytes = (sheet * 255).round().byte()
    for j, image in enumerate(rows[0][1:]):
        crop = (centre_crop(image) * 255).round().byte()
        x = j * (CROP + 2)
        assert torch.equal(as_bytes[:, LABEL : LABEL + CROP, x : x + CROP], crop)
    crop = (small * 255).round().byte()
    y = 2 * LABEL + CROP
    assert torch.equal(as_bytes[:, y : y + 100, 0:150], crop)
    # the label strip is written on (not left the background colour)
    assert (as_bytes[:, :LABEL, :200] > 100).any()


def test_written_as_a_jpeg(tmp_path: Path) -> None:
    photo = read_image(SAMPLES / "rocket_haze.jpg").rgb
    path = write_contact_sheet(
        tmp_path / "contact" / "step-000001.jpg", [("haze/x", photo, photo, photo)]
    )
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (3 * CROP + 4, LABEL + CROP)


def test_any_panels_side_by_side_and_a_row_that_does_not_fit_them_is_refused() -> None:
    photo = read_image(SAMPLES / "chelsea_rain.jpg").rgb
    images = (photo, photo * 0.25, photo.flip(-2), photo.flip(-1))
    panels = ("input", "shipped", "candidate", "target")
    sheet = contact_sheet([("rain/a", *images)], panels)
    assert sheet.shape == (3, LABEL + CROP, 4 * CROP + 6)
    as_bytes = (sheet * 255).round().byte()
    for j, image in enumerate(images):
        x = j * (CROP + 2)
        crop = (centre_crop(image) * 255).round().byte()
        assert torch.equal(as_bytes[:, LABEL:, x : x + CROP], crop)
    with pytest.raises(ValueError, match=r"row 'rain/b' has 3 images for 4 panels"):
        contact_sheet([("rain/b", photo, photo, photo)], panels)


def test_an_empty_sheet_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        contact_sheet([])


def test_compare_sheet_sets_two_weights_side_by_side(tmp_path: Path) -> None:
    """scripts/compare_sheet.py, run as a user runs it: input | A | B | target for a pair, each
    output's PSNR against the target printed and on the sheet; --item without a split refused."""
    root = SAMPLES.parent
    weights = str(root / "weights" / "opir-small-allinone.safetensors")
    hazy, clean = SAMPLES / "rocket_haze.jpg", SAMPLES / "clean" / "rocket_haze.png"
    script = str(root / "scripts" / "compare_sheet.py")
    out = tmp_path / "sheet.jpg"
    args = [sys.executable, script, weights, weights, "--pair", str(hazy), str(clean)]
    done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, check=True)
    x, y = read_image(hazy).rgb, read_image(clean).rgb
    restored = OPIREngine.from_pretrained(weights, device="cpu", compile=False).restore(x)
    expected = f"{psnr(as_8bit(restored.image), y):.2f} dB ({restored.task})"
    assert f"rocket_haze: input {psnr(x, y):.2f}, A {expected}, B {expected}" in done.stdout
    with Image.open(out) as im:
        assert im.size == (4 * CROP + 6, LABEL + CROP)
    refused = subprocess.run([*args, "--item", "haze/x.png", "--out", str(out)],
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "--item needs --split and --data-root" in refused.stderr
