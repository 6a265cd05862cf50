"""Pad images to the model's size multiple and crop results back."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pad_to_multiple(image: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (padded, (H, W)); reflect padding at the bottom and right.

    Reflection keeps image statistics at the border (zeros would look like a dark frame to the
    network). Sides of 1 pixel cannot reflect, so they replicate instead.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return image, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def crop_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Undo `pad_to_multiple`: keep the top-left `size` = (H, W)."""
    return image[..., : size[0], : size[1]]


def pad_reflect_to(image: Tensor, height: int, width: int) -> Tensor:
    """Pad (B, C, h, w) at the bottom and right to (B, C, height, width) by reflection.

    Reflection keeps image statistics at the border (zeros would look like a dark frame to the
    network); a pad longer than the side reflects again, and a 1-pixel side repeats.
    """
    while image.shape[-2] < height or image.shape[-1] < width:
        h, w = image.shape[-2:]
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        if (pad_h and h == 1) or (pad_w and w == 1):  # reflection needs 2 pixels
            return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        image = F.pad(image, (0, min(pad_w, w - 1), 0, min(pad_h, h - 1)), mode="reflect")
    return image
