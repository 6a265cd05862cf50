"""The weather-left figure: 1 for the input, 0 for the target, linear in streak amplitude, blind
to what is not line-like (a uniform veil), on a real streak pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opir_engine.evaluation.weather_left import weather_left
from opir_engine.image_io import read_image
from opir_engine.inference.streaks import streak_energy


@pytest.fixture(scope="module")
def pair(shared_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    folder = shared_data / "rain" / "Rain13K-subset"
    return read_image(folder / "input" / "1.jpg").rgb, read_image(folder / "target" / "1.jpg").rgb


def test_input_and_target_are_the_ends(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    degraded, target = pair
    assert weather_left(degraded, degraded, target) == pytest.approx(1.0)
    assert weather_left(degraded, target, target) == 0.0


def test_dimmed_streaks_are_counted_by_their_amplitude(
    pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    degraded, target = pair
    for share in (0.25, 0.5, 0.8):
        dimmed = target + share * (degraded - target)
        assert weather_left(degraded, dimmed, target) == pytest.approx(share, rel=1e-4)


def test_a_uniform_veil_is_not_weather_left(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    degraded, target = pair
    veiled = (target + 0.08).clamp(0, 1)  # about 22 dB from the target, PSNR-wise
    assert weather_left(degraded, veiled, target) < 0.05
    # while a single streak drawn on the target is found
    streaked = target.clone()
    streaked[:, 50:120, 200] += 0.3
    assert streak_energy(streaked - target) > 20 * streak_energy(veiled - target)


def test_an_input_without_weather_has_no_figure() -> None:
    clean = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    assert weather_left(clean, clean, clean) is None


def test_a_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) or \(1, H, W\) residual"):
        streak_energy(torch.zeros(2, 8, 8))
