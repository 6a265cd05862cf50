"""Line-like structure in an image: the oriented high-frequency energy that rain streaks (and
the trails of falling flakes) leave and little else does.

A map (an image, or a residual such as image minus target) loses its local mean (a 9x9 box),
then is averaged along a short line in 12 directions; each pixel keeps its strongest direction.
A streak adds up along its own direction while noise, texture and blur errors average out, so
the energy of that map follows the streaks. `evaluation.weather_left` reads it on residuals
against a target; the engine's working-side choice (`working_scale.py`) reads it on the photo
and its restorations, where there is no target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LINE_LENGTH = 11  # px: longer than a flake, shorter than most streaks at validation sizes
DIRECTIONS = 12  # every 15 degrees over a half turn
_LUMA = (0.299, 0.587, 0.114)


def _line_kernels(length: int = LINE_LENGTH, directions: int = DIRECTIONS) -> torch.Tensor:
    """(directions, 1, length, length) kernels averaging along a centred line, anti-aliased by
    sampling each line at sub-pixel steps and splatting bilinearly."""
    c = (length - 1) / 2
    kernels = torch.zeros(directions, 1, length, length, dtype=torch.float64)
    t = torch.linspace(-c, c, 8 * length, dtype=torch.float64)
    for i in range(directions):
        angle = math.pi * i / directions
        ys, xs = c + t * math.cos(angle), c + t * math.sin(angle)
        y0, x0 = ys.floor().long(), xs.floor().long()
        fy, fx = ys - y0, xs - x0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                yy, xx = (y0 + dy).clamp(0, length - 1), (x0 + dx).clamp(0, length - 1)
                kernels[i, 0].index_put_((yy, xx), wy * wx, accumulate=True)
        kernels[i] /= kernels[i].sum()
    return kernels.float()


_KERNELS = _line_kernels()


def streak_energy(residual: torch.Tensor) -> float:
    """Mean squared strongest line response of a residual (3, H, W) (or (1, H, W))."""
    if residual.dim() != 3 or residual.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W) or (1, H, W) residual, got {tuple(residual.shape)}")
    r = residual.float()
    if r.shape[0] == 3:
        r = sum(w * r[i] for i, w in enumerate(_LUMA))[None]
    r = r[None]  # (1, 1, H, W)
    r = r - F.avg_pool2d(F.pad(r, (4, 4, 4, 4), mode="replicate"), 9, stride=1)
    half = LINE_LENGTH // 2
    lines = F.conv2d(F.pad(r, (half,) * 4, mode="replicate"), _KERNELS)
    return float(lines.abs().amax(dim=1).square().mean())
