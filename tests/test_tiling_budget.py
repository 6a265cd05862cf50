"""The tile follows free memory: one piece when the photo fits, the largest fitting tile if not."""

from __future__ import annotations

import pytest
import torch

from opir_engine.inference.tile_budget import (
    MIN_TILE,
    free_bytes,
    measure_bytes_per_pixel,
    peak_bytes,
    pick_tile,
)
from opir_engine.model import OPIR
from opir_engine.model.config import OPIRConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_photo_that_fits_goes_in_one_piece() -> None:
    # 800x608 padded, 1000 bytes per pixel: 486 MB against half of 2 GB
    assert pick_tile(2 * 10**9, 1000.0, 600, 800, 16) is None


def test_a_photo_too_large_gets_the_largest_square_that_fits() -> None:
    free, per_pixel = 10**9, 1000.0  # half of it holds 500,000 pixels: a 707 side
    tile = pick_tile(free, per_pixel, 3000, 4000, 16)
    assert tile == 704
    assert tile * tile * per_pixel <= 0.5 * free < (tile + 16) ** 2 * per_pixel


def test_fixed_bytes_and_headroom_shrink_the_tile() -> None:
    assert pick_tile(10**9, 1000.0, 3000, 4000, 16, fixed=2 * 10**8) == 544
    assert pick_tile(10**9, 1000.0, 3000, 4000, 16, headroom=1.0) == 992


def test_the_tile_never_falls_below_the_minimum() -> None:
    assert pick_tile(10**6, 1000.0, 3000, 4000, 16) == MIN_TILE
    assert pick_tile(0, 1000.0, 3000, 4000, 48) == 144  # MIN_TILE rounded up to the multiple


def test_padding_to_the_multiple_counts() -> None:
    # 100x100 fits exactly; padded to 112x112 it does not
    assert pick_tile(2 * 100 * 100, 1.0, 100, 100, 1) is None
    assert pick_tile(2 * 100 * 100, 1.0, 100, 100, 16) == MIN_TILE


@pytest.mark.parametrize("args", [(-1, 1.0, 8, 8, 1), (10, 0.0, 8, 8, 1), (10, 1.0, 0, 8, 1)])
def test_bad_values_raise(args: tuple) -> None:
    with pytest.raises(ValueError, match="bytes per pixel"):
        pick_tile(*args)


def test_free_bytes_of_the_cpu_is_positive() -> None:
    assert free_bytes(torch.device("cpu")) > 0


def test_peak_bytes_counts_live_tensors_not_freed_ones() -> None:
    def forward(side: int) -> torch.Tensor:
        a = torch.ones(side, side)  # 4 side^2 bytes
        b = a * 2  # alive with a: 8 side^2 at the peak
        del a
        return b + 1  # a freed before this one is made

    assert peak_bytes(forward, 64) == 8 * 64 * 64


def test_the_model_bytes_per_pixel_scale_with_area() -> None:
    model = OPIR(OPIRConfig.from_name("tiny")).eval()
    weights = torch.tensor([[0.0, 0.0, 0.0, 1.0]])

    def forward(side: int) -> object:
        return model(torch.rand(1, 3, side, side), weights)

    per_pixel, fixed = measure_bytes_per_pixel(forward, 64, 128)
    # at least the input, the two stages and the uncertainty map in float32
    assert per_pixel > 4 * (3 + 3 + 3 + 1)
    predicted = fixed + per_pixel * 192 * 192
    assert peak_bytes(forward, 192) == pytest.approx(predicted, rel=0.1)
