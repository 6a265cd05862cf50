"""Classical restorations a user could run instead of OPIR: the yardstick in the model card.

- haze: the dark channel prior (He, Sun and Tang, TPAMI 2011): a 15x15 dark channel, airlight
  from the brightest 0.1% of it, t = 1 - omega * dark(I / A) with omega 0.95, refined by a
  guided filter (radius 40, eps 1e-3) on the grey image, t clamped at 0.1, then Eq. 4 inverted.
- rain and snow: a 5x5 median filter per channel, the usual quick fix for thin streaks and
  small flakes (it removes them along with fine detail).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opir_engine.inference.dark_channel import dark_channel_map


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, edges replicated; x (B, C, H, W). Summed-area table, so the
    cost does not grow with the radius (the guided filter uses r = 40)."""
    k = 2 * radius + 1
    padded = F.pad(x, (radius + 1, radius, radius + 1, radius), mode="replicate")
    table = padded.cumsum(-1).cumsum(-2)
    h, w = x.shape[-2:]
    total = table[..., k:, k:] - table[..., :h, k:] - table[..., k:, :w] + table[..., :h, :w]
    return total / (k * k)


def _guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter with a grey guide (B, 1, H, W)."""
    mean_g, mean_s = _box(guide, radius), _box(src, radius)
    cov = _box(guide * src, radius) - mean_g * mean_s
    var = _box(guide * guide, radius) - mean_g * mean_g
    a = cov / (var + eps)
    b = mean_s - a * mean_g
    return _box(a, radius) * guide + _box(b, radius)


def dehaze_dark_channel(
    image: torch.Tensor, patch: int = 15, omega: float = 0.95, t_min: float = 0.1
) -> torch.Tensor:
    """(3, H, W) hazy in [0, 1] -> (3, H, W) dehazed by the dark channel prior."""
    x = image[None].double()
    dark = dark_channel_map(x, patch)
    flat = dark.flatten()
    count = max(1, flat.numel() // 1000)
    idx = flat.topk(count).indices
    airlight = x.flatten(2)[0][:, idx].mean(dim=1).clamp_min(1e-3).view(1, 3, 1, 1)
    t = 1 - omega * dark_channel_map(x / airlight, patch)
    grey = x.mean(dim=1, keepdim=True)
    radius = max(1, min(40, min(x.shape[-2:]) // 4))
    t = _guided_filter(grey, t, radius, 1e-3).clamp(t_min, 1)
    return ((x - airlight) / t + airlight).clamp(0, 1)[0].float()


def median_filter(image: torch.Tensor, size: int = 5) -> torch.Tensor:
    """(C, H, W) -> per-channel median over size x size windows, edges reflected."""
    r = size // 2
    padded = F.pad(
        image[None], (r,) * 4, mode="reflect" if min(image.shape[-2:]) > r else "replicate"
    )
    patches = F.unfold(padded, size).view(image.shape[0], size * size, *image.shape[-2:])
    return patches.median(dim=1).values


def classical_baseline(image: torch.Tensor, task: str) -> torch.Tensor:
    """The baseline for a task (see the module docstring)."""
    if task == "haze":
        return dehaze_dark_channel(image)
    if task in ("rain", "snow"):
        return median_filter(image)
    return image


BASELINE_NAMES = {"haze": "dark channel prior", "rain": "median 5x5", "snow": "median 5x5"}
