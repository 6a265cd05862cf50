"""How much veil a restoration leaves: the dark channel prior (He, Sun and Tang, CVPR 2009).

In a haze-free outdoor photo most windows of about 15 px hold some pixel that is near 0 in some
channel (a shadow, a dark or saturated thing); haze lifts those minima by its airlight. The
mean over the image of the window minimum of the channel minimum is therefore low where the
veil is gone. The engine reads it, for weights whose card asks for it, to choose the working
side of a hazy photo among a few restorations of it (`working_scale.py`), where no target exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DARK_CHANNEL_WINDOW = 15  # px, the prior's window at the photo sizes the paper measured


def dark_channel_map(x: torch.Tensor, window: int = DARK_CHANNEL_WINDOW) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): each pixel's minimum over the channels and over the
    `window`-wide square around it (clipped at the borders), in x's dtype."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the window must be an odd number of pixels, got {window}")
    # max_pool of the negation is a min filter; its implicit -inf padding clips the borders
    return -F.max_pool2d(-x.amin(dim=1, keepdim=True), window, stride=1, padding=window // 2)


def dark_channel(image: torch.Tensor, window: int = DARK_CHANNEL_WINDOW) -> float:
    """Mean dark channel of an image (3, H, W) in [0, 1] (`dark_channel_map` averaged)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got {tuple(image.shape)}")
    return float(dark_channel_map(image.float()[None], window).mean())
