"""The contact sheet: each row's three crops land at 1:1 where the layout says, under a label."""

from __future__ import annotations

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
from opir_engine.image_io import read_image

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


def test_an_empty_sheet_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        contact_sheet([])
