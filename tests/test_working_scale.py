"""Tests for opir_engine.inference.working_scale and the engine's working side: shrinking,
carrying the correction back, and what `OPIREngine.restore` does with a photo longer than
`work_side`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opir_engine.image_io import read_image
from opir_engine.inference.engine import EngineError, OPIREngine
from opir_engine.inference.working_scale import (
    enlarge_to,
    shrink_to_side,
    transfer_correction,
    working_size,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, busy cores


@pytest.mark.parametrize(
    ("size", "side", "expected"),
    [
        ((800, 1024), 512, (400, 512)),
        ((1024, 800), 512, (512, 400)),
        ((2048, 3072), 768, (512, 768)),
        ((355, 681), 512, (267, 512)),  # 355 * 512 / 681 = 266.9
        ((3, 5000), 100, (1, 100)),  # never below one pixel
        ((300, 500), 512, (300, 500)),  # short enough: full size
        ((512, 512), 512, (512, 512)),
        ((300, 500), None, (300, 500)),
    ],
)
def test_working_size(size, side, expected) -> None:  # type: ignore[no-untyped-def]
    assert working_size(*size, side) == expected
    image = torch.rand(3, *size)
    assert tuple(shrink_to_side(image, side or 10**6).shape) == (3, *expected)


def test_shrink_averages_blocks_and_leaves_short_images_alone() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4)
    # Each output pixel is the mean of the 2x2 block it covers, worked out by hand.
    expected = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])
    torch.testing.assert_close(shrink_to_side(image, 2), expected)
    assert shrink_to_side(image, 4) is image


def test_enlarge_keeps_constants_and_shapes() -> None:
    field = torch.full((3, 5, 7), 0.25)
    out = enlarge_to(field, (11, 16))
    assert out.shape == (3, 11, 16)
    torch.testing.assert_close(out, torch.full((3, 11, 16), 0.25))


def test_transfer_correction_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 40, 60, generator=gen) * 0.5 + 0.25
    small = shrink_to_side(image, 30)
    # No correction: the full-size photo comes back exactly, fine detail included.
    assert torch.equal(transfer_correction(image, small, small), image)
    # A uniform correction is added everywhere (bicubic keeps constants), then clamped.
    lifted = transfer_correction(image, small, small + 0.1)
    torch.testing.assert_close(lifted, (image + 0.1).clamp(0, 1))
    darker = transfer_correction(image, small, small - 0.6)
    assert float(darker.min()) == 0.0 and torch.equal(darker, (image - 0.6).clamp(0, 1))
    with pytest.raises(ValueError, match="differ in shape"):
        transfer_correction(image, small, small[:, :-1])


def test_transfer_correction_removes_a_smooth_veil_at_full_size() -> None:
    """Haze-like: a smooth veil added to a detailed image is removed by a correction computed
    on a 4x smaller copy, and the fine detail the small copy lost is still there."""
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(3, 128, 192, generator=gen) * 0.6 + 0.1  # per-pixel detail
    y = torch.linspace(0, 1, 128).view(1, 128, 1)
    veil = 0.2 * (0.5 + 0.5 * y.expand(3, 128, 192))  # smooth, like airlight
    hazy = clean + veil
    small = shrink_to_side(hazy, 48)
    restored_small = shrink_to_side(clean, 48)  # a perfect restoration at the small size
    out = transfer_correction(hazy, small, restored_small)
    assert float((hazy - clean).abs().mean()) > 0.14
    assert float((out - clean).abs().mean()) < 0.005
    # Shrinking the whole thing instead and enlarging it would have lost the detail.
    blurred = enlarge_to(restored_small, (128, 192))
    assert float((blurred - clean).abs().mean()) > 0.1


def test_engine_restores_long_photos_at_the_working_side(weights: Path, shared_data: Path) -> None:
    """A photo longer than work_side goes through the model at work_side, and the output is
    the photo plus the enlarged correction the model made there; the uncertainty map comes
    back at full size. Shorter photos are untouched by the option."""
    abbey = read_image(shared_data / "clean" / "SunHays80" / "abbey_sun_asztnlqhlrvirneh.jpg")
    photo = F.interpolate(abbey.rgb[None], size=(150, 192), mode="area")[0]  # from 1024x800
    engine = OPIREngine.from_pretrained(weights, device="cpu", compile=False, work_side=96)
    full = OPIREngine.from_pretrained(weights, device="cpu", compile=False, work_side=None)
    result = engine.restore(photo, task="haze")
    assert result.work_size == (75, 96)
    assert result.image.shape == photo.shape and result.uncertainty.shape == (1, 150, 192)
    small = shrink_to_side(photo, 96)
    at_small = full.restore(small, task="haze")
    assert at_small.work_size == (75, 96)
    expected = transfer_correction(photo, small, at_small.image)
    torch.testing.assert_close(result.image, expected, atol=1e-6, rtol=0)
    # FLOPs are counted for the pixels the model ran on, not the photo's.
    assert result.flops < full.restore(photo, task="haze").flops
    short = shrink_to_side(photo, 80)
    assert torch.equal(engine.restore(short, task="haze").image, full.restore(short, "haze").image)


def test_engine_rejects_a_tiny_working_side(weights: Path) -> None:
    with pytest.raises(EngineError, match="working side must be at least 64 pixels"):
        OPIREngine.from_pretrained(weights, device="cpu", compile=False, work_side=16)
