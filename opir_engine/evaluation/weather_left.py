"""How much of the weather is left: the oriented high-frequency energy of a residual.

PSNR mixes what a restoration gets wrong everywhere (a veil, a colour shift) with what it leaves
of the streaks and flakes, and a model that dims every streak gains decibels from the veil alone.
This figure looks only at thin, line-like structure: the streak energy (`inference/streaks.py`)
of the residual, image minus target. `weather_left` is the square root of the output's energy
over the input's, an amplitude ratio: 1.0 means the streaks are all still there, 0.5 that they
are half as bright, 0.0 that none are.
(Measured on a Rain13K pair: the target blurred by a 3x3 box scores 0.25, gaussian noise of 5
levels 0.07, a uniform brightening by 0.1 below 0.03.)
"""

from __future__ import annotations

import math

import torch

from opir_engine.inference.streaks import streak_energy


def weather_left(
    degraded: torch.Tensor, restored: torch.Tensor, target: torch.Tensor
) -> float | None:
    """Share of the input's streak amplitude still in the output (images (3, H, W) in [0, 1]);
    None when the input has none (a clean photo)."""
    before = streak_energy(degraded - target)
    if before <= 1e-10:
        return None
    return math.sqrt(streak_energy(restored - target) / before)
