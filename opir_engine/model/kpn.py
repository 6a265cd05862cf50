"""Kernel prediction network: a NAFNet U-Net that predicts the inverse operator per pixel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opir_engine.model.config import OPIRConfig
from opir_engine.model.nafnet import NAFBlock, run_blocks

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

    The U-Net runs on channels-last maps: LayerNorm2d's permute is then a view instead of a
    copy, and oneDNN's convolutions work in that layout natively; on the CPU the shipped model's
    forward at 512x512 took 0.76x the time (bench/cpu_speed.py). `channels_last = False`
    keeps the plain layout (the benchmark's baseline).
    """

    channels_last = True

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
        # The channel attention's pooling (config.pooling): a window side at full resolution,
        # halved at each level as the maps are; None pools each map whole
        self.pool_window = config.pool_window if config.pooling == "local" else None

    def level_windows(self) -> list[int | None]:
        """The channel attention's pooling window at each U-Net level, full size first."""
        if self.pool_window is None:
            return [None] * (len(self.downs) + 1)
        return [max(1, self.pool_window >> level) for level in range(len(self.downs) + 1)]

    def level_masks(self, valid: Tensor | None) -> list[Tensor | None]:
        """The validity mask (B, 1, H, W) at each U-Net level, full size first: a pixel of a
        coarser level is valid when any pixel it covers is."""
        masks = [valid]
        for _ in self.downs:
            masks.append(None if valid is None else F.max_pool2d(masks[-1], 2))
        return masks

    def encode(
        self,
        x: Tensor,
        valid: Tensor | None = None,
        shared: Iterator[Tensor] | None = None,
        record: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """x (B, 3, H, W), sides multiples of 2^levels -> (bottleneck, skip features).
        valid (B, 1, H, W): 1 on the image, 0 on padding (see `nafnet.masked_mean`).
        shared, record: the blocks' channel-attention means given, or collected, in the order
        the blocks run (`nafnet.NAFBlock.forward`)."""
        masks, windows = self.level_masks(valid), self.level_windows()
        if self.channels_last:
            # A clone, not `.contiguous(...)`: a view can pass as channels-last with strides
            # the convolutions do not take as such (a sliced batch of one), and 3 channels
            # cost little to copy
            x = x.clone(memory_format=torch.channels_last)
        y = self.intro(x)
        skips = []
        for encoder, down, mask, window in zip(
            self.encoders, self.downs, masks, windows, strict=False
        ):
            y = run_blocks(encoder, y, mask, window, shared, record)
            skips.append(y)
            y = down(y)
        return run_blocks(self.middle, y, masks[-1], windows[-1], shared, record), skips

    def decode(
        self,
        bottleneck: Tensor,
        skips: list[Tensor],
        valid: Tensor | None = None,
        shared: Iterator[Tensor] | None = None,
        record: list[Tensor] | None = None,
    ) -> KPNOutput:
        masks = self.level_masks(valid)[-2::-1]  # the decoders run coarse to fine
        windows = self.level_windows()[-2::-1]
        y = bottleneck
        for up, decoder, skip, mask, window in zip(
            self.ups, self.decoders, reversed(skips), masks, windows, strict=True
        ):
            y = run_blocks(decoder, up(y) + skip, mask, window, shared, record)
        out = self.ending(y).contiguous()  # plain planes again: the op's operands
        kernel, fusion_logits, bias = torch.split(out, [9, self.scales, 3], dim=1)
        identity = torch.zeros(9, device=out.device, dtype=out.dtype)
        identity[CENTER_TAP] = 1.0
        return KPNOutput(kernel + identity.view(1, 9, 1, 1), fusion_logits, bias, bottleneck)

    def forward(
        self,
        x: Tensor,
        valid: Tensor | None = None,
        shared: Iterator[Tensor] | None = None,
        record: list[Tensor] | None = None,
    ) -> KPNOutput:
        return self.decode(*self.encode(x, valid, shared, record), valid, shared, record)
