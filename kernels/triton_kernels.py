"""The Triton kernels of the inverse operator (forward, and a backward in two passes) and their
launchers. The only module of opir that imports triton: the op loads it for CUDA tensors (or
`kernel_backend("triton")`), so a CPU install runs without triton.

Each program owns a BLOCK_H x BLOCK_W tile of one image. The dilations travel as one compile-time
integer, 8 bits per scale (`pack_dilations`): constants become immediate load offsets, and a
tensor of them would be copied from the host at every call. Kernels only compute; the launchers
do contiguity, the offset check, allocation and the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .triton_limits import offsets_fit

# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tap(ker_ptr, mod_ptr, i: tl.constexpr, offs, mask, HW, HAS_MOD: tl.constexpr):
    """K~_i = K_i m_i (Eq. 19) for a block of pixels, in fp32."""
    k = tl.load(ker_ptr + i * HW + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        k = k * tl.load(mod_ptr + i * HW + offs, mask=mask, other=0.0).to(tl.float32)
    return k


@triton.jit
def modulated_taps(ker_ptr, mod_ptr, offs, mask, HW, HAS_MOD: tl.constexpr):
    """The 9 taps K~_i = K_i m_i (Eq. 19), row-major over delta in {-1, 0, 1}^2, in fp32."""
    return (
        _tap(ker_ptr, mod_ptr, 0, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 1, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 2, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 3, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 4, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 5, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 6, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 7, offs, mask, HW, HAS_MOD),
        _tap(ker_ptr, mod_ptr, 8, offs, mask, HW, HAS_MOD),
    )


@triton.jit
def _logit(logit_ptr, s: tl.constexpr, S: tl.constexpr, offs, mask, HW):
    """Fusion logit s of a tile in fp32; for s >= S the logit of scale 0 (a no-op in the max)."""
    if s < S:
        return tl.load(logit_ptr + s * HW + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(logit_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _exp_or_zero(logit, top, s: tl.constexpr, S: tl.constexpr):
    """exp(logit - top) for a scale that exists, 0 for s >= S (decided when compiling)."""
    if s < S:
        return tl.exp(logit - top)
    else:
        return tl.zeros_like(logit)


@triton.jit
def _pick(s: tl.constexpr, v0, v1, v2, v3, v4, v5, v6, v7):
    """The s-th of eight per-scale values held in registers (s known when compiling; a Triton
    function cannot index a list)."""
    if s == 0:  # noqa: SIM116
        return v0
    elif s == 1:
        return v1
    elif s == 2:
        return v2
    elif s == 3:
        return v3
    elif s == 4:
        return v4
    elif s == 5:
        return v5
    elif s == 6:
        return v6
    else:
        return v7


@triton.jit
def _tap_read(row_ptr, DX: tl.constexpr, row_ok, col_ok, mask, MASKED: tl.constexpr):
    """I(p + (dy, DX)) from the pointers of row p + dy. DX is a constant, so it becomes the load's
    immediate offset. MASKED: zero outside the image (row_ok / col_ok: the tests this tap needs,
    None where it needs none); an interior tile, every tap inside, reads without masks."""
    if MASKED:
        ok = mask
        if row_ok is not None:
            ok = ok & row_ok
        if col_ok is not None:
            ok = ok & col_ok
        return tl.load(row_ptr + DX, mask=ok, other=0.0).to(tl.float32)
    else:
        return tl.load(row_ptr + DX).to(tl.float32)


@triton.jit
def _dilated_reads(center, rows, cols, mask, H, W, d: tl.constexpr, MASKED: tl.constexpr):
    """I(p + d delta_i) for the 9 taps, row-major (Eq. 16); `center` points at I(p)."""
    up = center - d * W  # the pointers of rows p - d and p + d, shared by 3 taps each
    down = center + d * W
    if MASKED:  # this scale's border tests, on 1-D vectors
        ok_up = (rows >= d)[:, None]
        ok_down = (rows + d < H)[:, None]
        ok_left = (cols >= d)[None, :]
        ok_right = (cols + d < W)[None, :]
    else:
        ok_up = None
        ok_down = None
        ok_left = None
        ok_right = None
    return (
        _tap_read(up, -d, ok_up, ok_left, mask, MASKED),
        _tap_read(up, 0, ok_up, None, mask, MASKED),
        _tap_read(up, d, ok_up, ok_right, mask, MASKED),
        _tap_read(center, -d, None, ok_left, mask, MASKED),
        _tap_read(center, 0, None, None, mask, MASKED),
        _tap_read(center, d, None, ok_right, mask, MASKED),
        _tap_read(down, -d, ok_down, ok_left, mask, MASKED),
        _tap_read(down, 0, ok_down, None, mask, MASKED),
        _tap_read(down, d, ok_down, ok_right, mask, MASKED),
    )


@triton.jit
def _softmax8(logit_ptr, S: tl.constexpr, offs, mask, HW):
    """alpha_s = softmax over the S fusion logits (Eq. 18) of a tile, as 8 values (0 beyond S)."""
    l0 = _logit(logit_ptr, 0, S, offs, mask, HW)
    l1 = _logit(logit_ptr, 1, S, offs, mask, HW)
    l2 = _logit(logit_ptr, 2, S, offs, mask, HW)
    l3 = _logit(logit_ptr, 3, S, offs, mask, HW)
    l4 = _logit(logit_ptr, 4, S, offs, mask, HW)
    l5 = _logit(logit_ptr, 5, S, offs, mask, HW)
    l6 = _logit(logit_ptr, 6, S, offs, mask, HW)
    l7 = _logit(logit_ptr, 7, S, offs, mask, HW)
    top = tl.maximum(tl.maximum(tl.maximum(l0, l1), tl.maximum(l2, l3)),
                     tl.maximum(tl.maximum(l4, l5), tl.maximum(l6, l7)))  # fmt: skip
    e0 = _exp_or_zero(l0, top, 0, S)
    e1 = _exp_or_zero(l1, top, 1, S)
    e2 = _exp_or_zero(l2, top, 2, S)
    e3 = _exp_or_zero(l3, top, 3, S)
    e4 = _exp_or_zero(l4, top, 4, S)
    e5 = _exp_or_zero(l5, top, 5, S)
    e6 = _exp_or_zero(l6, top, 6, S)
    e7 = _exp_or_zero(l7, top, 7, S)
    inv = 1.0 / (((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7)))
    return e0 * inv, e1 * inv, e2 * inv, e3 * inv, e4 * inv, e5 * inv, e6 * inv, e7 * inv


@triton.jit
def _tile(BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, H, W):
    """This program's (BLOCK_H, BLOCK_W) tile: its rows, columns, in-image mask, flat offsets."""
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # A true hint (the columns are contiguous) that caps vectors at 4 elements, so that 16-bit
    # inputs get the same layout as the fp32 values computed from them.
    cols = tl.max_contiguous(tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W), 4)
    mask = (rows < H)[:, None] & (cols < W)[None, :]
    return rows, cols, mask, rows[:, None] * W + cols[None, :]


@triton.jit
def _interior(BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, D_MAX: tl.constexpr, H, W):
    """Whether every tap of this program's tile, at the largest dilation, is inside the image."""
    row0 = tl.program_id(1) * BLOCK_H
    col0 = tl.program_id(0) * BLOCK_W
    inside = (row0 >= D_MAX) & (row0 + BLOCK_H + D_MAX <= H)
    return inside & (col0 >= D_MAX) & (col0 + BLOCK_W + D_MAX <= W)


@triton.jit
def _filter_channels(
    img_ptr, bias_ptr, out_ptr, offs, rows, cols, mask, C, H, W, HW,
    k0, k1, k2, k3, k4, k5, k6, k7, k8, a0, a1, a2, a3, a4, a5, a6, a7,
    DIL: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """out_c = sum_s alpha_s sum_i K~_i I_c(p + d_s delta_i) + b_c for every channel c (Eq. 16-18),
    with the taps K~_i and the alpha_s already in registers."""
    for c in range(C):
        center = img_ptr + c * HW + offs
        if HAS_BIAS:
            acc = tl.load(bias_ptr + c * HW + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros(offs.shape, dtype=tl.float32)
        for s in tl.static_range(S):
            v0, v1, v2, v3, v4, v5, v6, v7, v8 = _dilated_reads(
                center, rows, cols, mask, H, W, (DIL >> (8 * s)) & 255, MASKED
            )
            j = k0 * v0 + k1 * v1 + k2 * v2 + k3 * v3 + k4 * v4
            j += k5 * v5 + k6 * v6 + k7 * v7 + k8 * v8
            acc += _pick(s, a0, a1, a2, a3, a4, a5, a6, a7) * j
        tl.store(out_ptr + c * HW + offs, acc, mask=mask)


@triton.jit
def _inverse_operator_fwd_kernel(
    img_ptr, ker_ptr, mod_ptr, logit_ptr, bias_ptr, out_ptr, unc_ptr,
    C, H, W,
    DIL: tl.constexpr, D_MAX: tl.constexpr, S: tl.constexpr, HAS_MOD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """out = sum_s alpha_s sum_i K~_i I(p + d_s delta_i) + b; UM = mean_i |K~_i| (Eq. 11, 16-19).

    One program filters a (BLOCK_H, BLOCK_W) tile of pixels, every channel. The kernel this one
    replaced was bound by the instructions it issued (Nsight Compute on an H200, bench/results),
    so each read is made cheap: the dilations are compile-time constants (one build per model), so
    a horizontal shift is the load's immediate offset and a row's pointers are shared by its 3
    taps; tiles whose taps all fall inside the image (nearly all of a large one) read without
    border tests; the 9 taps K~_i and the S weights alpha_s stay in registers across channels.
    Only the per-image base pointers are 64-bit (the launcher checks that an image's planes fit
    32-bit offsets).
    """
    b = tl.program_id(2).to(tl.int64)
    HW = H * W
    img_ptr += b * C * HW
    ker_ptr += b * 9 * HW
    mod_ptr += b * 9 * HW
    logit_ptr += b * S * HW
    bias_ptr += b * C * HW
    out_ptr += b * C * HW
    unc_ptr += b * HW
    rows, cols, mask, offs = _tile(BLOCK_H, BLOCK_W, H, W)
    a0, a1, a2, a3, a4, a5, a6, a7 = _softmax8(logit_ptr, S, offs, mask, HW)
    # The 3x3 taps K~_i = K_i m_i (Eq. 19), row-major over delta in {-1, 0, 1}^2.
    k0, k1, k2, k3, k4, k5, k6, k7, k8 = modulated_taps(ker_ptr, mod_ptr, offs, mask, HW, HAS_MOD)
    abs_sum = tl.abs(k0) + tl.abs(k1) + tl.abs(k2) + tl.abs(k3) + tl.abs(k4)
    abs_sum += tl.abs(k5) + tl.abs(k6) + tl.abs(k7) + tl.abs(k8)
    tl.store(unc_ptr + offs, abs_sum / 9.0, mask=mask)  # Eq. 11
    if _interior(BLOCK_H, BLOCK_W, D_MAX, H, W):
        _filter_channels(
            img_ptr, bias_ptr, out_ptr, offs, rows, cols, mask, C, H, W, HW,
            k0, k1, k2, k3, k4, k5, k6, k7, k8, a0, a1, a2, a3, a4, a5, a6, a7,
            DIL, S, HAS_BIAS, False,
        )  # fmt: skip
    else:
        _filter_channels(
            img_ptr, bias_ptr, out_ptr, offs, rows, cols, mask, C, H, W, HW,
            k0, k1, k2, k3, k4, k5, k6, k7, k8, a0, a1, a2, a3, a4, a5, a6, a7,
            DIL, S, HAS_BIAS, True,
        )  # fmt: skip


@triton.jit
def _add_at(s: tl.constexpr, x, v0, v1, v2, v3, v4, v5, v6, v7):
    """The eight per-scale values with x added to the s-th (s known when compiling)."""
    return (
        v0 + x if s == 0 else v0, v1 + x if s == 1 else v1, v2 + x if s == 2 else v2,
        v3 + x if s == 3 else v3, v4 + x if s == 4 else v4, v5 + x if s == 5 else v5,
        v6 + x if s == 6 else v6, v7 + x if s == 7 else v7,
    )  # fmt: skip


@triton.jit
def _tap_grads(
    img_ptr, gout_ptr, offs, rows, cols, mask, C, H, W, HW,
    k0, k1, k2, k3, k4, k5, k6, k7, k8, a0, a1, a2, a3, a4, a5, a6, a7,
    DIL: tl.constexpr, S: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """d out / d K~_i = sum_c g_c sum_s alpha_s I_c(p + d_s delta_i) (9 values) and
    d out / d alpha_s = sum_c g_c J_s,c (8 values, 0 beyond S), summed over every channel."""
    zero = tl.zeros(offs.shape, dtype=tl.float32)
    gk0, gk1, gk2, gk3, gk4, gk5, gk6, gk7, gk8 = (
        zero,
        zero,
        zero,
        zero,
        zero,
        zero,
        zero,
        zero,
        zero,
    )
    ga0, ga1, ga2, ga3, ga4, ga5, ga6, ga7 = zero, zero, zero, zero, zero, zero, zero, zero
    for c in range(C):
        center = img_ptr + c * HW + offs
        g = tl.load(gout_ptr + c * HW + offs, mask=mask, other=0.0).to(tl.float32)
        for s in tl.static_range(S):
            v0, v1, v2, v3, v4, v5, v6, v7, v8 = _dilated_reads(
                center, rows, cols, mask, H, W, (DIL >> (8 * s)) & 255, MASKED
            )
            ag = _pick(s, a0, a1, a2, a3, a4, a5, a6, a7) * g
            gk0 += ag * v0
            gk1 += ag * v1
            gk2 += ag * v2
            gk3 += ag * v3
            gk4 += ag * v4
            gk5 += ag * v5
            gk6 += ag * v6
            gk7 += ag * v7
            gk8 += ag * v8
            j = k0 * v0 + k1 * v1 + k2 * v2 + k3 * v3 + k4 * v4
            j += k5 * v5 + k6 * v6 + k7 * v7 + k8 * v8
            ga0, ga1, ga2, ga3, ga4, ga5, ga6, ga7 = _add_at(
                s, g * j, ga0, ga1, ga2, ga3, ga4, ga5, ga6, ga7
            )
    return gk0, gk1, gk2, gk3, gk4, gk5, gk6, gk7, gk8, ga0, ga1, ga2, ga3, ga4, ga5, ga6, ga7


@triton.jit
def _store_tap_grad(
    gker_ptr, gmod_ptr, ker_ptr, mod_ptr, i: tl.constexpr, grad, k, gu, offs, mask, HW,
    HAS_MOD: tl.constexpr,
):  # fmt: skip
    """Gradients of K_i and m_i from d out / d K~_i plus UM's |K~_i|' g_UM / 9 (Eq. 11, 19)."""
    sign = tl.where(k > 0, 1.0, tl.where(k < 0, -1.0, 0.0))
    grad += sign * gu / 9.0
    if HAS_MOD:  # K~ = K m: read K and m again rather than hold 18 more values in registers
        raw = tl.load(ker_ptr + i * HW + offs, mask=mask, other=0.0).to(tl.float32)
        mod = tl.load(mod_ptr + i * HW + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gker_ptr + i * HW + offs, grad * mod, mask=mask)
        tl.store(gmod_ptr + i * HW + offs, grad * raw, mask=mask)
    else:
        tl.store(gker_ptr + i * HW + offs, grad, mask=mask)


@triton.jit
def _store_scale(
    glogit_ptr, w_ptr, s: tl.constexpr, S: tl.constexpr, a, ga, total,
    k0, k1, k2, k3, k4, k5, k6, k7, k8, offs, mask, HW,
):  # fmt: skip
    """For a scale s < S: its logit's gradient through the softmax (Eq. 18), and the weights
    alpha_s K~_i (9 planes of the scratch) that the image gradient gathers."""
    if s < S:
        tl.store(glogit_ptr + s * HW + offs, a * (ga - total), mask=mask)
        plane = w_ptr + s * 9 * HW.to(tl.int64) + offs  # 64-bit: S x 9 planes may pass 2^31
        tl.store(plane, a * k0, mask=mask)
        tl.store(plane + HW, a * k1, mask=mask)
        tl.store(plane + 2 * HW, a * k2, mask=mask)
        tl.store(plane + 3 * HW, a * k3, mask=mask)
        tl.store(plane + 4 * HW, a * k4, mask=mask)
        tl.store(plane + 5 * HW, a * k5, mask=mask)
        tl.store(plane + 6 * HW, a * k6, mask=mask)
        tl.store(plane + 7 * HW, a * k7, mask=mask)
        tl.store(plane + 8 * HW, a * k8, mask=mask)


@triton.jit
def _inverse_operator_bwd_taps_kernel(
    img_ptr, ker_ptr, mod_ptr, logit_ptr, gout_ptr, gunc_ptr,
    gker_ptr, gmod_ptr, glogit_ptr, w_ptr,
    C, H, W,
    DIL: tl.constexpr, D_MAX: tl.constexpr, S: tl.constexpr, HAS_MOD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Per-pixel gradients of the kernel, modulation and logits; writes alpha_s K~_i for the
    image gradient's gather. Tiles, compile-time dilations and border tests as the forward.

    d out/d K~_i(p) = sum_s alpha_s sum_c g_c I_c(p + d_s delta_i), plus |.|' of UM: sign / 9;
    d out/d alpha_s = sum_c g_c J_s,c, pushed through the softmax.
    """
    b = tl.program_id(2).to(tl.int64)
    HW = H * W
    img_ptr += b * C * HW
    ker_ptr += b * 9 * HW
    mod_ptr += b * 9 * HW
    logit_ptr += b * S * HW
    gout_ptr += b * C * HW
    gunc_ptr += b * HW
    gker_ptr += b * 9 * HW
    gmod_ptr += b * 9 * HW
    glogit_ptr += b * S * HW
    w_ptr += b * S * 9 * HW
    rows, cols, mask, offs = _tile(BLOCK_H, BLOCK_W, H, W)
    a0, a1, a2, a3, a4, a5, a6, a7 = _softmax8(logit_ptr, S, offs, mask, HW)
    k0, k1, k2, k3, k4, k5, k6, k7, k8 = modulated_taps(ker_ptr, mod_ptr, offs, mask, HW, HAS_MOD)
    if _interior(BLOCK_H, BLOCK_W, D_MAX, H, W):
        gk0, gk1, gk2, gk3, gk4, gk5, gk6, gk7, gk8, ga0, ga1, ga2, ga3, ga4, ga5, ga6, ga7 = (
            _tap_grads(
                img_ptr, gout_ptr, offs, rows, cols, mask, C, H, W, HW,
                k0, k1, k2, k3, k4, k5, k6, k7, k8, a0, a1, a2, a3, a4, a5, a6, a7,
                DIL, S, False,
            )
        )  # fmt: skip
    else:
        gk0, gk1, gk2, gk3, gk4, gk5, gk6, gk7, gk8, ga0, ga1, ga2, ga3, ga4, ga5, ga6, ga7 = (
            _tap_grads(
                img_ptr, gout_ptr, offs, rows, cols, mask, C, H, W, HW,
                k0, k1, k2, k3, k4, k5, k6, k7, k8, a0, a1, a2, a3, a4, a5, a6, a7,
                DIL, S, True,
            )
        )  # fmt: skip
    gu = tl.load(gunc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 0, gk0, k0, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 1, gk1, k1, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 2, gk2, k2, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 3, gk3, k3, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 4, gk4, k4, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 5, gk5, k5, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 6, gk6, k6, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 7, gk7, k7, gu, offs, mask, HW, HAS_MOD)
    _store_tap_grad(gker_ptr, gmod_ptr, ker_ptr, mod_ptr, 8, gk8, k8, gu, offs, mask, HW, HAS_MOD)
    # d out / d logit_s = alpha_s (d out / d alpha_s - sum_t alpha_t d out / d alpha_t)
    total = a0 * ga0 + a1 * ga1 + a2 * ga2 + a3 * ga3 + a4 * ga4 + a5 * ga5 + a6 * ga6 + a7 * ga7
    ks = (k0, k1, k2, k3, k4, k5, k6, k7, k8)
    _store_scale(glogit_ptr, w_ptr, 0, S, a0, ga0, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 1, S, a1, ga1, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 2, S, a2, ga2, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 3, S, a3, ga3, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 4, S, a4, ga4, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 5, S, a5, ga5, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 6, S, a6, ga6, total, *ks, offs, mask, HW)
    _store_scale(glogit_ptr, w_ptr, 7, S, a7, ga7, total, *ks, offs, mask, HW)


@triton.jit
def _gather_read(w_row, g_row, DX: tl.constexpr, row_ok, col_ok, mask, MASKED: tl.constexpr):
    """w(p) g(p) at p = the row's pointers shifted by the constant DX; 0 outside the image."""
    if MASKED:
        ok = mask
        if row_ok is not None:
            ok = ok & row_ok
        if col_ok is not None:
            ok = ok & col_ok
        w = tl.load(w_row + DX, mask=ok, other=0.0)
        return w * tl.load(g_row + DX, mask=ok, other=0.0).to(tl.float32)
    else:
        return tl.load(w_row + DX) * tl.load(g_row + DX).to(tl.float32)


@triton.jit
def _gathered(
    w_s, g_center, offs, rows, cols, mask, H, W, HW, d: tl.constexpr, MASKED: tl.constexpr
):
    """sum_i w_s,i(p) g(p) over p = q - d delta_i, the pixels whose tap i reads q (9 planes of
    weights from w_s)."""
    if MASKED:  # p's row is q's + d for the top taps (dy = -1), - d for the bottom ones
        ok_below = (rows + d < H)[:, None]
        ok_above = (rows >= d)[:, None]
        ok_right = (cols + d < W)[None, :]
        ok_left = (cols >= d)[None, :]
    else:
        ok_below = None
        ok_above = None
        ok_right = None
        ok_left = None
    w_q = w_s + offs
    g_below = g_center + d * W
    g_above = g_center - d * W
    acc = _gather_read(w_q + d * W, g_below, d, ok_below, ok_right, mask, MASKED)  # i = 0
    acc += _gather_read(w_q + HW + d * W, g_below, 0, ok_below, None, mask, MASKED)
    acc += _gather_read(w_q + 2 * HW + d * W, g_below, -d, ok_below, ok_left, mask, MASKED)
    acc += _gather_read(w_q + 3 * HW, g_center, d, None, ok_right, mask, MASKED)
    acc += _gather_read(w_q + 4 * HW, g_center, 0, None, None, mask, MASKED)
    acc += _gather_read(w_q + 5 * HW, g_center, -d, None, ok_left, mask, MASKED)
    acc += _gather_read(w_q + 6 * HW - d * W, g_above, d, ok_above, ok_right, mask, MASKED)
    acc += _gather_read(w_q + 7 * HW - d * W, g_above, 0, ok_above, None, mask, MASKED)
    acc += _gather_read(w_q + 8 * HW - d * W, g_above, -d, ok_above, ok_left, mask, MASKED)
    return acc


@triton.jit
def _image_grads(
    w_ptr, gout_ptr, gimg_ptr, offs, rows, cols, mask, C, H, W, HW,
    DIL: tl.constexpr, S: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    for c in range(C):
        g_center = gout_ptr + c * HW + offs
        acc = tl.zeros(offs.shape, dtype=tl.float32)
        for s in tl.static_range(S):
            acc += _gathered(
                w_ptr + s * 9 * HW.to(tl.int64), g_center, offs, rows, cols, mask, H, W, HW,
                (DIL >> (8 * s)) & 255, MASKED,
            )  # fmt: skip
        tl.store(gimg_ptr + c * HW + offs, acc, mask=mask)


@triton.jit
def _inverse_operator_bwd_image_kernel(
    w_ptr, gout_ptr, gimg_ptr,
    C, H, W,
    DIL: tl.constexpr, D_MAX: tl.constexpr, S: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Image gradient as a gather, no atomics: q sums alpha_s K~_i g over p = q - d_s delta_i."""
    b = tl.program_id(2).to(tl.int64)
    HW = H * W
    w_ptr += b * S * 9 * HW
    gout_ptr += b * C * HW
    gimg_ptr += b * C * HW
    rows, cols, mask, offs = _tile(BLOCK_H, BLOCK_W, H, W)
    if _interior(BLOCK_H, BLOCK_W, D_MAX, H, W):
        _image_grads(w_ptr, gout_ptr, gimg_ptr, offs, rows, cols, mask, C, H, W, HW, DIL, S, False)
    else:
        _image_grads(w_ptr, gout_ptr, gimg_ptr, offs, rows, cols, mask, C, H, W, HW, DIL, S, True)


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------


# The forward's tile (rows x columns of pixels per program) and warps, chosen on an H200 by
# bench/triton_configs.py (results beside it). The backward's kernels take the forward's tile:
# bench/triton_configs.py sweeps only the forward.
FORWARD_CONFIG = {"BLOCK_H": 4, "BLOCK_W": 64, "num_warps": 8}
BACKWARD_CONFIG = {"BLOCK_H": 4, "BLOCK_W": 64, "num_warps": 8}


def _launch_operands(
    what: str, tensors: Sequence[Tensor | None], dilations: Sequence[int]
) -> list[Tensor | None]:
    """The operands of a Triton pass, contiguous (the kernels index them flat); first the
    32-bit offset limit is checked on the image (tensors[0]), before any copy is made."""
    image = tensors[0]
    assert image is not None
    if not offsets_fit(image, dilations):
        _, c, h, w = image.shape
        raise ValueError(
            f"the Triton {what} takes at most 2^31 elements per image plane set, got "
            f"{max(c, 9, len(dilations))} x {h} x {w}: tile the image"
        )
    return [None if t is None else t.contiguous() for t in tensors]


def pack_dilations(dilations: Sequence[int]) -> int:
    """The dilations as the kernels take them: one integer, d_s in bits 8 s to 8 s + 7."""
    return sum(int(d) << (8 * s) for s, d in enumerate(dilations))


def inverse_operator_forward_triton(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int],
    config: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton forward: one pass; the shifted reads hit cache. Shapes as the reference.

    `config` ({"BLOCK_H": rows, "BLOCK_W": columns of a program's tile, "num_warps": n}) overrides
    FORWARD_CONFIG (for the benchmark's sweep)."""
    image, kernel, modulation, fusion_logits, bias = _launch_operands(
        "forward", (image, kernel, modulation, fusion_logits, bias), dilations
    )
    b, c, h, w = image.shape
    s = len(dilations)
    cfg = config or FORWARD_CONFIG
    out = torch.empty_like(image)
    unc = torch.empty((b, 1, h, w), dtype=image.dtype, device=image.device)
    grid = (triton.cdiv(w, cfg["BLOCK_W"]), triton.cdiv(h, cfg["BLOCK_H"]), b)
    wrap_triton(_inverse_operator_fwd_kernel)[grid](
        image, kernel, kernel if modulation is None else modulation, fusion_logits,
        image if bias is None else bias, out, unc,
        c, h, w,
        DIL=pack_dilations(dilations), D_MAX=max(dilations), S=s,
        HAS_MOD=modulation is not None, HAS_BIAS=bias is not None,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out, unc


def inverse_operator_backward_triton(
    grad_restored: Tensor,
    grad_uncertainty: Tensor,
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    dilations: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Triton backward: grads for (image, kernel, modulation, logits, bias). Two passes."""
    image, kernel, modulation, fusion_logits, g, gu = _launch_operands(
        "backward",
        (image, kernel, modulation, fusion_logits, grad_restored, grad_uncertainty),
        dilations,
    )
    b, c, h, w = image.shape
    s = len(dilations)
    cfg = BACKWARD_CONFIG
    grid = (triton.cdiv(w, cfg["BLOCK_W"]), triton.cdiv(h, cfg["BLOCK_H"]), b)
    consts = dict(
        DIL=pack_dilations(dilations), D_MAX=max(dilations), S=s,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    g_kernel = torch.empty_like(kernel)
    g_mod = None if modulation is None else torch.empty_like(modulation)
    g_logits = torch.empty_like(fusion_logits)
    g_image = torch.empty_like(image)
    # alpha_s K~_i, the weight each pixel gives each tap, for the image gradient's gather.
    scratch = torch.empty((b, s, 9, h, w), dtype=torch.float32, device=image.device)
    wrap_triton(_inverse_operator_bwd_taps_kernel)[grid](
        image, kernel, kernel if modulation is None else modulation, fusion_logits, g, gu,
        g_kernel, g_kernel if g_mod is None else g_mod, g_logits, scratch,
        c, h, w, HAS_MOD=modulation is not None, **consts,
    )  # fmt: skip
    wrap_triton(_inverse_operator_bwd_image_kernel)[grid](scratch, g, g_image, c, h, w, **consts)
    return g_image, g_kernel, g_mod, g_logits, g.to(image.dtype)
