"""Tiled processing equals untiled processing; plans cover the image; windows blend to 1."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opir_engine.inference.tiling import (
    Tile,
    TileArgumentError,
    TileInputError,
    TileOutputError,
    blend_window,
    plan_tiles,
    process_tiled,
)

EXACT = 1e-6  # max abs difference allowed between tiled and untiled outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, busy cores


def _load_photo(path: Path) -> torch.Tensor:
    """Load a real photo as a float32 (1, 3, H, W) tensor in [0, 1]."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _box5(x: torch.Tensor) -> torch.Tensor:
    """5x5 average with zero padding: receptive radius 2."""
    return F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=True)


def _small_net(seed: int = 0) -> torch.nn.Module:
    """Three 3x3 conv layers (receptive radius 3) with an image and an uncertainty head."""

    class _Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv2d(8, 8, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv2d(8, 4, 3, padding=1),
            )

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.body(x)
            return x + y[:, :3], torch.sigmoid(y[:, 3:])

    torch.manual_seed(seed)
    return _Net().eval()


def _coverage(tiles: list[Tile], height: int, width: int) -> torch.Tensor:
    count = torch.zeros(height, width, dtype=torch.int32)
    for t in tiles:
        count[t.y0 : t.y1, t.x0 : t.x1] += 1
    return count


def _weight_sum(tiles: list[Tile], height: int, width: int, overlap: int, margin: int | None):
    total = torch.zeros(1, 1, height, width, dtype=torch.float64)
    for t in tiles:
        total[..., t.y0 : t.y1, t.x0 : t.x1] += blend_window(
            t.height,
            t.width,
            overlap,
            top=t.y0 > 0,
            bottom=t.y1 < height,
            left=t.x0 > 0,
            right=t.x1 < width,
            margin=margin,
            dtype=torch.float64,
        )
    return total[0, 0]


# --- plan_tiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(1, 1, 8, 2), (17, 23, 8, 2), (257, 511, 64, 16), (257, 511, 96, 0), (100, 1000, 33, 32)],
)
def test_plan_covers_image_with_equal_tiles_and_enough_overlap(
    height: int, width: int, tile: int, overlap: int
) -> None:
    tiles = plan_tiles(height, width, tile, overlap)
    assert (_coverage(tiles, height, width) > 0).all()
    assert {(t.height, t.width) for t in tiles} == {(min(tile, height), min(tile, width))}
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= height and 0 <= t.x0 < t.x1 <= width
    # Neighbours along each axis overlap by at least `overlap`, and the count is the fewest.
    ys = sorted({(t.y0, t.y1) for t in tiles})
    xs = sorted({(t.x0, t.x1) for t in tiles})
    for spans, size in ((ys, height), (xs, width)):
        assert spans[0][0] == 0 and spans[-1][1] == size
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end - start >= overlap
        fewest = 1 if size <= tile else math.ceil((size - overlap) / (tile - overlap))
        assert len(spans) == fewest
    assert len(tiles) == len(ys) * len(xs)


def test_image_smaller_than_tile_is_one_tile() -> None:
    assert plan_tiles(300, 200, 512, 64, 16) == [Tile(0, 300, 0, 200)]
    assert plan_tiles(512, 512, 512, 64) == [Tile(0, 512, 0, 512)]


def test_random_plans_give_positive_weight_everywhere() -> None:
    rng = random.Random(0)
    for _ in range(60):
        tile = rng.randint(2, 40)
        overlap = rng.randint(0, tile - 1)
        margin = rng.randint(0, overlap // 2)
        height, width = rng.randint(1, 120), rng.randint(1, 120)
        tiles = plan_tiles(height, width, tile, overlap)
        weights = _weight_sum(tiles, height, width, overlap, margin)
        assert weights.min() > 0, (height, width, tile, overlap, margin)


# --- blend_window -------------------------------------------------------------------------------


def test_window_keeps_full_weight_on_image_border_sides() -> None:
    window = blend_window(20, 30, 8, top=False, bottom=True, left=True, right=False, margin=2)
    assert window.shape == (1, 1, 20, 30) and window.dtype == torch.float32
    w = window[0, 0]
    assert (w[0, 8:] == 1).all()  # top edge on the image border
    assert (w[:12, -1] == 1).all()  # right edge on the image border
    assert (w[-2:, :] == 0).all() and (w[:, :2] == 0).all()  # margins of bordered sides
    assert (w[:12, 8:] == 1).all()  # flat inside
    ramp = w[5, :10]
    assert (ramp[2:6] > 0).all() and (ramp[2:6] < 1).all()
    assert (ramp.diff() >= 0).all()


def test_window_with_no_bordered_side_is_all_ones() -> None:
    window = blend_window(5, 7, 16, top=False, bottom=False, left=False, right=False)
    assert (window == 1).all()


@pytest.mark.parametrize(("overlap", "margin"), [(16, None), (16, 0), (16, 8), (7, 3), (1, 0)])
def test_windows_form_a_partition_of_unity_at_exact_overlaps(
    overlap: int, margin: int | None
) -> None:
    # Sizes where consecutive tiles overlap by exactly `overlap`: the raw windows sum to 1.
    tile = 40
    height = tile + 3 * (tile - overlap)
    width = tile + 2 * (tile - overlap)
    weights = _weight_sum(plan_tiles(height, width, tile, overlap), height, width, overlap, margin)
    torch.testing.assert_close(weights, torch.ones_like(weights), atol=1e-12, rtol=0)


def test_blended_weights_normalise_to_one_for_any_plan() -> None:
    image = torch.rand(1, 2, 131, 77)
    ones = process_tiled(image, torch.ones_like, 48, 20, margin=3)
    torch.testing.assert_close(ones, torch.ones_like(image), atol=1e-6, rtol=0)


# --- process_tiled ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "multiple_of"),
    [
        ((1, 3, 1, 1), 16, 4, 8),
        ((2, 3, 17, 23), 8, 3, 1),
        ((1, 3, 17, 23), 16, 4, 16),
        ((1, 3, 257, 511), 64, 16, 8),
        ((1, 3, 257, 511), 48, 0, 1),
        ((1, 3, 40, 40), 256, 32, 16),
    ],
)
def test_pointwise_fn_tiled_equals_untiled(
    shape: tuple[int, ...], tile: int, overlap: int, multiple_of: int
) -> None:
    torch.manual_seed(1)
    image = torch.rand(shape)
    seen: list[tuple[int, int]] = []

    def gamma(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[-2], x.shape[-1]))
        return x.clamp_min(0).pow(1 / 2.2)

    out = process_tiled(image, gamma, tile, overlap, multiple_of)
    assert out.shape == image.shape and out.dtype == image.dtype
    # The model only ever sees tiles of at most tile x tile, padded to the multiple, one shape.
    assert len(set(seen)) == 1
    h, w = seen[0]
    assert h % multiple_of == 0 and w % multiple_of == 0 and h <= tile and w <= tile
    assert (out - gamma(image)).abs().max() < EXACT


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "margin"),
    [
        ((1, 3, 257, 511), 64, 4, 2),  # overlap = 2 * radius: a hard cut at mid-overlap
        ((1, 3, 257, 511), 64, 6, 2),
        ((2, 3, 17, 23), 8, 4, 2),
        ((1, 3, 257, 511), 96, 8, None),  # default margin overlap // 4 = radius
        ((1, 3, 100, 100), 32, 24, 12),
    ],
)
def test_local_fn_tiled_equals_untiled_when_margin_covers_receptive_field(
    shape: tuple[int, ...], tile: int, overlap: int, margin: int | None
) -> None:
    torch.manual_seed(2)
    image = torch.rand(shape)
    out = process_tiled(image, _box5, tile, overlap, margin=margin)
    assert (out - _box5(image)).abs().max() < EXACT


def test_local_fn_differs_when_margin_is_too_small() -> None:
    # Guards the test above: with margin 0 the padded tile edges leak into the result.
    torch.manual_seed(3)
    image = torch.rand(1, 3, 100, 100)
    out = process_tiled(image, _box5, 32, 8, margin=0)
    assert (out - _box5(image)).abs().max() > 1e-3


def test_real_photo_through_small_net_with_two_outputs(shared_data: Path) -> None:
    image = _load_photo(shared_data / "clean" / "Urban100_subset" / "img_003.png")
    net = _small_net()
    shapes: set[tuple[int, ...]] = set()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shapes.add(tuple(x.shape))
        return net(x)

    with torch.inference_mode():
        restored, uncertainty = process_tiled(image, run, 256, 24, 8, tiles_per_batch=3)
        ref_restored, ref_uncertainty = net(image)
    assert restored.shape == image.shape and uncertainty.shape == (1, 1, *image.shape[-2:])
    assert (restored - ref_restored).abs().max() < EXACT
    assert (uncertainty - ref_uncertainty).abs().max() < EXACT
    # One tile shape: batches of 3 tiles and the last, shorter batch.
    assert {s[-2:] for s in shapes} == {(256, 256)}
    assert len(shapes) <= 2


def test_real_photo_short_side_padded_to_multiple(shared_data: Path) -> None:
    # This CBSD68 photo is 481 x 321: its 321 columns fit one 384 tile, padded to 336 (reflect).
    image = _load_photo(shared_data / "clean" / "CBSD68" / "101085.png")
    width = image.shape[-1]
    assert width % 16 and width < 384 < image.shape[-2]
    padded = F.pad(image, (0, -width % 16, 0, 0), mode="reflect")
    expected = _box5(padded)[..., :width]
    out = process_tiled(image, _box5, 384, 32, 16)
    assert (out - expected).abs().max() < EXACT


def test_output_dtype_follows_fn() -> None:
    image = torch.rand(1, 3, 40, 50)
    out64 = process_tiled(image, lambda x: x.double() * 2, 16, 4)
    assert out64.dtype == torch.float64
    assert (out64 - image.double() * 2).abs().max() < 1e-12
    out_bf16 = process_tiled(image, lambda x: x.to(torch.bfloat16), 16, 4)
    assert out_bf16.dtype == torch.bfloat16
    assert (out_bf16.float() - image).abs().max() < 1e-2


def test_list_outputs_come_back_as_tuple() -> None:
    image = torch.rand(1, 3, 30, 30)
    out = process_tiled(image, lambda x: [x, x.mean(1, keepdim=True)], 16, 4)
    assert isinstance(out, tuple) and len(out) == 2
    assert (out[1] - image.mean(1, keepdim=True)).abs().max() < EXACT


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile", "overlap", "multiple_of", "match"),
    [
        (16, 16, 1, "larger than overlap"),
        (8, 12, 1, "larger than overlap"),
        (16, -1, 1, "overlap must be >= 0"),
        (20, 4, 8, "multiple of multiple_of"),
        (16, 4, 0, "multiple_of must be >= 1"),
        (16.0, 4, 1, "tile must be an integer"),
    ],
)
def test_bad_plan_args_raise(tile: int, overlap: int, multiple_of: int, match: str) -> None:
    with pytest.raises(TileArgumentError, match=match):
        plan_tiles(100, 100, tile, overlap, multiple_of)
    with pytest.raises(ValueError, match=match):
        process_tiled(torch.zeros(1, 1, 100, 100), torch.clone, tile, overlap, multiple_of)


def test_bad_sizes_and_margins_raise() -> None:
    with pytest.raises(TileArgumentError, match="height must be a positive integer"):
        plan_tiles(0, 10, 8, 2)
    with pytest.raises(TileArgumentError, match="margin"):
        process_tiled(torch.zeros(1, 1, 50, 50), torch.clone, 16, 4, margin=3)
    with pytest.raises(TileArgumentError, match="margin"):
        blend_window(16, 16, 4, top=True, bottom=False, left=False, right=False, margin=-1)
    with pytest.raises(TileArgumentError, match="smaller than the overlap"):
        blend_window(3, 16, 4, top=True, bottom=False, left=False, right=False)
    with pytest.raises(TileArgumentError, match="tiles_per_batch"):
        process_tiled(torch.zeros(1, 1, 50, 50), torch.clone, 16, 4, tiles_per_batch=0)


def test_bad_images_and_outputs_raise() -> None:
    image = torch.rand(1, 3, 40, 40)
    with pytest.raises(TileInputError, match=r"\(3, 40, 40\)"):
        process_tiled(image[0], torch.clone, 16, 4)
    with pytest.raises(TileOutputError, match="does not match its input"):
        process_tiled(image, lambda x: x[..., :-1, :], 16, 4)
    with pytest.raises(TileOutputError, match="does not match its input"):
        process_tiled(image, lambda x: x[:0], 16, 4)
    with pytest.raises(TileOutputError, match="float tensors"):
        process_tiled(image, lambda x: (x > 0.5).to(torch.uint8), 16, 4)
    with pytest.raises(TileOutputError, match="must return tensors"):
        process_tiled(image, lambda x: x.sum().item(), 16, 4)
    calls = iter([1, 2, 2, 2, 2, 2, 2, 2, 2])
    with pytest.raises(TileOutputError, match="channels"):
        process_tiled(image, lambda x: x[:, : next(calls)], 16, 4)


@pytest.mark.parametrize("size", [513, 600, 1200, 1999])
@pytest.mark.parametrize(("tile", "overlap", "align"), [(512, 32, 16), (512, 256, 16), (64, 8, 8)])
def test_aligned_plans_start_on_the_grid_and_keep_the_overlap(
    size: int, tile: int, overlap: int, align: int
) -> None:
    tiles = plan_tiles(size, size, tile, overlap, align=align)
    spans = sorted({(t.x0, t.x1) for t in tiles})
    assert spans[0][0] == 0 and spans[-1] == (size - tile, size)
    assert all(start % align == 0 for start, _ in spans[:-1])
    assert all(end - start >= overlap for (_, end), (start, _) in itertools.pairwise(spans))
    assert {(t.height, t.width) for t in tiles} == {(tile, tile)}


def test_align_one_plans_as_before() -> None:
    for size in range(513, 2100, 37):
        assert plan_tiles(size, 40, 512, 32, align=1) == plan_tiles(size, 40, 512, 32)
    with pytest.raises(TileArgumentError, match="align"):
        plan_tiles(600, 600, 64, 60, align=8)
