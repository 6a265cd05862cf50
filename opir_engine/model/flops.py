"""The model's FLOP count, derived from its config: what one OPIR forward computes.

A multiply-add is 2 FLOPs, as in torch.utils.flop_counter. `counted` holds the terms the
counter sees (convolutions, linears and matrix products, and the FLOP formula the
inverse-operator op registers), so it equals the counter's figure for a real forward; the
`elementwise` estimate adds what the counter leaves out (norms, gates, activations, biases,
residuals). GMACs, as restoration papers' "FLOPs" columns give them, are FLOPs / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from opir_engine.model.config import OPIRConfig
from opir_kernels.inverse_operator import inverse_operator_flops

# Elementwise costs in FLOPs per element, for the part of the count torch omits.
_LAYERNORM_FLOPS = 8  # mean, variance (sub, square, add), normalise (sub, mul), affine (mul, add)
_GELU_FLOPS = 8  # erf-based GELU, roughly


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward, by kind; a multiply-add counts 2."""

    convolutions: int
    linears: int  # linear layers and matrix products
    operator: int  # the inverse-operator op's registered formula, all stages
    elementwise: int  # estimate: norms, gates, activations, biases, residuals

    @property
    def counted(self) -> int:
        """What torch.utils.flop_counter counts: convolutions, matrix products, the op."""
        return self.convolutions + self.linears + self.operator

    @property
    def total(self) -> int:
        """`counted` plus the elementwise estimate."""
        return self.counted + self.elementwise


def _nafblock_flops(channels: int, pixels: int, batch: int) -> tuple[int, int]:
    """(conv FLOPs, elementwise FLOPs) of one NAFBlock (hidden width 2C) on `pixels` pixels.

    Convs per pixel: 1x1 C->2C, depthwise 3x3 on 2C, 1x1 C->C, 1x1 C->2C, 1x1 C->C, i.e.
    6C^2 + 18C multiply-adds, plus the channel attention's C x C on the pooled vector.
    Elementwise per pixel: 2 LayerNorms, 6 bias adds (8C), 2 gates, pool, scale, and the
    two scaled residuals (8C): about 32C.
    """
    c = channels
    conv = batch * (2 * pixels * (6 * c * c + 18 * c) + 2 * c * c)
    elementwise = batch * pixels * (2 * _LAYERNORM_FLOPS * c + 16 * c)
    return conv, elementwise


def _kpn_flops(config: OPIRConfig, height: int, width: int, batch: int) -> tuple[int, int]:
    """(conv FLOPs, elementwise FLOPs) of one KPN pass on (batch, 3, height, width)."""
    w, hw, scales = config.width, height * width, len(config.dilations)
    outputs = 9 + scales + 3
    conv = batch * 2 * hw * 3 * w * 9  # intro 3x3
    elementwise = batch * hw * w  # its bias
    conv += batch * 2 * hw * w * outputs * 9  # ending 3x3
    elementwise += batch * hw * (outputs + 9)  # its bias, the identity tap offset
    levels = len(config.enc_blocks)
    for level in range(levels):
        c, pixels = w * 2**level, hw // 4**level
        blocks = config.enc_blocks[level] + config.dec_blocks[level]
        block_conv, block_elem = _nafblock_flops(c, pixels, batch)
        conv += blocks * block_conv
        elementwise += blocks * block_elem
        # Down: 2x2 stride-2 C -> 2C; up: 1x1 2C -> 4C at the level below, then pixel-shuffle.
        conv += batch * 2 * (pixels // 4) * (2 * c) * c * 4
        conv += batch * 2 * (pixels // 4) * (2 * c) * (4 * c)
        elementwise += batch * (pixels // 4) * (2 * c + 4 * c)
    c, pixels = w * 2**levels, hw // 4**levels
    block_conv, block_elem = _nafblock_flops(c, pixels, batch)
    return conv + config.middle_blocks * block_conv, elementwise + config.middle_blocks * block_elem


def _trunk_classifier_flops(
    config: OPIRConfig, height: int, width: int, batch: int
) -> tuple[int, int, int]:
    """(conv, linear, elementwise FLOPs) of the `trunk` classifier (model/classifier.py):
    stem 3x3/2 then 2x2/2, a NAFBlock per level, padded 3x3/2 downs, mean/std pooling, MLP."""
    w, num_classes = config.classifier_width, len(config.classes)
    h, wd = -(-height // 2), -(-width // 2)  # 3x3 stride 2, padding 1: ceil
    conv = batch * 2 * h * wd * 3 * w * 9
    elementwise = batch * h * wd * w * (1 + _GELU_FLOPS)
    h, wd = h // 2, wd // 2  # 2x2 stride 2
    conv += batch * 2 * h * wd * w * w * 4
    c = w
    for level in range(4):
        block_conv, block_elem = _nafblock_flops(c, h * wd, batch)
        conv, elementwise = conv + block_conv, elementwise + block_elem
        if level < 3:
            h, wd = -(-h // 2), -(-wd // 2)
            conv += batch * 2 * h * wd * c * 2 * c * 9
            c *= 2
    elementwise += batch * 3 * h * wd * c  # mean and standard deviation
    linear = batch * 2 * (2 * c * config.head_hidden + config.head_hidden * num_classes)
    return conv, linear, elementwise + batch * _GELU_FLOPS * config.head_hidden


def count_opir_flops(config: OPIRConfig, height: int, width: int, batch: int = 1) -> FlopCount:
    """Analytic FLOPs of one OPIR forward (auto task) on (batch, 3, height, width).

    `counted` matches torch.utils.flop_counter term by term: the KPN's convolutions (once per
    stage), the degradation classifier (the bottleneck head's two linears, or the trunk's
    convolutions and linears), each TAM's task projection and its per-tap
    output layer (a hidden -> 1 linear on all 9 HW taps), and the op's formula per stage.
    `elementwise` adds what torch leaves out (LayerNorms, gates, GELUs, biases, residuals).
    """
    hw, stages = height * width, config.stages
    num_classes, levels = len(config.classes), len(config.enc_blocks)
    kpn_conv, kpn_elem = _kpn_flops(config, height, width, batch)
    bottleneck = config.width * 2**levels
    head_conv = 0
    head = batch * 2 * (2 * bottleneck * config.head_hidden + config.head_hidden * num_classes)
    head_elem = batch * (2 * bottleneck * (hw // 4**levels) + _GELU_FLOPS * config.head_hidden)
    if config.classifier == "trunk":
        head_conv, head, head_elem = _trunk_classifier_flops(config, height, width, batch)
    tam, tam_elem = 0, 0
    if config.use_tam:
        hidden, taps = config.tam_hidden, 9 * hw
        tam = batch * 2 * (num_classes * config.task_dim + config.task_dim * hidden + taps * hidden)
        tam_elem = batch * taps * ((3 + _GELU_FLOPS) * hidden + 1)
    op = inverse_operator_flops(batch, 3, height, width, len(config.dilations), config.use_tam)
    guide = batch * 3 * hw if stages == 2 and config.use_uncertainty else 0
    return FlopCount(
        convolutions=stages * kpn_conv + head_conv,
        linears=head + stages * tam,
        operator=stages * op,
        elementwise=stages * (kpn_elem + tam_elem) + head_elem + guide,
    )
