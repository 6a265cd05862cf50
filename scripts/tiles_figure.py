"""The README's tile figure: a sample hazy photo enlarged 2.5x, restored at full size in 512-px
tiles with each tile pooling its own statistics (the old engine) and with the whole photo's
shared (today's default), side by side with the one-piece restore's difference.

    python scripts/tiles_figure.py docs/images/tiles.jpg
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from opir_engine.image_io import read_image
from opir_engine.inference.engine import OPIREngine

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "rocket_haze.jpg"


def main(out: Path) -> None:
    rgb = read_image(SAMPLE).rgb
    h, w = rgb.shape[-2:]
    big = F.interpolate(rgb[None], size=(int(h * 2.5), int(w * 2.5)), mode="bicubic")[0]
    big = big.clamp(0, 1)

    def restore(**options: object) -> torch.Tensor:
        engine = OPIREngine.from_pretrained(device="cpu", compile=False, work_side=None, **options)
        return engine.restore(big, task="haze").image

    whole = restore(tile=4096)
    panels = []
    modes = (("512-px tiles, each its own statistics", {"tile": 512, "pooling": "global"}),
             ("512-px tiles, the photo's statistics shared", {"tile": 512}))  # fmt: skip
    for label, options in modes:
        tiled = restore(**options)
        psnr = -10 * math.log10(float(((tiled - whole) ** 2).mean()))
        print(f"{label}: {psnr:.1f} dB against one piece")
        panels.append((f"{label}: {psnr:.1f} dB vs one piece", tiled))
    width = 640
    scale = width / big.shape[-1]
    height = int(big.shape[-2] * scale)
    sheet = Image.new("RGB", (2 * width + 8, height + 20), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(panels):
        small = F.interpolate(image[None], size=(height, width), mode="area")[0]
        pixels = (small * 255).round().byte().permute(1, 2, 0).numpy()
        sheet.paste(Image.fromarray(pixels), (i * (width + 8), 20))
        draw.text((i * (width + 8) + 2, 4), label, fill=(0, 0, 0))
    sheet.save(out, quality=88)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
