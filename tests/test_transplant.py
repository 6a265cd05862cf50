"""Rain-layer transplant on real pairs: the layer is the rain and only the rain, laying it back
gives the rain again, random draws are seeded, and training draws transplants only when asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from opir_engine.evaluation.weather_left import weather_left
from opir_engine.image_io import read_image
from opir_engine.inference.streaks import streak_energy
from opir_engine.synthesis.transplant import fit_layer, lay_rain, rain_layer, random_transplant


@pytest.fixture(scope="module")
def pair(shared_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    folder = shared_data / "rain" / "JORDER-E-RainTrainH-samples"
    stem = "norain-3.png"
    return read_image(folder / "input" / stem).rgb, read_image(folder / "target" / stem).rgb


def test_the_layer_is_the_rain_of_the_pair(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    degraded, target = pair
    layer = rain_layer(degraded, target)
    assert layer.shape == degraded.shape and layer.min() >= 0
    # laid back on its own target it brings back the streaks: more than half of their
    # amplitude, with what differs from the real input (the renderer's clipped, darkening and
    # slow parts are left out) well below the streaks themselves
    again = lay_rain(target, layer)
    streaks = streak_energy(degraded - target)
    assert weather_left(degraded, again, target) > 0.5
    assert (streak_energy(again - degraded) / streaks) ** 0.5 < 0.6
    assert weather_left(degraded, target, target) == 0


def test_the_layer_carries_no_ghost_of_its_scene(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    degraded, target = pair
    layer = rain_layer(degraded, target)
    # beyond a uniform veil, the slow part of the layer is flat: no shape of the source photo
    slow = torch.nn.functional.avg_pool2d(layer[None], 31, stride=1)[0]
    assert float(slow.std()) < 0.2 * float(layer.std())


def test_integer_images_are_taken_as_8_bit(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    degraded, target = pair
    as_bytes = rain_layer((degraded * 255).round().byte(), (target * 255).round().byte())
    assert torch.allclose(as_bytes, rain_layer(degraded, target), atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        rain_layer(degraded, target[:, :-1])


def test_fit_layer_covers_any_photo(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    layer = rain_layer(*pair)
    for size in ((100, 60), (481, 321), (700, 1000)):
        assert fit_layer(layer, *size).shape == (3, *size)
    # no scaling when it already covers: a centre crop of the layer itself
    h, w = layer.shape[-2:]
    assert torch.equal(fit_layer(layer, h - 20, w - 10), layer[:, 10 : h - 10, 5 : w - 5])


def test_random_transplant_is_seeded(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    layer = rain_layer(*pair)
    photo = pair[1][:, :96, :128]
    a = random_transplant(photo, [layer], np.random.default_rng(5))
    b = random_transplant(photo, [layer], np.random.default_rng(5))
    c = random_transplant(photo, [layer], np.random.default_rng(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == photo.shape and a.min() >= 0 and a.max() <= 1
    assert (a >= photo - 1e-6).all()  # rain only brightens
    assert float((a - photo).mean()) > 0.02
