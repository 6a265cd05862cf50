"""Real hazy and rainy photos restored in 512-px tiles agree with the same photos in one piece.

The KPN's channel attention takes means over the whole map, so a tile that computed its own
would get its own haze correction (rectangles in the output, issue 21). The engine's default
pooling ("shared") hands every tile the whole photo's means (`OPIR.block_means`) and starts the
tiles on the U-Net's grid; the real engine runs here, at full size (no working side).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch.nn.functional as F

from opir_engine.image_io import read_image
from opir_engine.inference.engine import OPIREngine
from opir_engine.inference.tiling import plan_tiles
from opir_engine.weights import DEFAULT_WEIGHTS
from tests.conftest import needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# The engine's overlap with shared means: at 32, a dense-haze photo's strong correction carried
# the tile edges' padding in (41.9 dB on Dense-Haze 51); at 128, 73.9 dB
TILE, OVERLAP = 512, 128
PHOTOS = {  # (path under the shared data, task, size it is brought to (H, W))
    "haze": ("haze/HSTS-synthetic/input/0586.jpg", "haze", (900, 1200)),
    "dense-haze": ("haze/Dense-Haze/input/51.png", "haze", (600, 800)),  # its own size
    "rain": ("rain/GT-RAIN-webcam/input/s001_r001.png", "rain", (600, 800)),
}


@pytest.fixture(scope="module")
def engines() -> dict[int, OPIREngine]:
    """The shipped model at full size (no working side), in 512-px tiles and in one piece, with
    the engine's default pooling ("shared") and overlap."""
    return {tile: OPIREngine.from_pretrained(DEFAULT_WEIGHTS, device="cpu", compile=False,
                                             tile=tile, work_side=None)
            for tile in (TILE, 4096)}  # fmt: skip


def _seams(size: int) -> list[int]:
    """The inner tile edges along an axis of `size`, as the engine places its tiles."""
    spans = sorted({(t.x0, t.x1) for t in plan_tiles(1, size, TILE, OVERLAP, 16, align=16)})
    return [s for s, _ in spans[1:]] + [e for _, e in spans[:-1]]


@pytest.fixture(scope="module", params=sorted(PHOTOS))
def restored(
    request: pytest.FixtureRequest, engines: dict[int, OPIREngine], shared_data: Path
) -> tuple:
    path, task, size = PHOTOS[request.param]
    rgb = F.interpolate(read_image(shared_data / path).rgb[None], size=size, mode="bicubic")
    rgb = rgb[0].clamp(0, 1)
    assert engines[TILE].tile_overlap == OVERLAP
    return engines[TILE].restore(rgb, task).image, engines[4096].restore(rgb, task).image


def test_tiles_agree_with_the_whole_photo(restored: tuple) -> None:
    tiled, whole = restored
    psnr = -10 * math.log10(float(((tiled - whole) ** 2).mean()))
    assert psnr >= 45.0


def test_no_step_at_tile_borders(restored: tuple) -> None:
    tiled, whole = restored
    for axis in (1, 2):  # column means (a step at a vertical seam), then row means
        profile = (tiled - whole).mean(dim=(0, 3 - axis)) * 255  # 8-bit levels
        steps = profile.diff().abs()
        for seam in _seams(tiled.shape[axis]):
            near = steps[seam - 16 : seam + 16]
            # at a seam the profile moves no more than half a level, nor more than elsewhere
            assert near.max() <= max(0.5, 2 * steps.median()), (axis, seam, near.max())
