"""Rain-layer transplant: the rain of one paired photo laid on another clean photo.

Other renderers draw rain our own renderer does not (longer, brighter, denser streaks in several
directions, an accumulation veil), and a model learns the streaks it is shown. Their rain layer,
the degraded image minus its target where positive (rain only brightens, paper Eq. 2), carries
that rain to any clean photo: shifted, flipped, rescaled and at another strength, it becomes a
new pair whose target is exact. The negative part (JPEG noise, the darkening of a scattering
veil) is dropped: it belongs to the source photo, not to the rain.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def rain_layer(degraded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rain of a pair, float (3, H, W): the fine part of (degraded - target) where positive
    (the streaks), plus its mean low-frequency part (the veil) as one uniform level. Integer
    images are taken as 8-bit.

    Only the veil's mean is kept: renderers shade the veil by the scene's depth, so its shape
    (and the slow part of any non-additive blend) is a ghost of the source photo that would
    show on every photo it is laid on.
    """
    if degraded.shape != target.shape:
        raise ValueError(
            f"degraded {tuple(degraded.shape)} and target {tuple(target.shape)} differ"
        )
    scale = 255.0 if not degraded.is_floating_point() else 1.0
    diff = ((degraded.float() - target.float()) / scale)[None]
    slow = F.avg_pool2d(F.pad(diff, (_SLOW // 2,) * 4, mode="replicate"), _SLOW, stride=1)
    veil = slow.mean(dim=(2, 3), keepdim=True).clamp(min=0)
    return ((diff - slow).clamp(min=0) + veil)[0]


_SLOW = 15  # px: a box wider than any streak, narrower than the scene's shapes


def fit_layer(layer: torch.Tensor, height: int, width: int, zoom: float = 1.0) -> torch.Tensor:
    """`layer` (3, h, w) scaled by `zoom` (at least enough to cover height x width, bilinear)
    and centre-cropped to (3, height, width)."""
    h, w = layer.shape[-2:]
    s = max(zoom, height / h, width / w)
    if s != 1.0:
        size = (max(height, math.ceil(h * s)), max(width, math.ceil(w * s)))
        layer = F.interpolate(layer[None], size=size, mode="bilinear", align_corners=False)[0]
    top, left = (layer.shape[-2] - height) // 2, (layer.shape[-1] - width) // 2
    return layer[:, top : top + height, left : left + width]


def lay_rain(photo: torch.Tensor, layer: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """`photo` (3, H, W) in [0, 1] with `layer` (already its size) added at `strength`,
    clipped to [0, 1] like the rendered sets."""
    return (photo + strength * layer).clamp(0, 1)


def random_transplant(
    photo: torch.Tensor, layers: list[torch.Tensor], rng: np.random.Generator
) -> torch.Tensor:
    """`photo` (3, P, P) in [0, 1] under a random crop of a random layer: zoomed 0.7-1.6x,
    flipped left-right at random, at strength 0.5-1.3; one time in four a second layer is
    added (heavier, crossing rain). Deterministic given `rng`."""
    p_h, p_w = photo.shape[-2:]
    out = photo
    for k in range(2 if rng.random() < 0.25 else 1):
        layer = layers[int(rng.integers(len(layers)))]
        zoom = float(rng.uniform(0.7, 1.6))
        h, w = layer.shape[-2:]
        s = max(zoom, p_h / h, p_w / w)
        # crop a patch-sized window (in the layer's own pixels) before scaling: cheap for big layers
        ch, cw = min(h, math.ceil(p_h / s) + 1), min(w, math.ceil(p_w / s) + 1)
        y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        piece = fit_layer(layer[:, y : y + ch, x : x + cw], p_h, p_w, zoom)
        if rng.random() < 0.5:
            piece = piece.flip(-1)
        out = lay_rain(out, piece, float(rng.uniform(0.5, 1.3)) * (0.7 if k else 1.0))
    return out
