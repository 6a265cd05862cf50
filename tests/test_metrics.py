"""PSNR and SSIM against scikit-image on real image pairs, and against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from opir_engine.evaluation.metrics import (
    DataRangeError,
    ImageShapeError,
    ShapeMismatchError,
    psnr,
    psnr_batch,
    rgb_to_y,
    ssim,
    ssim_batch,
)

# Pairs of (set folder, file stem): synthetic rain streaks (JPEG) and indoor haze (PNG).
PAIRS = [
    ("rain/Rain13K-subset", "1"),
    ("rain/Rain13K-subset", "16"),  # portrait 384x512, the others are landscape
    ("rain/Rain13K-subset", "27"),
    ("haze/SOTS-indoor", "1400_1"),
    ("haze/SOTS-indoor", "1411_2"),
]
PSNR_ATOL = 1e-6  # dB; the brief allows 1e-4, float64 throughout gives ~1e-12
SSIM_ATOL = 1e-6  # the brief allows 1e-3

PairLoader = Callable[[str, str], tuple[np.ndarray, np.ndarray]]


def _find(folder: Path, stem: str) -> Path:
    matches = sorted(folder.glob(f"{stem}.*"))
    if not matches:
        pytest.skip(f"no image {stem}.* in {folder}")
    return matches[0]


@pytest.fixture(scope="module")
def load_pair(shared_data: Path) -> PairLoader:
    """`load_pair(set_dir, stem)`: (degraded, clean) of a shared-data pair as float64
    (H, W, 3) arrays in [0, 1]."""

    def load(set_dir: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
        base = shared_data / set_dir
        if not base.is_dir():
            pytest.skip(f"real data not found at {base}")
        pair = []
        for side in ("input", "target"):
            with Image.open(_find(base / side, stem)) as im:
                pair.append(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0)
        return pair[0], pair[1]

    return load


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float64 array -> opir's float32 (3, H, W) tensor."""
    return torch.from_numpy(image).permute(2, 0, 1).to(torch.float32).contiguous()


def _reference_arrays(image: np.ndarray) -> np.ndarray:
    """The float32 values opir sees, back as float64 (H, W, 3), so both sides see equal inputs."""
    return image.astype(np.float32).astype(np.float64)


def _luma(image: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma of an (H, W, 3) array in [0, 1], on the 0-255 scale."""
    return 16.0 + 65.481 * image[..., 0] + 128.553 * image[..., 1] + 24.966 * image[..., 2]


def _rounded_luma(image: np.ndarray) -> np.ndarray:
    """Luma of an 8-bit (H, W, 3) image in [0, 1] rounded to an integer, halves upward.

    Exact rational arithmetic (Y * 255000 is an integer): some 8-bit colours give Y exactly
    halfway between two integers, and float rounding would send those either way.
    """
    levels = np.round(image * 255.0).astype(np.int64)
    scaled = 16 * 255_000 + levels @ np.array([65_481, 128_553, 24_966], dtype=np.int64)
    return ((scaled + 127_500) // 255_000).astype(np.float64)


def _sk_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=-1 if a.ndim == 3 else None,
    )


@pytest.mark.parametrize(("set_dir", "stem"), PAIRS)
def test_rgb_metrics_match_scikit_image(load_pair: PairLoader, set_dir: str, stem: str) -> None:
    degraded, clean = load_pair(set_dir, stem)
    ref_x, ref_y = _reference_arrays(degraded), _reference_arrays(clean)
    x, y = _to_tensor(degraded), _to_tensor(clean)

    expected_psnr = peak_signal_noise_ratio(ref_y, ref_x, data_range=1.0)
    assert psnr(x, y) == pytest.approx(expected_psnr, abs=PSNR_ATOL)
    assert ssim(x, y) == pytest.approx(_sk_ssim(ref_x, ref_y, 1.0), abs=SSIM_ATOL)


@pytest.mark.parametrize(("set_dir", "stem"), PAIRS)
def test_y_channel_metrics_match_scikit_image_on_numpy_luma(
    load_pair: PairLoader, set_dir: str, stem: str
) -> None:
    degraded, clean = load_pair(set_dir, stem)
    y_x, y_y = _luma(_reference_arrays(degraded)), _luma(_reference_arrays(clean))
    assert y_x.min() >= 16.0 and y_x.max() <= 235.0
    x, y = _to_tensor(degraded), _to_tensor(clean)

    expected_psnr = peak_signal_noise_ratio(y_y, y_x, data_range=255.0)
    assert psnr(x, y, y_channel=True) == pytest.approx(expected_psnr, abs=PSNR_ATOL)
    assert ssim(x, y, y_channel=True) == pytest.approx(_sk_ssim(y_x, y_y, 255.0), abs=SSIM_ATOL)


@pytest.mark.parametrize(("set_dir", "stem"), PAIRS[::2])
def test_quantized_y_channel_matches_matlab_uint8_pipeline(
    load_pair: PairLoader, set_dir: str, stem: str
) -> None:
    """quantize=True: 8-bit RGB, then integer Y as MATLAB's rgb2ycbcr gives for uint8."""
    _, clean = load_pair(set_dir, stem)
    # A float "restoration": the clean image plus small noise, off the 8-bit levels.
    rng = np.random.default_rng(7)
    restored = np.clip(clean + rng.normal(0.0, 2.0 / 255.0, clean.shape), 0.0, 1.0)
    restored_8bit = np.round(_reference_arrays(restored) * 255.0) / 255.0
    y_r = _rounded_luma(restored_8bit)
    y_c = _rounded_luma(clean)
    x, y = _to_tensor(restored), _to_tensor(clean)

    expected_psnr = peak_signal_noise_ratio(y_c, y_r, data_range=255.0)
    got = psnr(x, y, y_channel=True, quantize=True)
    assert got == pytest.approx(expected_psnr, abs=PSNR_ATOL)
    assert ssim(x, y, y_channel=True, quantize=True) == pytest.approx(
        _sk_ssim(y_r, y_c, 255.0), abs=SSIM_ATOL
    )
    # On RGB, quantize only rounds the float image to 8-bit levels.
    expected_rgb = peak_signal_noise_ratio(clean, restored_8bit, data_range=1.0)
    assert psnr(x, y, quantize=True) == pytest.approx(expected_rgb, abs=PSNR_ATOL)
    assert psnr(x, y, y_channel=True) != pytest.approx(got, abs=1e-3)


def test_rgb_to_y_uses_matlab_coefficients() -> None:
    # Pixels: black, red, green, blue, white.
    rgb = torch.tensor(
        [
            [[0.0, 1.0, 0.0, 0.0, 1.0]],
            [[0.0, 0.0, 1.0, 0.0, 1.0]],
            [[0.0, 0.0, 0.0, 1.0, 1.0]],
        ]
    )
    luma = rgb_to_y(rgb)[0, 0] * 255.0
    expected = torch.tensor([16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966, 235.0], dtype=luma.dtype)
    torch.testing.assert_close(luma, expected, atol=1e-9, rtol=0)


def test_psnr_of_constant_offset_is_exactly_20_db() -> None:
    a = torch.full((3, 32, 48), 0.3, dtype=torch.float64)
    assert psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-9)
    # The same offset on a 0-255 scale with data_range=255.
    assert psnr(a * 255 + 25.5, a * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)
    # A gray offset of 0.1 moves Y by 0.1 * 219 / 255 of the range.
    expected_y = 20.0 - 20.0 * math.log10(219.0 / 255.0)
    assert psnr(a + 0.1, a, y_channel=True) == pytest.approx(expected_y, abs=1e-9)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # No variance and no covariance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = torch.full((3, 20, 20), 0.5, dtype=torch.float64)
    b = torch.full((3, 20, 20), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)


def test_identical_images_give_inf_psnr_and_unit_ssim(load_pair: PairLoader) -> None:
    degraded, _ = load_pair(*PAIRS[3])
    x = _to_tensor(degraded)
    assert psnr(x, x.clone()) == math.inf
    assert psnr(x, x.clone(), y_channel=True) == math.inf
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, x.clone(), y_channel=True) == pytest.approx(1.0, abs=1e-12)


def test_gray_inputs_accept_two_and_three_dims(load_pair: PairLoader) -> None:
    degraded, clean = load_pair(*PAIRS[0])
    x, y = _to_tensor(degraded)[1], _to_tensor(clean)[1]
    ref_x, ref_y = _reference_arrays(degraded)[..., 1], _reference_arrays(clean)[..., 1]
    assert psnr(x, y) == pytest.approx(peak_signal_noise_ratio(ref_y, ref_x, data_range=1.0))
    assert ssim(x, y) == pytest.approx(_sk_ssim(ref_x, ref_y, 1.0), abs=SSIM_ATOL)
    assert ssim(x[None], y[None]) == ssim(x, y)


def test_batched_metrics_equal_per_image_metrics(load_pair: PairLoader) -> None:
    pairs = [load_pair(*p) for p in PAIRS[:3]]
    # Crop to a common size: one of the pairs is portrait.
    crops = [(d[:300, :300], c[:300, :300]) for d, c in pairs]
    xs = torch.stack([_to_tensor(d) for d, _ in crops])
    ys = torch.stack([_to_tensor(c) for _, c in crops])
    for y_channel in (False, True):
        got_psnr = psnr_batch(xs, ys, y_channel=y_channel)
        got_ssim = ssim_batch(xs, ys, y_channel=y_channel)
        assert got_psnr.shape == (3,) and got_psnr.dtype == torch.float64
        for i in range(3):
            assert got_psnr[i].item() == pytest.approx(psnr(xs[i], ys[i], y_channel=y_channel))
            assert got_ssim[i].item() == pytest.approx(ssim(xs[i], ys[i], y_channel=y_channel))


def test_shape_mismatch_names_both_shapes() -> None:
    a = torch.zeros(3, 16, 20)
    b = torch.zeros(3, 20, 16)
    for metric in (psnr, ssim):
        with pytest.raises(ShapeMismatchError, match=r"\(3, 16, 20\) vs \(3, 20, 16\)"):
            metric(a, b)
    with pytest.raises(ValueError, match=r"\(3, 16, 20\)"):
        psnr(a, b)


def test_bad_inputs_raise_value_errors() -> None:
    gray = torch.zeros(1, 16, 16)
    with pytest.raises(ImageShapeError, match="RGB"):
        psnr(gray, gray, y_channel=True)
    with pytest.raises(ImageShapeError, match="11x11"):
        ssim(torch.zeros(3, 10, 40), torch.zeros(3, 10, 40))
    with pytest.raises(ImageShapeError, match=r"\(C, H, W\)"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ImageShapeError, match=r"\(B, C, H, W\)"):
        psnr_batch(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(DataRangeError, match="data_range"):
            psnr(gray, gray, data_range=bad)
    assert issubclass(ShapeMismatchError, ValueError)
