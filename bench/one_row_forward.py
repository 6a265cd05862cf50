"""The Triton forward that kernels/triton_kernels.py replaced, kept for side-by-side timing.

bench/triton_configs.py times it in the same process as the current kernel, so the change is
measured as a ratio on one GPU. This is the one-row design: a program filters a run of BLOCK
flattened pixels, every channel at once as a (C_BLOCK, BLOCK) tile (C padded to a power of two).
Its vertically shifted reads (rows p +- d_s) land in rows no program on the same multiprocessor
has read recently, so they come from L2. Not used by opir itself.

It is its own kernel, so no launcher of opir's can run it; from the package it takes only the
public pieces the two kernels share: the tap loader `modulated_taps` and the dilations' packing
`pack_dilations` (passed here at run time, not as a compile-time constant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from opir_kernels.triton_kernels import modulated_taps, pack_dilations


@triton.jit
def _dilation(DIL, s: tl.constexpr):
    """d_s from the packed dilations."""
    return (DIL >> (8 * s)) & 255


@triton.jit
def _softmax_rows(logit_ptr, offs, mask, HW, S: tl.constexpr, S_BLOCK: tl.constexpr):
    """alpha (S_BLOCK, BLOCK) = softmax over the S fusion logits of each pixel (rows >= S are 0)."""
    srange = tl.arange(0, S_BLOCK)
    smask = (srange[:, None] < S) & mask[None, :]
    logits = tl.load(logit_ptr + srange[:, None] * HW + offs[None, :], mask=smask, other=0.0)
    # Fill in fp32: -1e30 would overflow a half-precision load to -inf and make NaNs.
    logits = tl.where(smask, logits.to(tl.float32), -1e30)
    top = tl.max(logits, axis=0)
    e = tl.where(smask, tl.exp(logits - top[None, :]), 0.0)
    return e / tl.maximum(tl.sum(e, axis=0), 1e-30)[None, :]


@triton.jit
def _row(tile, srange, s):
    """Row s of a (S_BLOCK, BLOCK) tile as a (BLOCK,) vector."""
    return tl.sum(tl.where(srange[:, None] == s, tile, 0.0), axis=0)


@triton.jit
def _shifted_tile(
    img_ptr, planes, cmask, offs, x, mask, H, W, d, DY: tl.constexpr, DX: tl.constexpr
):
    """I(p + d (DY, DX)) for a block of pixels p, every channel: a (C_BLOCK, BLOCK) tile, zero
    outside the image. With pixels flattened the shift is one offset; a row test is needed only
    when DY != 0 and a column test only when DX != 0 (both known at compile time)."""
    src = offs + d * (DY * W + DX)
    ok = mask
    if DY != 0:
        ok = ok & (src >= 0) & (src < H * W)
    if DX != 0:
        ok = ok & (x + d * DX >= 0) & (x + d * DX < W)
    tile = tl.load(img_ptr + planes + src[None, :], mask=cmask & ok[None, :], other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _one_row_fwd_kernel(
    img_ptr, ker_ptr, mod_ptr, logit_ptr, bias_ptr, out_ptr, unc_ptr,
    C, H, W, DIL,
    S: tl.constexpr, S_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr, HAS_MOD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = sum_s alpha_s sum_i K~_i I(p + d_s delta_i) + b; UM = mean_i |K~_i| (Eq. 11, 16-19).

    The 9 taps K~_i are read once into registers and every channel is filtered at once (the
    accumulator is a (C_BLOCK, BLOCK) tile). Only the per-image base pointers are 64-bit: 64-bit
    offsets per element cost the GPU several instructions each (the launcher checks that an
    image's planes fit 32-bit offsets).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    img_ptr += b * C * HW
    ker_ptr += b * 9 * HW
    mod_ptr += b * 9 * HW
    bias_ptr += b * C * HW
    out_ptr += b * C * HW
    # A true hint (the block's pixels are contiguous) that caps vectors at 4 elements: with 16-bit
    # inputs Triton otherwise lays the (C_BLOCK, BLOCK) tiles out 8 wide over 2x2 warps, unlike
    # the (BLOCK,) taps, and moves every tap between the two layouts through shared memory (the
    # sm_90 build then spilled 800 bytes a thread; with the hint 28, and fp32's code is unchanged).
    offs = tl.max_contiguous(pid * BLOCK + tl.arange(0, BLOCK), 4)
    mask = offs < HW
    x = offs % W
    chan = tl.arange(0, C_BLOCK)
    cmask = chan[:, None] < C
    planes = chan[:, None] * HW  # offset of each channel's plane
    srange = tl.arange(0, S_BLOCK)
    alpha = _softmax_rows(logit_ptr + b * S * HW, offs, mask, HW, S, S_BLOCK)  # Eq. 18
    # The 3x3 taps, row-major over delta in {-1, 0, 1}^2.
    k0, k1, k2, k3, k4, k5, k6, k7, k8 = modulated_taps(ker_ptr, mod_ptr, offs, mask, HW, HAS_MOD)
    abs_sum = tl.abs(k0) + tl.abs(k1) + tl.abs(k2) + tl.abs(k3) + tl.abs(k4)
    abs_sum += tl.abs(k5) + tl.abs(k6) + tl.abs(k7) + tl.abs(k8)
    tl.store(unc_ptr + b * HW + offs, abs_sum / 9.0, mask=mask)  # Eq. 11
    acc = tl.zeros((C_BLOCK, BLOCK), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + planes + offs[None, :], mask=cmask & mask[None, :], other=0.0).to(
            tl.float32
        )
    for s in tl.static_range(S):
        d = _dilation(DIL, s)
        j = k0[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, -1, -1)
        j += k1[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, -1, 0)
        j += k2[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, -1, 1)
        j += k3[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, 0, -1)
        j += k4[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, 0, 0)
        j += k5[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, 0, 1)
        j += k6[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, 1, -1)
        j += k7[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, 1, 0)
        j += k8[None, :] * _shifted_tile(img_ptr, planes, cmask, offs, x, mask, H, W, d, 1, 1)
        acc += _row(alpha, srange, s)[None, :] * j  # Eq. 16-18
    tl.store(out_ptr + planes + offs[None, :], acc, mask=cmask & mask[None, :])


def one_row_forward(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int],
    block: int = 512,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor]:
    """The replaced forward at its chosen launch (512 pixels, 4 warps); contiguous inputs."""
    b, c, h, w = image.shape
    s = len(dilations)
    out = torch.empty_like(image)
    unc = torch.empty((b, 1, h, w), dtype=image.dtype, device=image.device)
    _one_row_fwd_kernel[(triton.cdiv(h * w, block), b)](
        image, kernel, kernel if modulation is None else modulation, fusion_logits,
        image if bias is None else bias, out, unc,
        c, h, w, pack_dilations(dilations),
        S=s, S_BLOCK=triton.next_power_of_2(s), C_BLOCK=triton.next_power_of_2(c),
        HAS_MOD=modulation is not None, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=num_warps,
    )  # fmt: skip
    return out, unc
