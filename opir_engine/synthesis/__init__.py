"""Synthesize rain, snow and haze on clean photos with the OPIR paper's physical models.

Section 3.1 of the paper models each degradation of a clean image J:

- rain (Eq. 2): ``I = J + sum_k R_k``, additive streak layers R_k;
- snow (Eq. 3): ``I = M * S + (1 - M) * J``, a flake mask M over a snow colour S;
- haze (Eq. 4): ``I = J t + A (1 - t)``, with transmission ``t = exp(-beta d)`` over a depth d.

Two uses share this module: training data loaders degrade clean crops on the fly
(`WeatherSynthesizer`, a few ms per 256x256 crop on one CPU core), and `opir synth` writes
reproducible pairs to disk (`synthesize_folder`, `regenerate`).

Randomness: every draw comes from a `numpy.random.Generator`. `synthesize(clean, kind, seed)`
splits its seed into two streams, one for the parameters (`sample_*_params`) and one for the
random fields (streak and flake positions, the haze depth field) that `apply_*` draws from its
own `seed` argument. A parameter record plus its seed therefore rebuilds a degraded image
exactly (same bytes on the same numpy/torch build).

Sizes (streak length, flake radius, blur) are in pixels of a reference image whose short side is
`REFERENCE_SHORT_SIDE` (the real rain and snow benchmarks are about 384-480 px high); `scale`
multiplies them for larger photos, and densities are per 10,000 reference pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

KINDS: tuple[str, ...] = ("rain", "snow", "haze")
"""Degradations this module synthesizes; "mixed" picks one of them from the seed."""

REFERENCE_SHORT_SIDE = 400
"""Short side (px) at which the sampled sizes are meant; `scale_for_size` scales them up."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

# Leading entropy words that keep the streams of one seed apart: parameters, random fields,
# the folder's shuffle and its per-pair seeds never share draws.
_PARAM_STREAM, _FIELD_STREAM, _SHUFFLE_STREAM, _PAIR_STREAM = 0, 1, 2, 3
_PER_AREA = 1e4  # densities count seeds per 10,000 reference pixels
_STREAK_TAPER = 0.7  # rain streaks fade to 30% at their tips
_ROUND_OFF = 1e-6  # field values below this are FFT noise (a 1/255 step is 4e-3)


class SynthesisError(Exception):
    """Base class of every error raised by `opir_engine.synthesis`."""


class UnknownKindError(SynthesisError, ValueError):
    """A degradation kind other than rain, snow, haze or mixed."""


class InvalidImageError(SynthesisError, ValueError):
    """A tensor that is not a float (3, H, W) or (B, 3, H, W) image, or a bad depth map."""


class InvalidParamsError(SynthesisError, ValueError):
    """A parameter dict that does not describe a `RainParams`, `SnowParams` or `HazeParams`."""


class InvalidSeedError(SynthesisError, ValueError):
    """A seed that is not a non-negative integer."""


class NoCleanImagesError(SynthesisError):
    """A clean folder with no image files in it."""


class UnreadableImageError(SynthesisError):
    """A clean image file that Pillow cannot open or decode."""


class SourceChangedError(SynthesisError):
    """A pair record whose source image is missing or no longer has the recorded bytes."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreakLayer:
    """One layer of rain streaks R_k (Eq. 2): seeds motion-blurred into lines.

    angle_deg: streak direction from vertical (positive leans right going down).
    length: streak length (px); width: gaussian sigma across the streak (px).
    density: streaks per 10,000 px; intensity: peak added brightness of one streak;
    jitter: each streak's brightness is intensity * U(1 - jitter, 1).
    """

    angle_deg: float
    length: float
    width: float
    density: float
    intensity: float
    jitter: float


@dataclass(frozen=True)
class FlakeLayer:
    """One layer of the snow mask M (Eq. 3): seeds drawn as soft discs, optionally smeared.

    size: radius of the opaque core (px); blur: gaussian sigma of the edge (px);
    motion: smear length (px, 0 = round flakes) along angle_deg from vertical;
    density: flakes per 10,000 px; opacity: peak M of one flake;
    jitter: each flake's opacity is opacity * U(1 - jitter, 1).
    """

    size: float
    blur: float
    motion: float
    angle_deg: float
    density: float
    opacity: float
    jitter: float


def _check_keys(cls: type, d: dict[str, Any], extra: Sequence[str] = ()) -> None:
    names = {f.name for f in fields(cls)} | set(extra)
    missing = names - set(d)
    unknown = set(d) - names
    if missing or unknown:
        raise InvalidParamsError(
            f"{cls.__name__}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
        )


def _check_kind(cls: type, d: dict[str, Any]) -> None:
    if d.get("kind") != cls.kind:
        raise InvalidParamsError(f"{cls.__name__}: kind is {d.get('kind')!r}, not {cls.kind!r}")


@dataclass(frozen=True)
class RainParams:
    """Everything drawn for one rain image: streak layers plus a veil.

    veil: strength in [0, 1) of the rain veil, a screen blend towards white
    (``J + veil (1 - J)``): far drops too small to resolve scatter light like haze, and
    the screen form keeps rain purely brightening, as Eq. 2 is.
    """

    kind: ClassVar[str] = "rain"
    layers: tuple[StreakLayer, ...]
    veil: float
    scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with ``"kind": "rain"``."""
        return {"kind": self.kind, **asdict(self), "layers": [asdict(x) for x in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RainParams:
        """Inverse of `to_dict`."""
        _check_kind(cls, d)
        _check_keys(cls, d, extra=("kind",))
        try:
            layers = tuple(StreakLayer(**x) for x in d["layers"])
        except TypeError as e:
            raise InvalidParamsError(f"RainParams: bad streak layer ({e})") from e
        return cls(layers=layers, veil=float(d["veil"]), scale=float(d["scale"]))


@dataclass(frozen=True)
class SnowParams:
    """Everything drawn for one snow image: flake layers, snow colour S and a veil.

    colour: S of Eq. 3, near white (RGB); veil: strength in [0, 1) of a haze-like blend of J
    towards S before the flakes (falling snow thins the air like fog does).
    """

    kind: ClassVar[str] = "snow"
    layers: tuple[FlakeLayer, ...]
    colour: tuple[float, float, float]
    veil: float
    scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with ``"kind": "snow"``."""
        return {
            "kind": self.kind,
            **asdict(self),
            "layers": [asdict(x) for x in self.layers],
            "colour": list(self.colour),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnowParams:
        """Inverse of `to_dict`."""
        _check_kind(cls, d)
        _check_keys(cls, d, extra=("kind",))
        try:
            layers = tuple(FlakeLayer(**x) for x in d["layers"])
        except TypeError as e:
            raise InvalidParamsError(f"SnowParams: bad flake layer ({e})") from e
        r, g, b = (float(c) for c in d["colour"])
        return cls(layers=layers, colour=(r, g, b), veil=float(d["veil"]), scale=float(d["scale"]))


@dataclass(frozen=True)
class HazeParams:
    """Everything drawn for one haze image (Eq. 4).

    beta: scattering coefficient, t = exp(-beta d) with d normalized to [0, 1];
    airlight: A (RGB), bright and near grey.
    depth_kind: "proxy" (d built from the image, see `make_depth_proxy`) or "given"
    (d from a depth map passed to `apply_haze`, divided by its maximum).
    The rest shape the proxy: horizon (row of the horizon as a fraction of the height),
    near (relative depth of the bottom row), field_cells (size of the coarse random grid of
    the low-frequency field), and the weights of the ground-plane gradient, the random field
    and the dark-channel cue.
    """

    kind: ClassVar[str] = "haze"
    beta: float
    airlight: tuple[float, float, float]
    depth_kind: str = "proxy"
    horizon: float = 0.35
    near: float = 0.2
    field_cells: int = 4
    gradient_weight: float = 1.0
    field_weight: float = 0.5
    dark_weight: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with ``"kind": "haze"``."""
        return {"kind": self.kind, **asdict(self), "airlight": list(self.airlight)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HazeParams:
        """Inverse of `to_dict`."""
        _check_kind(cls, d)
        _check_keys(cls, d, extra=("kind",))
        r, g, b = (float(c) for c in d["airlight"])
        return cls(
            beta=float(d["beta"]),
            airlight=(r, g, b),
            depth_kind=str(d["depth_kind"]),
            horizon=float(d["horizon"]),
            near=float(d["near"]),
            field_cells=int(d["field_cells"]),
            gradient_weight=float(d["gradient_weight"]),
            field_weight=float(d["field_weight"]),
            dark_weight=float(d["dark_weight"]),
        )


WeatherParams = RainParams | SnowParams | HazeParams
_PARAM_CLASSES: dict[str, type] = {"rain": RainParams, "snow": SnowParams, "haze": HazeParams}


def params_from_dict(d: dict[str, Any]) -> WeatherParams:
    """Rebuild `RainParams`, `SnowParams` or `HazeParams` from `to_dict` output, by its kind."""
    cls = _PARAM_CLASSES.get(d.get("kind", ""))
    if cls is None:
        raise InvalidParamsError(f"params: unknown kind {d.get('kind')!r}")
    return cls.from_dict(d)


def _f(x: float) -> float:
    # Python floats (not numpy scalars), so JSON round trips are exact.
    return float(x)


def _lerp(a: float, b: float, w: float) -> float:
    return a + (b - a) * w


def sample_rain_params(rng: np.random.Generator, scale: float = 1.0) -> RainParams:
    """Draw rain parameters: 2-4 streak layers from far (short, thin, faint, dense) to near.

    Ranges were tuned by eye against Rain13K, DDN and GT-RAIN photos and so that the mean PSNR
    of rainy vs clean is near the real sets' (~22 dB). One wind angle is shared by all layers,
    each jittered a little, as the rain in one photo falls one way.
    """
    severity = rng.uniform(0.0, 1.0)
    wind = rng.normal(0.0, 10.0)
    layers = []
    n_layers = int(rng.integers(2, 5))
    for z in np.sort(rng.uniform(0.0, 1.0, n_layers)):  # z: 0 far .. 1 near
        layers.append(
            StreakLayer(
                angle_deg=_f(np.clip(wind + rng.normal(0.0, 2.0), -40.0, 40.0)),
                length=_f(_lerp(8.0, 35.0, z) * rng.uniform(0.7, 1.4)),
                width=_f(_lerp(0.4, 1.0, z) * rng.uniform(0.85, 1.2)),
                density=_f(_lerp(60.0, 8.0, z) * _lerp(0.2, 1.5, severity) * rng.uniform(0.6, 1.4)),
                intensity=_f(_lerp(0.12, 0.35, z) * rng.uniform(0.7, 1.3)),
                jitter=0.6,
            )
        )
    veil = _f(rng.uniform(0.0, 0.2) * severity)
    return RainParams(layers=tuple(layers), veil=veil, scale=_f(scale))


def sample_snow_params(rng: np.random.Generator, scale: float = 1.0) -> SnowParams:
    """Draw snow parameters: a fine grain, mid-size flakes, and sometimes large near flakes.

    Matches what the Snow100K masks show: a dense grain of 1-2 px dim specks (some smeared by
    their fall), sharper 2-4 px flakes, and a few large soft bokeh discs of low opacity.
    """
    severity = rng.uniform(0.0, 1.0)
    wind = rng.normal(0.0, 20.0)
    heavy = _lerp(0.3, 1.5, severity)

    def angle() -> float:
        return _f(np.clip(wind + rng.normal(0.0, 5.0), -70.0, 70.0))

    layers = [
        FlakeLayer(  # fine grain, far flakes
            size=_f(rng.uniform(0.0, 0.4)),
            blur=_f(rng.uniform(0.5, 0.8)),
            motion=_f(rng.choice([0.0, rng.uniform(1.0, 5.0)])),
            angle_deg=angle(),
            density=_f(rng.uniform(60.0, 400.0) * heavy),
            opacity=_f(rng.uniform(0.2, 0.6)),
            jitter=0.6,
        ),
        FlakeLayer(  # mid flakes
            size=_f(rng.uniform(0.5, 1.5)),
            blur=_f(rng.uniform(0.6, 1.1)),
            motion=_f(rng.choice([0.0, rng.uniform(1.0, 6.0)])),
            angle_deg=angle(),
            density=_f(rng.uniform(6.0, 30.0) * heavy),
            opacity=_f(rng.uniform(0.7, 1.0)),
            jitter=0.4,
        ),
    ]
    if rng.uniform() < 0.6:
        layers.append(
            FlakeLayer(  # large near flakes, out of focus
                size=_f(rng.uniform(2.0, 6.0)),
                blur=_f(rng.uniform(1.0, 2.5)),
                motion=_f(rng.choice([0.0, rng.uniform(1.0, 4.0)])),
                angle_deg=angle(),
                density=_f(rng.uniform(0.1, 0.8) * heavy),
                opacity=_f(rng.uniform(0.3, 0.8)),
                jitter=0.5,
            )
        )
    base = rng.uniform(0.85, 1.0)
    tint = rng.uniform(0.0, 0.03)  # snow light leans slightly blue
    colour = (_f(base - tint), _f(base), _f(min(1.0, base + tint)))
    veil = _f(rng.uniform(0.0, 0.35) * severity)
    return SnowParams(layers=tuple(layers), colour=colour, veil=veil, scale=_f(scale))


def sample_haze_params(rng: np.random.Generator) -> HazeParams:
    """Draw haze parameters: beta, a bright near-grey A, and the depth-proxy shape.

    beta over [0.3, 2.6] spans thin haze (far transmission 0.74) to dense (0.07), like the
    RESIDE and HazeRD levels; A in [0.7, 1.0] with a small colour cast, as RESIDE draws it.
    """
    base = rng.uniform(0.7, 1.0)
    r, g, b = (_f(np.clip(base + c, 0.0, 1.0)) for c in rng.uniform(-0.03, 0.03, 3))
    return HazeParams(
        beta=_f(rng.uniform(0.3, 2.6)),
        airlight=(r, g, b),
        depth_kind="proxy",
        horizon=_f(rng.uniform(0.2, 0.6)),
        near=_f(rng.uniform(0.1, 0.4)),
        field_cells=int(rng.integers(2, 7)),
        gradient_weight=_f(rng.uniform(0.5, 1.0)),
        field_weight=_f(rng.uniform(0.1, 0.6)),
        dark_weight=_f(rng.uniform(0.0, 0.35)),
    )


def sample_params(kind: str, rng: np.random.Generator, scale: float = 1.0) -> WeatherParams:
    """Draw parameters for `kind` ("rain", "snow" or "haze"); `scale` as in `scale_for_size`."""
    if kind == "rain":
        return sample_rain_params(rng, scale)
    if kind == "snow":
        return sample_snow_params(rng, scale)
    if kind == "haze":
        return sample_haze_params(rng)
    raise UnknownKindError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")


def scale_for_size(height: int, width: int) -> float:
    """Scale of the pixel sizes for an image of this size: short side / 400, at least 1."""
    return max(1.0, min(height, width) / REFERENCE_SHORT_SIDE)


# --------------------------------------------------------------------------------------------
# Random fields
# --------------------------------------------------------------------------------------------


def _as_batch(clean: torch.Tensor, name: str = "clean") -> torch.Tensor:
    if not isinstance(clean, torch.Tensor) or not clean.is_floating_point():
        raise InvalidImageError(f"{name}: expected a float tensor, got {type(clean).__name__}")
    if clean.dim() not in (3, 4) or clean.shape[-3] != 3:
        raise InvalidImageError(
            f"{name}: expected shape (3, H, W) or (B, 3, H, W), got {tuple(clean.shape)}"
        )
    batch = clean if clean.dim() == 4 else clean.unsqueeze(0)
    return batch.to(torch.float32)


def _like(out: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    out = out.clamp_(0.0, 1.0).to(clean.dtype)
    return out if clean.dim() == 4 else out.squeeze(0)


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


def _normalize_depth(depth: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    if not isinstance(depth, torch.Tensor) or depth.shape[-2:] != (h, w):
        shape = tuple(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__
        raise InvalidImageError(f"depth: expected (..., {h}, {w}), got {shape}")
    d = depth.to(torch.float32).reshape(-1, 1, h, w)
    if d.shape[0] not in (1, b):
        raise InvalidImageError(f"depth: {d.shape[0]} maps for a batch of {b}")
    if (d < 0).any() or not torch.isfinite(d).all():
        raise InvalidImageError("depth: values must be finite and non-negative")
    d = d.expand(b, 1, h, w)
    return d / d.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)


# --------------------------------------------------------------------------------------------
# The three degradations
# --------------------------------------------------------------------------------------------


def apply_rain(clean: torch.Tensor, params: RainParams, seed: int) -> torch.Tensor:
    """Rain by Eq. 2, I = J + sum_k R_k, after an optional veil; (B, 3, H, W) or (3, H, W).

    `seed` places the streaks; output has the input's shape and dtype, clipped to [0, 1].
    """
    j = _as_batch(clean)
    b, _, h, w = j.shape
    veiled = j + params.veil * (1.0 - j)  # screen towards white: brightens, never darkens
    out = veiled + render_rain_streaks(b, h, w, params, seed)
    return _like(out, clean)


def apply_snow(clean: torch.Tensor, params: SnowParams, seed: int) -> torch.Tensor:
    """Snow by Eq. 3, I = M S + (1 - M) J, after an optional veil; (B, 3, H, W) or (3, H, W).

    `seed` places the flakes; output has the input's shape and dtype, clipped to [0, 1].
    """
    j = _as_batch(clean)
    b, _, h, w = j.shape
    s = torch.tensor(params.colour, dtype=torch.float32).view(1, 3, 1, 1)
    veiled = j * (1.0 - params.veil) + params.veil * s
    m = render_snow_mask(b, h, w, params, seed)
    out = m * s + (1.0 - m) * veiled
    return _like(out, clean)


def apply_haze(
    clean: torch.Tensor, params: HazeParams, seed: int, depth: torch.Tensor | None = None
) -> torch.Tensor:
    """Haze by Eq. 4, I = J t + A (1 - t), t = exp(-beta d); (B, 3, H, W) or (3, H, W).

    depth: optional (H, W), (1, H, W), (B, H, W) or (B, 1, H, W) distances (any unit), scaled
    per image to a maximum of 1; without it d comes from `make_depth_proxy` (its random field
    drawn from `seed`). Output has the input's shape and dtype, in [0, 1].
    """
    j = _as_batch(clean)
    b, _, h, w = j.shape
    if depth is not None:
        d = _normalize_depth(depth, b, h, w)
    elif params.depth_kind == "given":
        raise InvalidImageError("depth: these haze params need a depth map, none was given")
    else:
        d = make_depth_proxy(j, params, seed)
    t = torch.exp(-params.beta * d)
    a = torch.tensor(params.airlight, dtype=torch.float32).view(1, 3, 1, 1)
    out = j * t + a * (1.0 - t)
    return _like(out, clean)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidSeedError(f"seed {seed!r}: expected a non-negative integer")


def _streams(seed: int) -> tuple[np.random.Generator, int]:
    """Parameter generator and field seed, both derived from one seed and independent."""
    _check_seed(seed)
    params_rng = np.random.default_rng([_PARAM_STREAM, seed])
    field_seed = int(np.random.SeedSequence([_FIELD_STREAM, seed]).generate_state(1, np.uint64)[0])
    return params_rng, field_seed


def apply_params(
    clean: torch.Tensor, params: WeatherParams, seed: int, depth: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply rain, snow or haze parameters (dispatch on their type); see `apply_*`."""
    if isinstance(params, RainParams):
        return apply_rain(clean, params, seed)
    if isinstance(params, SnowParams):
        return apply_snow(clean, params, seed)
    return apply_haze(clean, params, seed, depth)


def synthesize(
    clean: torch.Tensor,
    kind: str,
    seed: int,
    scale: float = 1.0,
    depth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, WeatherParams]:
    """Degrade `clean` (3, H, W) or (B, 3, H, W) with `kind` drawn entirely from `seed`.

    kind: "rain", "snow", "haze", or "mixed" (one of the three picked from the seed; the
    returned params' `kind` says which). A batch shares one parameter draw but gets its own
    streaks, flakes and depth fields per image. Returns (degraded, params); rebuild with
    ``apply_params(clean, params, field_seed(seed))``.
    """
    rng, fseed = _streams(seed)
    if kind == "mixed":
        kind = str(rng.choice(KINDS))
    params = sample_params(kind, rng, scale)
    return apply_params(clean, params, fseed, depth), params


def field_seed(seed: int) -> int:
    """The seed `synthesize(..., seed)` passes to `apply_*` for its random fields."""
    return _streams(seed)[1]


class WeatherSynthesizer:
    """Per-crop degradation for training data loaders; keeps no per-call state.

    ``synth(clean, kind, generator)`` takes a clean crop (3, H, W) float32 in [0, 1], a kind
    ("rain", "snow", "haze" or "mixed") and the loader's `numpy.random.Generator`, and returns
    the degraded crop. For "mixed" call `pick_kind` first when the label is needed.
    """

    def __init__(self, kinds: Sequence[str] = KINDS, scale: float = 1.0) -> None:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise UnknownKindError(f"kinds {list(kinds)}: expected a subset of {', '.join(KINDS)}")
        self.kinds = tuple(kinds)
        self.scale = scale

    def pick_kind(self, generator: np.random.Generator) -> str:
        """One of `kinds`, uniformly."""
        return self.kinds[int(generator.integers(len(self.kinds)))]

    def __call__(
        self, clean: torch.Tensor, kind: str, generator: np.random.Generator
    ) -> torch.Tensor:
        """(3, H, W) clean -> (3, H, W) degraded, with a seed drawn from `generator`."""
        if kind == "mixed":
            kind = self.pick_kind(generator)
        seed = int(generator.integers(0, 2**63))
        return synthesize(clean, kind, seed, self.scale)[0]


# --------------------------------------------------------------------------------------------
# Folders of pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedPair:
    """One pair `synthesize_folder` will write: output stem, clean source and seed."""

    index: int
    stem: str
    source: Path
    seed: int


def list_clean_images(clean_dir: Path) -> list[Path]:
    """Image files under `clean_dir` (recursively), sorted by relative path."""
    clean_dir = Path(clean_dir)
    files = [
        p
        for p in clean_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    if not files:
        raise NoCleanImagesError(f"{clean_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: p.relative_to(clean_dir).as_posix())


def plan_pairs(clean_dir: Path, count: int, seed: int) -> list[PlannedPair]:
    """Choose `count` sources from `clean_dir`, deterministically from `seed`.

    The images are shuffled once per pass and cycled when `count` exceeds their number; each
    pair gets its own seed derived from (seed, index) and a unique stem ``<index>_<source stem>``.
    """
    _check_seed(seed)
    files = list_clean_images(clean_dir)
    rng = np.random.default_rng([_SHUFFLE_STREAM, seed])
    order: list[int] = []
    while len(order) < count:
        order.extend(int(i) for i in rng.permutation(len(files)))
    plan = []
    for index in range(count):
        source = files[order[index]]
        state = np.random.SeedSequence([_PAIR_STREAM, seed, index]).generate_state(1, np.uint64)
        pair_seed = int(state[0])
        plan.append(PlannedPair(index, f"{index:06d}_{source.stem}", source, pair_seed))
    return plan


def read_clean_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UnreadableImageError(f"{path}: cannot read image ({e})") from e


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32).div_(255.0)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _write_png(rgb: np.ndarray, path: Path) -> None:
    # Write beside the target and rename, so an interrupted run never leaves half a PNG.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(rgb, "RGB").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_pair(
    record: dict[str, Any], source: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) as (H, W, 3) uint8 arrays rebuilt from a pair record.

    source: the clean image, where it has moved since the record was written (its bytes must
    still match the recorded SHA-256); by default the recorded path.
    """
    source = Path(record["source"] if source is None else source)
    if not source.is_file():
        raise SourceChangedError(f"{source}: source image of pair {record['stem']} is missing")
    if _sha256(source) != record["source_sha256"]:
        raise SourceChangedError(f"{source}: bytes differ from those pair {record['stem']} used")
    target = read_clean_image(source)
    params = params_from_dict(record["params"])
    degraded = apply_params(_to_tensor(target), params, field_seed(record["seed"]))
    return _to_uint8(degraded), target


def synthesize_pair(pair: PlannedPair, out_dir: Path, kind: str) -> dict[str, Any]:
    """Write one pair (``input/<stem>.png``, ``target/<stem>.png``) and return its record.

    The record holds the source path and SHA-256, the requested and the drawn kind, the seed
    and every parameter, so `regenerate` rebuilds the same bytes.
    """
    out_dir = Path(out_dir)
    target = read_clean_image(pair.source)
    h, w = target.shape[:2]
    degraded, params = synthesize(_to_tensor(target), kind, pair.seed, scale_for_size(h, w))
    record = {
        "index": pair.index,
        "stem": pair.stem,
        "source": str(pair.source.resolve()),
        "source_sha256": _sha256(pair.source),
        "requested_kind": kind,
        "kind": params.kind,
        "seed": pair.seed,
        "width": w,
        "height": h,
        "input": f"input/{pair.stem}.png",
        "target": f"target/{pair.stem}.png",
        "params": params.to_dict(),
    }
    _write_png(_to_uint8(degraded), out_dir / record["input"])
    _write_png(target, out_dir / record["target"])
    return record


def synthesize_folder(
    clean_dir: Path, out_dir: Path, kind: str, count: int, seed: int
) -> list[dict[str, Any]]:
    """Write `count` synthetic pairs from the photos in `clean_dir` to `out_dir`.

    Layout: ``out_dir/input/<stem>.png`` (degraded), ``out_dir/target/<stem>.png`` (clean,
    8-bit RGB, EXIF orientation applied) and one JSON line per pair appended to
    ``out_dir/pairs.jsonl``. Same arguments, same bytes. Stops at the first unreadable image
    (`UnreadableImageError`); a caller that wants to go on loops over `plan_pairs` and
    `synthesize_pair` itself.
    """
    if kind not in (*KINDS, "mixed"):
        raise UnknownKindError(f"kind {kind!r}: expected one of {', '.join(KINDS)}, mixed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out_dir / "pairs.jsonl", "a", encoding="utf-8") as log:
        for pair in plan_pairs(Path(clean_dir), count, seed):
            record = synthesize_pair(pair, out_dir, kind)
            log.write(json.dumps(record, sort_keys=True) + "\n")
            log.flush()
            records.append(record)
    return records


def regenerate(record: dict[str, Any], out_dir: Path, source: Path | None = None) -> dict[str, Any]:
    """Rebuild the pair of a `pairs.jsonl` record into `out_dir`, byte for byte; returns it.

    source: as in `render_pair`, for a clean image that has moved.
    """
    degraded, target = render_pair(record, source)
    _write_png(degraded, Path(out_dir) / record["input"])
    _write_png(target, Path(out_dir) / record["target"])
    return record
