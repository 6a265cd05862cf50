"""The three degradations of paper section 3.1 applied to clean images, and `synthesize`, which
draws everything for them from one seed.

`synthesize(clean, kind, seed)` splits its seed into two streams (see `seeds`), one for the
parameters (`sample_*_params`) and one for the random fields that `apply_*` draws from its own
`seed` argument; a parameter record plus its seed therefore rebuilds a degraded image exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from opir_engine.synthesis.errors import InvalidImageError, UnknownKindError
from opir_engine.synthesis.fields import make_depth_proxy, render_rain_streaks, render_snow_mask
from opir_engine.synthesis.params import (
    KINDS,
    HazeParams,
    RainParams,
    SnowParams,
    WeatherParams,
    sample_params,
)
from opir_engine.synthesis.seeds import split_seed


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


def apply_veil(image: torch.Tensor, params: HazeParams) -> torch.Tensor:
    """`image` (any weather already on it) seen through a veil of even depth, Eq. 4 with d = 1:
    I = image t + A (1 - t), t = exp(-beta); `params` from `sample_veil_params`."""
    j = _as_batch(image, "image")
    return apply_haze(image, params, seed=0, depth=torch.ones(j.shape[-2:]))


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
    rng, fseed = split_seed(seed)
    if kind == "mixed":
        kind = str(rng.choice(KINDS))
    params = sample_params(kind, rng, scale)
    return apply_params(clean, params, fseed, depth), params


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
