"""NAFNet building blocks (Chen et al., 2022), the backbone of the KPN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # On a channels-last map (how the KPN runs) the permute is a view, not a copy
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: a nonlinearity without activation."""

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


def masked_mean(y: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of (B, C, H, W) over H and W, keepdim; with `valid` (B, 1, H, W) of 0 and 1, over
    the valid pixels only. The engine pads photos (to a multiple of the U-Net's stride, or up
    to a shape bucket for the compiled graph); the padding must not shift a statistic of the
    whole map, or the same photo would restore differently with and without it."""
    if valid is None:
        return y.mean(dim=(2, 3), keepdim=True)
    return (y * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True)


def run_blocks(blocks: nn.Sequential, x: Tensor, valid: Tensor | None = None) -> Tensor:
    """x through a sequence of NAFBlocks that share one validity mask."""
    for block in blocks:
        x = block(x, valid)
    return x


class NAFBlock(nn.Module):
    """NAFNet block: LN, 1x1, depthwise 3x3, SimpleGate, simplified channel attention, then a
    gated feed-forward. `beta` and `gamma` start at zero, so the block starts as the identity."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.sg = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden // 2, hidden // 2, 1))
        self.conv3 = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, hidden, 1)
        self.conv5 = nn.Conv2d(hidden // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x (B, C, H, W); valid (B, 1, H, W): the pixels that are image, not padding (None:
        all), the only ones the channel attention's global mean reads."""
        y = self.conv1(self.norm1(x))
        y = self.sg(self.conv2(y))
        y = y * (self.sca(y) if valid is None else self.sca[1](masked_mean(y, valid)))
        x = torch.addcmul(x, self.conv3(y), self.beta)  # x + conv3(y) beta in one pass
        y = self.sg(self.conv4(self.norm2(x)))
        return torch.addcmul(x, self.conv5(y), self.gamma)
