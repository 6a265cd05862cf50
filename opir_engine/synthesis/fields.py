"""The random fields of Eq. 2-4: rain streaks R_k, the snow mask M and the haze depth d.

Streaks and flakes are sparse seeds (a Poisson count at uniform positions per layer) convolved
with one kernel per layer, by FFT so that the cost does not grow with the kernel size. Each
image of a batch draws from its own stream, keyed by (seed, index in the batch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from opir_engine.synthesis.params import HazeParams, RainParams, SnowParams

_PER_AREA = 1e4  # densities count seeds per 10,000 reference pixels
_STREAK_TAPER = 0.7  # rain streaks fade to 30% at their tips
_ROUND_OFF = 1e-6  # field values below this are FFT noise (a 1/255 step is 4e-3)


def _capsule_kernel(
    length: float, angle_deg: float, radius: float, sigma: float, max_size: int, taper: float = 0.0
) -> np.ndarray:
    """(K, K) kernel with peak exactly 1 at its centre: a segment of `length` along `angle_deg`,
    thickened to a flat core of `radius` with a gaussian edge of `sigma`.

    With radius 0 it is a motion-blurred line of gaussian width (a rain streak); with length 0
    a soft disc (a snow flake); both, a smeared flake. `taper` dims the segment towards its
    ends (by that fraction at the tips), as a drop's streak fades in and out of the exposure.
    """
    sigma = max(sigma, 0.35)  # thinner than this aliases into dotted lines
    half = length / 2.0
    reach = min(math.ceil(half + radius + 3.0 * sigma), (max_size - 1) // 2)
    y, x = np.mgrid[-reach : reach + 1, -reach : reach + 1].astype(np.float32)
    theta = math.radians(angle_deg)
    dx, dy = math.sin(theta), math.cos(theta)  # image y grows downwards
    along = np.clip(x * dx + y * dy, -half, half)
    dist = np.hypot(x - along * dx, y - along * dy)
    edge = np.maximum(dist - radius, 0.0)
    fade = 1.0 - taper * (along / half) ** 2 if half > 0 else 1.0
    return (fade * np.exp(-(edge**2) / (2.0 * sigma**2))).astype(np.float32)


def _wrap_kernel(kernel: np.ndarray, height: int, width: int) -> np.ndarray:
    # Centre the kernel at pixel (0, 0) with wrap-around, for circular FFT convolution.
    # The seed fields are stationary, so wrapping streaks across borders changes no statistic.
    full = np.zeros((height, width), np.float32)
    c = kernel.shape[0] // 2
    rows = (np.arange(kernel.shape[0]) - c) % height
    cols = (np.arange(kernel.shape[1]) - c) % width
    full[np.ix_(rows, cols)] = kernel
    return full


def _image_rngs(seed: int, batch: int) -> list[np.random.Generator]:
    # One stream per image of a batch, keyed by (seed, index): image b gets the same fields
    # whatever the batch size, so a single image matches the first image of a batch.
    return [np.random.default_rng([seed, b]) for b in range(batch)]


def _seed_fields(
    seed: int,
    batch: int,
    height: int,
    width: int,
    layers: list[tuple[float, float, float]],
    scale: float,
) -> np.ndarray:
    """(L, B, H, W) sparse seeds, one field per (density, value, jitter) layer and image:
    a Poisson count, uniform positions, values value * U(1 - jitter, 1)."""
    out = np.zeros((len(layers), batch, height * width), np.float32)
    for b, rng in enumerate(_image_rngs(seed, batch)):
        for k, (density, value, jitter) in enumerate(layers):
            mean = density * height * width / (_PER_AREA * scale * scale)
            n = int(rng.poisson(mean)) if mean > 0 else 0
            if n == 0 or value == 0.0:
                continue
            pos = rng.integers(0, height * width, n)
            vals = value * (1.0 - jitter * rng.uniform(0.0, 1.0, n))
            out[k, b] = np.bincount(pos, weights=vals, minlength=height * width)
    return out.reshape(len(layers), batch, height, width)


def _layer_spectra(
    seeds: np.ndarray, kernels: list[np.ndarray], height: int, width: int
) -> torch.Tensor:
    """(L, B, H, W // 2 + 1) spectra of the (L, B, H, W) seeds convolved with each layer's
    kernel: circular convolution by FFT, whose cost does not grow with the kernel size."""
    k = torch.from_numpy(np.stack([_wrap_kernel(x, height, width) for x in kernels]))
    return torch.fft.rfft2(torch.from_numpy(seeds)) * torch.fft.rfft2(k).unsqueeze(1)


def _drop_round_off(field: torch.Tensor) -> torch.Tensor:
    # FFT convolution leaves ~1e-8 noise where there is no streak or flake; zero it, so that
    # empty pixels keep J exactly (and the field never goes negative).
    return torch.where(field < _ROUND_OFF, 0.0, field)


def render_rain_streaks(
    batch: int, height: int, width: int, params: RainParams, seed: int
) -> torch.Tensor:
    """sum_k R_k of Eq. 2 as a (B, 1, H, W) non-negative field (not clipped)."""
    out = torch.zeros(batch, 1, height, width)
    layers = [x for x in params.layers if x.density > 0 and x.intensity > 0]
    if not layers:
        return out
    s = params.scale
    seeds = _seed_fields(
        seed, batch, height, width, [(x.density, x.intensity, x.jitter) for x in layers], s
    )
    kernels = [
        _capsule_kernel(
            x.length * s, x.angle_deg, 0.0, x.width * s, min(height, width), _STREAK_TAPER
        )
        for x in layers
    ]
    # Layers add (Eq. 2), so their spectra add too: one inverse FFT for all of them.
    spectrum = _layer_spectra(seeds, kernels, height, width).sum(0)
    return _drop_round_off(torch.fft.irfft2(spectrum, s=(height, width))).unsqueeze(1)


def render_snow_mask(
    batch: int, height: int, width: int, params: SnowParams, seed: int
) -> torch.Tensor:
    """M of Eq. 3 as a (B, 1, H, W) field in [0, 1].

    Within a layer overlapping flakes add and saturate at 1; layers combine as stacked
    translucent sheets, M = 1 - prod_k (1 - M_k).
    """
    layers = [x for x in params.layers if x.density > 0 and x.opacity > 0]
    if not layers:
        return torch.zeros(batch, 1, height, width)
    s = params.scale
    seeds = _seed_fields(
        seed, batch, height, width, [(x.density, x.opacity, x.jitter) for x in layers], s
    )
    kernels = [
        _capsule_kernel(x.motion * s, x.angle_deg, x.size * s, x.blur * s, min(height, width))
        for x in layers
    ]
    spectra = _layer_spectra(seeds, kernels, height, width)
    masks = _drop_round_off(torch.fft.irfft2(spectra, s=(height, width))).clamp_(max=1.0)
    clear = torch.prod(1.0 - masks, dim=0)
    return (1.0 - clear).unsqueeze(1)


def make_depth_proxy(clean: torch.Tensor, params: HazeParams, seed: int) -> torch.Tensor:
    """Relative depth d in [0, 1] for photos without a depth map: (B, 3, H, W) -> (B, 1, H, W).

    A weighted blend of three cues, each plausible on its own for outdoor photos:
    - a ground-plane gradient: below the horizon a flat ground seen by an upright camera is at
      distance proportional to 1 / (rows below the horizon), so d falls from 1 at the horizon
      to `near` at the bottom row; above the horizon (sky, far buildings) d stays 1;
    - a smooth low-frequency random field: scene depth and haze density vary slowly and
      unevenly (NH-HAZE's non-homogeneous haze), which the gradient alone cannot show;
    - the dark channel (min over RGB and a ~12 px window) of the clean image: it is near 0 on
      nearly every near object and high on sky and other bright colourless regions, which are
      mostly far (He et al.'s dark channel prior, read backwards).
    The blend is divided by its per-image maximum, so the farthest point has d = 1.
    """
    b, _, h, w = clean.shape
    rows = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    below = ((rows - params.horizon) / max(1.0 - params.horizon, 1e-3)).clamp(0.0, 1.0)
    k = 1.0 / max(params.near, 1e-3) - 1.0  # so that d = near at the bottom row
    ground = (1.0 / (1.0 + k * below)).view(1, 1, h, 1).expand(b, 1, h, w)

    n = max(int(params.field_cells), 1)
    coarse = np.stack([rng.uniform(0.0, 1.0, (1, n, n)) for rng in _image_rngs(seed, b)])
    coarse = torch.from_numpy(coarse.astype(np.float32))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)

    # Dark channel on a 4x smaller image (cheap; the min window is then ~12 px), then a box
    # blur so that the nearest-neighbour blocks of the min filter do not show in the haze.
    small = F.avg_pool2d(clean, 4, ceil_mode=True) if min(h, w) >= 16 else clean
    dark = -F.max_pool2d(-small.amin(1, keepdim=True), 3, stride=1, padding=1)
    dark = F.avg_pool2d(F.pad(dark, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    dark = F.interpolate(dark, size=(h, w), mode="bilinear", align_corners=False)

    total = params.gradient_weight + params.field_weight + params.dark_weight
    d = (
        params.gradient_weight * ground + params.field_weight * field + params.dark_weight * dark
    ) / max(total, 1e-6)
    return d / d.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
