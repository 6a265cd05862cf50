"""A contact sheet: before / after / target crops side by side, one row per source.

Numbers alone can hide a model that dims every streak instead of removing it; a sheet written
with every validation is looked at before a checkpoint is called better. Other panels (two
weights' outputs between input and target) compare checkpoints the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from opir_engine.image_io import write_image

CROP = 192  # px: streaks and flakes stay visible at 1:1
LABEL = 14  # px: the strip above each row naming its source


def centre_crop(image: torch.Tensor, side: int = CROP) -> torch.Tensor:
    """The central side x side crop of (3, H, W) (the whole image on a shorter axis)."""
    h, w = image.shape[-2:]
    top, left = max((h - side) // 2, 0), max((w - side) // 2, 0)
    return image[:, top : top + side, left : left + side]


PANELS = ("input", "output", "target")  # a validation's rows: before, after, the truth
# (label, image, image, ...): one (3, H, W) image in [0, 1] per panel
Row = tuple[str | torch.Tensor, ...]


def contact_sheet(rows: list[Row], panels: tuple[str, ...] = PANELS) -> torch.Tensor:
    """(label, image per panel) rows, images (3, H, W) in [0, 1] -> one (3, H, W) image: each
    row a label strip (naming the panels) over the images' centre crops side by side, 1:1."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    for label, *images in rows:
        if len(images) != len(panels):
            raise ValueError(
                f"row {label!r} has {len(images)} images for {len(panels)} panels {panels}"
            )
    n = len(panels)
    height = len(rows) * (LABEL + CROP)
    sheet = Image.new("RGB", (n * CROP + 2 * (n - 1), height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (label, *images) in enumerate(rows):
        y = i * (LABEL + CROP)
        draw.text((2, y + 1), f"{label}   ({' | '.join(panels)})", fill=(230, 230, 230))
        for j, image in enumerate(images):
            crop = (centre_crop(image.float().clamp(0, 1)) * 255).round().byte()
            tile = Image.fromarray(crop.permute(1, 2, 0).numpy())
            sheet.paste(tile, (j * (CROP + 2), y + LABEL))
    return torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1).float() / 255


def write_contact_sheet(path: Path, rows: list[Row], panels: tuple[str, ...] = PANELS) -> Path:
    """Write `contact_sheet(rows, panels)` to `path` (the format from its suffix; JPEG at
    quality 90)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, contact_sheet(rows, panels), quality=90)
    return path
