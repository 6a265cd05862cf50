"""PromptIR (Potlapalli et al., NeurIPS 2023), written from the paper, for side-by-side timing.

PromptIR is the all-in-one model users would otherwise pick; `opir profile --compare promptir`
times it in the same process as OPIR. It is a Restormer-style 4-level encoder-decoder of
transformer blocks (MDTA attention across channels + gated-Dconv feed-forward), with a prompt
block between consecutive decoder levels: the prompt-generation module (PGM) mixes learnable
prompt components with weights predicted from the pooled features, and the prompt-interaction
module (PIM) concatenates that prompt with the features, runs a transformer block on both and
reduces the channels back with a 1x1 convolution.

Published defaults (paper section 4 and the official release): width 48, [4, 6, 6, 8] blocks
per level, 4 refinement blocks, [1, 2, 4, 8] heads, FFN expansion 2.66, bias-free convolutions,
LayerNorm with bias, 5 prompt components per block; prompts of 64 x 64 x 64, 128 x 32 x 32 and
320 x 16 x 16 (channels x side) at decoder levels 1, 2 and 3. As released, the prompt
interaction after the latent level reduces to 4C rather than 8C, so the upsampling to level 3
starts from 4C. FLOPs: 132 GMACs at 224 x 224 (173 at 256 x 256). The weights here are random:
the class exists to measure speed, FLOPs and memory, not to restore images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# PromptIR's published parameter count, about 35.6 M. This implementation has 35.38 M: the
# published figure also counts 0.22 M in six 1x1 convolutions that the official release builds
# but never calls in its forward (tests/test_profiling.py spells them out); they are left out.
PUBLISHED_PARAMETERS = 35.59e6


@dataclass(frozen=True)
class PromptIRConfig:
    """Sizes of a PromptIR model; the defaults are the published ones."""

    dim: int = 48
    num_blocks: tuple[int, int, int, int] = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion: float = 2.66
    prompt_len: int = 5
    prompt_dims: tuple[int, int, int] = (64, 128, 320)  # decoder levels 1, 2, 3
    prompt_sizes: tuple[int, int, int] = (64, 32, 16)
    layernorm_bias: bool = True
    bias: bool = False

    @property
    def multiple_of(self) -> int:
        """Input sides must be a multiple of this (three pixel-unshuffle downsamplings)."""
        return 8


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel of (B, C, H, W).

    The bias-free variant divides by the standard deviation without re-centring (Restormer's
    choice for denoising); the default keeps the usual mean subtraction and bias.
    """

    def __init__(self, channels: int, with_bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if with_bias else None
        self.eps = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None:
            y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        variance = x.var(dim=1, keepdim=True, unbiased=False)
        return x * torch.rsqrt(variance + self.eps) * self.weight.view(1, -1, 1, 1)


class MDTA(nn.Module):
    """Multi-Dconv head transposed attention: attention between channels, not pixels.

    Q, K, V come from a 1x1 then a depthwise 3x3 convolution; per head, the C/h x C/h map
    softmax(normalize(Q) normalize(K)^T * temperature) mixes V, so the cost grows linearly
    with the number of pixels.
    """

    def __init__(self, channels: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(
            channels * 3, channels * 3, 3, padding=1, groups=channels * 3, bias=bias
        )
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attention = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
        return self.project_out((attention @ v).reshape(b, c, h, w))


class GDFN(nn.Module):
    """Gated-Dconv feed-forward: GELU(path 1) * path 2, both 1x1 then depthwise 3x3."""

    def __init__(self, channels: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """x + MDTA(LN(x)), then + GDFN(LN(x)): the Restormer block PromptIR is built of."""

    def __init__(self, channels: int, heads: int, config: PromptIRConfig) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels, config.layernorm_bias)
        self.attn = MDTA(channels, heads, config.bias)
        self.norm2 = ChannelLayerNorm(channels, config.layernorm_bias)
        self.ffn = GDFN(channels, config.ffn_expansion, config.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PromptGenBlock(nn.Module):
    """PGM: P = conv3x3(interp(sum_c w_c P_c)), w = softmax(linear(global average pool(F))).

    The N prompt components P_c (N x C_p x S x S) are learnt; the image's features choose
    their mix, which is how PromptIR encodes the degradation without being told it.
    """

    def __init__(self, feature_dim: int, prompt_dim: int, prompt_len: int, size: int) -> None:
        super().__init__()
        self.components = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, size, size))
        self.linear = nn.Linear(feature_dim, prompt_len)
        self.conv = nn.Conv2d(prompt_dim, prompt_dim, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """features (B, C, H, W) -> prompt (B, C_p, H, W)."""
        weights = torch.softmax(self.linear(x.mean(dim=(-2, -1))), dim=1)  # (B, N)
        prompt = (weights[:, :, None, None, None] * self.components).sum(dim=1)
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(prompt)


class PromptInteraction(nn.Module):
    """PIM: conv1x1(TransformerBlock([F; P])): features and prompt attend together."""

    def __init__(
        self, channels: int, prompt_dim: int, out_channels: int, heads: int, config: PromptIRConfig
    ) -> None:
        super().__init__()
        self.block = TransformerBlock(channels + prompt_dim, heads, config)
        self.reduce = nn.Conv2d(channels + prompt_dim, out_channels, 1, bias=config.bias)

    def forward(self, x: Tensor, prompt: Tensor) -> Tensor:
        return self.reduce(self.block(torch.cat([x, prompt], dim=1)))


class Downsample(nn.Module):
    """Halve the resolution, double the channels: conv3x3 to C/2, then pixel-unshuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(self.conv(x), 2)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: conv3x3 to 2C, then pixel-shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


def _blocks(n: int, channels: int, heads: int, config: PromptIRConfig) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(channels, heads, config) for _ in range(n)])


class PromptIR(nn.Module):
    """The PromptIR network: restored = x + conv3x3(refine(decoder(encoder(x), prompts))).

    Channels per level are C, 2C, 4C, 8C (C = 48). A prompt block (PGM + PIM) sits after the
    latent level and after decoder levels 3 and 2, each before the upsampling to the next
    level. Decoder level 1 and the refinement run at 2C, as in Restormer.
    """

    def __init__(self, config: PromptIRConfig | None = None) -> None:
        super().__init__()
        config = config or PromptIRConfig()
        self.config = config
        c, n, h = config.dim, config.num_blocks, config.heads
        self.patch_embed = nn.Conv2d(3, c, 3, padding=1, bias=config.bias)
        self.encoder1 = _blocks(n[0], c, h[0], config)
        self.down1 = Downsample(c)
        self.encoder2 = _blocks(n[1], 2 * c, h[1], config)
        self.down2 = Downsample(2 * c)
        self.encoder3 = _blocks(n[2], 4 * c, h[2], config)
        self.down3 = Downsample(4 * c)
        self.latent = _blocks(n[3], 8 * c, h[3], config)

        (p1, p2, p3), (s1, s2, s3) = config.prompt_dims, config.prompt_sizes
        # The latent PIM already reduces 8C + prompt to 4C, so the upsampling to level 3
        # starts from 4C (giving 2C, concatenated with the 4C skip): the published layout.
        self.prompt3 = PromptGenBlock(8 * c, p3, config.prompt_len, s3)
        self.interact3 = PromptInteraction(8 * c, p3, 4 * c, h[2], config)
        self.up3 = Upsample(4 * c)
        self.reduce3 = nn.Conv2d(2 * c + 4 * c, 4 * c, 1, bias=config.bias)
        self.decoder3 = _blocks(n[2], 4 * c, h[2], config)

        self.prompt2 = PromptGenBlock(4 * c, p2, config.prompt_len, s2)
        self.interact2 = PromptInteraction(4 * c, p2, 4 * c, h[2], config)
        self.up2 = Upsample(4 * c)
        self.reduce2 = nn.Conv2d(2 * c + 2 * c, 2 * c, 1, bias=config.bias)
        self.decoder2 = _blocks(n[1], 2 * c, h[1], config)

        self.prompt1 = PromptGenBlock(2 * c, p1, config.prompt_len, s1)
        self.interact1 = PromptInteraction(2 * c, p1, 2 * c, h[2], config)
        self.up1 = Upsample(2 * c)
        self.decoder1 = _blocks(n[0], 2 * c, h[0], config)

        self.refinement = _blocks(config.num_refinement_blocks, 2 * c, h[0], config)
        self.output = nn.Conv2d(2 * c, 3, 3, padding=1, bias=config.bias)

    @property
    def multiple_of(self) -> int:
        return self.config.multiple_of

    def forward(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W), sides multiples of 8 -> restored (B, 3, H, W)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if image.shape[-2] % self.multiple_of or image.shape[-1] % self.multiple_of:
            raise ValueError(f"image sides must be multiples of 8, got {tuple(image.shape[-2:])}")
        e1 = self.encoder1(self.patch_embed(image))
        e2 = self.encoder2(self.down1(e1))
        e3 = self.encoder3(self.down2(e2))
        y = self.latent(self.down3(e3))
        y = self.interact3(y, self.prompt3(y))
        y = self.decoder3(self.reduce3(torch.cat([self.up3(y), e3], dim=1)))
        y = self.interact2(y, self.prompt2(y))
        y = self.decoder2(self.reduce2(torch.cat([self.up2(y), e2], dim=1)))
        y = self.interact1(y, self.prompt1(y))
        y = self.decoder1(torch.cat([self.up1(y), e1], dim=1))
        return self.output(self.refinement(y)) + image  # global residual
