"""Kernel prediction network: a NAFNet U-Net that predicts the inverse operator per pixel."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from opir_engine.model.config import OPIRConfig
from opir_engine.model.nafnet import NAFBlock

CENTER_TAP = 4  # delta = (0, 0) in the row-major 3x3 order


class KPNOutput(NamedTuple):
    kernel: Tensor  # (B, 9, H, W) base taps K_p(delta), Eq. 14
    fusion_logits: Tensor  # (B, S, H, W), softmax gives alpha of Eq. 18
    bias: Tensor  # (B, 3, H, W), the b_t of Eq. 5
    bottleneck: Tensor  # (B, C_mid, H / 2^L, W / 2^L), read by the degradation head


class KPN(nn.Module):
    """U-Net of NAFBlocks; per pixel: 9 taps, S fusion logits and a 3-channel bias.

    Why the bias: a pure filter can only form weighted sums of nearby pixels, but haze is
    affine, I = J t + A (1 - t) (Eq. 4), so its inverse J = (I - A (1 - t)) / t needs an
    additive term as well as a scale. Eq. 5 writes every degradation as H_t J + b_t; the KPN
    predicts the b that goes with the inverse of H_t.

    The output convolution starts at zero and the centre tap is offset by one, so an untrained
    KPN predicts the identity operator: the model starts by returning its input.
    """

    def __init__(self, config: OPIRConfig, in_channels: int = 3) -> None:
        super().__init__()
        width, scales = config.width, len(config.dilations)
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for n in config.enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(n)]))
            self.downs.append(nn.Conv2d(channels, channels * 2, 2, stride=2))
            channels *= 2
        self.middle = nn.Sequential(*[NAFBlock(channels) for _ in range(config.middle_blocks)])
        self.bottleneck_channels = channels
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for n in reversed(config.dec_blocks):
            self.ups.append(nn.Sequential(nn.Conv2d(channels, channels * 2, 1), nn.PixelShuffle(2)))
            channels //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(n)]))
        self.ending = nn.Conv2d(width, 9 + scales + 3, 3, padding=1)
        nn.init.zeros_(self.ending.weight)
        nn.init.zeros_(self.ending.bias)
        self.scales = scales

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x (B, 3, H, W), sides multiples of 2^levels -> (bottleneck, skip features)."""
        y = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            y = encoder(y)
            skips.append(y)
            y = down(y)
        return self.middle(y), skips

    def decode(self, bottleneck: Tensor, skips: list[Tensor]) -> KPNOutput:
        y = bottleneck
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            y = decoder(up(y) + skip)
        out = self.ending(y)
        kernel, fusion_logits, bias = torch.split(out, [9, self.scales, 3], dim=1)
        identity = torch.zeros(9, device=out.device, dtype=out.dtype)
        identity[CENTER_TAP] = 1.0
        return KPNOutput(kernel + identity.view(1, 9, 1, 1), fusion_logits, bias, bottleneck)

    def forward(self, x: Tensor) -> KPNOutput:
        return self.decode(*self.encode(x))
