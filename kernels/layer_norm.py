"""The NAFBlock's LayerNorm over the channels of each pixel, optionally with the residual before
it: `v = x + y * scale`, `n = LayerNorm_C(v) * weight + bias` (NAFNet, Chen et al. 2022; the
residual is the block's `x + beta * conv3(y)`, its norm the feed-forward's input).

- `layer_norm_reference`: the PyTorch form, `addcmul` then `F.layer_norm` on the channels-last
  view; what runs on GPUs, in other dtypes and layouts, and under torch.compile;
- `layer_norm_channels`: the entry point. On CPU channels-last maps, fp32 or bf16 (how the KPN
  runs on the CPU, and under bf16 autocast), it calls the native kernels of `nafblock_cpu.c`,
  one pass per pixel forward and backward, through the custom op `opir::layer_norm_native`;
  elsewhere the reference.

Dtypes under the native kernels: v takes the promoted dtype of x, y and scale, as `addcmul`
gives it (fp32 beside fp32 parameters: the residual stream stays fp32 under autocast); n is bf16
under CPU bf16 autocast (the convolution it feeds would cast it there anyway) and v's dtype
otherwise; statistics, arithmetic and the parameters' gradients stay fp32.

Which one runs: `nafblock_native.use_native`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .nafblock_native import autocast_bf16, half_bits, use_native


def layer_norm_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    y: Tensor | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(v, n) for x (B, C, H, W): v = x + y * scale (x itself without y; scale (1, C, 1, 1)),
    n = LayerNorm of v over C, times weight (C,), plus bias (C,)."""
    v = x if y is None else torch.addcmul(x, y, scale)
    # On a channels-last map the permute is a view, not a copy
    n = F.layer_norm(v.permute(0, 2, 3, 1), v.shape[1:2], weight, bias, eps)
    return v, n.permute(0, 3, 1, 2)


def layer_norm_channels(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    y: Tensor | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`layer_norm_reference`'s (v, n), by the native kernels where they take the maps (and
    the backend is not "reference"), else by the reference."""
    maps = (x,) if y is None else (x, y)
    params = (weight, bias) if scale is None else (weight, bias, scale)
    if (y is None or y.shape == x.shape) and use_native(*maps, params=params):
        # under autocast n is bf16 whatever v is; otherwise it takes v's dtype anyway
        half_n = autocast_bf16(x.device)
        v, n, _, _ = torch.ops.opir.layer_norm_native(x, y, scale, weight, bias, eps, half_n)
        return (x if y is None else v), n
    return layer_norm_reference(x, weight, bias, eps, y, scale)


def _channels(t: Tensor, c: int) -> Tensor:
    return t.reshape(c).contiguous()


@torch.library.custom_op("opir::layer_norm_native", mutates_args=())
def _forward_op(
    x: Tensor,
    y: Tensor | None,
    scale: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    half_n: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(v, n, mean, rstd); v is empty without y (it is x); n bf16 where `half_n`, else v's
    dtype. mean, rstd: (B, H, W), fp32."""
    library = native.library()
    assert library is not None, "check use_native() first"
    b, c, h, w = x.shape
    out_v, out_n, mean, rstd = _forward_outputs(x, y, scale, half_n)
    s = None if scale is None else _channels(scale, c)
    w_, b_ = _channels(weight, c), _channels(bias, c)
    args = [
        x.data_ptr(), None if y is None else y.data_ptr(), None if s is None else s.data_ptr(),
        w_.data_ptr(), b_.data_ptr(), eps, c, None if y is None else out_v.data_ptr(),
        out_n.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
    ]  # fmt: skip
    half = half_bits(x, y, out_v if y is not None else None, out_n)
    library.opir_layer_norm_forward(*args, b * h * w, torch.get_num_threads(), half)
    return out_v, out_n, mean, rstd


def _v_dtype(x: Tensor, y: Tensor | None, scale: Tensor | None) -> torch.dtype:
    """v's dtype: x's without the residual, else what `addcmul(x, y, scale)` returns."""
    if y is None or scale is None:
        return x.dtype
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), scale.dtype)


def _forward_outputs(
    x: Tensor, y: Tensor | None, scale: Tensor | None, half_n: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty (v, n, mean, rstd) of the forward's shapes and dtypes."""
    b, _, h, w = x.shape
    v_dtype = _v_dtype(x, y, scale)
    out_v = torch.empty_like(x, dtype=v_dtype) if y is not None else x.new_empty((0,))
    out_n = torch.empty_like(x, dtype=torch.bfloat16 if half_n else v_dtype)
    mean = x.new_empty((b, h, w), dtype=torch.float32)
    return out_v, out_n, mean, torch.empty_like(mean)


@_forward_op.register_fake
def _(x, y, scale, weight, bias, eps, half_n=False):  # type: ignore[no-untyped-def]
    return _forward_outputs(x, y, scale, half_n)


@torch.library.custom_op("opir::layer_norm_native_backward", mutates_args=())
def _backward_op(
    grad_n: Tensor,
    grad_v: Tensor | None,
    v: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    y: Tensor | None,
    scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads for (x, y, weight, bias, scale); y's and scale's are empty without y."""
    library = native.library()
    assert library is not None, "check use_native() first"
    b, c, h, w = v.shape
    # The gradients reaching the op may be in any layout: the kernels read channels-last rows
    grad_n = grad_n.contiguous(memory_format=torch.channels_last)
    if grad_v is not None:
        grad_v = grad_v.contiguous(memory_format=torch.channels_last)
    g_x, g_y = _backward_maps(v, y)
    parts = torch.get_num_threads()
    # per thread, summed below in thread order
    partials = v.new_zeros((3, parts, c), dtype=torch.float32)
    s = None if scale is None else _channels(scale, c)
    w_ = _channels(weight, c)

    args = [
        grad_n.data_ptr(), None if grad_v is None else grad_v.data_ptr(), v.data_ptr(),
        mean.data_ptr(), rstd.data_ptr(), w_.data_ptr(), None if y is None else y.data_ptr(),
        None if s is None else s.data_ptr(), c, g_x.data_ptr(),
        None if y is None else g_y.data_ptr(), partials[0].data_ptr(), partials[1].data_ptr(),
        None if y is None else partials[2].data_ptr(),
    ]  # fmt: skip
    half = half_bits(grad_n, grad_v, v, y, g_x, g_y if y is not None else None)
    library.opir_layer_norm_backward(*args, b * h * w, parts, half)
    g_w, g_b, g_s = (partials[k].sum(dim=0) for k in range(3))  # three tensors, not views
    g_scale = v.new_empty((0,)) if scale is None else g_s.reshape(scale.shape).to(scale.dtype)
    return g_x, g_y, g_w.to(weight.dtype), g_b.to(weight.dtype), g_scale


def _backward_maps(v: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    """Empty (g_x, g_y): g_x in v's dtype (x's where there is no y, v being x; the promoted
    dtype otherwise, cast back to x's by `_backward`), g_y in y's."""
    g_x = torch.empty_like(v)
    return g_x, (torch.empty_like(y) if y is not None else v.new_empty((0,)))


@_backward_op.register_fake
def _(grad_n, grad_v, v, mean, rstd, weight, y, scale):  # type: ignore[no-untyped-def]
    g_scale = v.new_empty((0,)) if scale is None else torch.empty_like(scale)
    return *_backward_maps(v, y), torch.empty_like(weight), torch.empty_like(weight), g_scale


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, y, scale, weight, _, _, _ = inputs
    ctx.x_dtype = x.dtype
    out_v, _, mean, rstd = output
    ctx.save_for_backward(x if y is None else out_v, mean, rstd, weight, y, scale)


def _backward(ctx, grad_v, grad_n, _grad_mean, _grad_rstd):  # type: ignore[no-untyped-def]
    v, mean, rstd, weight, y, scale = ctx.saved_tensors
    if y is None:
        grad_v = None  # v is not an output without y (the caller returns x itself)
    if grad_n is None:
        grad_n = torch.zeros_like(v)
    g_x, g_y, g_w, g_b, g_scale = _backward_op(grad_n, grad_v, v, mean, rstd, weight, y, scale)
    g_x = g_x.to(ctx.x_dtype)
    if y is None:
        return g_x, None, None, g_w, g_b, None, None
    return g_x, g_y, g_scale, g_w, g_b, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
