"""The README's before/after pictures: input | `opir restore` output | clean original, cropped.

    opir restore samples/ restored/
    python docs/make_images.py restored/

writes docs/images/NAME.jpg for each sample below (crops at full resolution, not resized, so
the streaks and haze are seen as the model saw them).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
# name -> crop box (left, top, right, bottom) in the sample's pixels
CROPS = {
    "chelsea_rain": (60, 0, 360, 300),
    "rocket_haze": (180, 40, 480, 340),
}
LABELS = ("input", "opir restore", "clean original")
STRIP = 18  # pixels of label strip above each panel


def side_by_side(panels: list[Image.Image]) -> Image.Image:
    """The panels (same size) in a row, each under its label."""
    w, h = panels[0].size
    sheet = Image.new("RGB", (w * len(panels) + 4 * (len(panels) - 1), h + STRIP), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, label) in enumerate(zip(panels, LABELS, strict=True)):
        x = k * (w + 4)
        sheet.paste(panel, (x, STRIP))
        draw.text((x + 4, 3), label, fill="black")
    return sheet


def main(restored: Path) -> None:
    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name, box in CROPS.items():
        sources = (
            ROOT / "samples" / f"{name}.jpg",
            restored / f"{name}.jpg",
            ROOT / "samples" / "clean" / f"{name}.png",
        )
        panels = [Image.open(path).convert("RGB").crop(box) for path in sources]
        side_by_side(panels).save(out / f"{name}.jpg", quality=88)
        print(f"wrote {out / f'{name}.jpg'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "restored")
