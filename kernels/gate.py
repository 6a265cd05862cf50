"""The NAFBlock's SimpleGate, optionally with the channel attention's mean of its output:
`y = u[:, :C] * u[:, C:]` for u (B, 2C, H, W), and `mean = y` averaged over H and W, (B, C, 1, 1)
(NAFNet, Chen et al. 2022: the gate is the block's nonlinearity, the mean the input of its
simplified channel attention).

- `gate_reference`: the PyTorch form, `chunk` and a multiply, the mean by `adaptive_avg_pool2d`;
- `simple_gate`: the entry point. Where `nafblock_native.use_native` says so it calls the native
  kernels of `nafblock_cpu.c` through the custom op `opir::gate_native`: one pass forward (the
  mean's sums on the way) and one backward (both halves of du, the mean's gradient folded in);
  elsewhere the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .nafblock_native import half_bits, use_native


def gate_reference(u: Tensor, with_mean: bool = False) -> tuple[Tensor, Tensor | None]:
    """(y, mean): y = first half of u's channels times the second; mean (B, C, 1, 1) of y over
    H and W when `with_mean`, else None."""
    a, b = u.chunk(2, dim=1)
    y = a * b
    return y, (F.adaptive_avg_pool2d(y, 1) if with_mean else None)


def simple_gate(u: Tensor, with_mean: bool = False) -> tuple[Tensor, Tensor | None]:
    """`gate_reference`'s (y, mean), by the native kernels where they run, else the reference."""
    if u.dim() == 4 and u.shape[1] % 2 == 0 and use_native(u):
        y, mean = torch.ops.opir.gate_native(u, with_mean)
        return y, (mean if with_mean else None)
    return gate_reference(u, with_mean)


@torch.library.custom_op("opir::gate_native", mutates_args=())
def _forward_op(u: Tensor, with_mean: bool) -> tuple[Tensor, Tensor]:
    """(y, mean); mean (B, C, 1, 1), empty without `with_mean`."""
    library = native.library()
    assert library is not None, "check use_native() first"
    b, c2, h, w = u.shape
    c = c2 // 2
    y = torch.empty((b, c, h, w), dtype=u.dtype, device=u.device, memory_format=torch.channels_last)
    parts = torch.get_num_threads()
    # per thread and image, summed below in thread order: the same mean whatever the schedule
    sums = u.new_zeros((parts, b, c), dtype=torch.float32) if with_mean else None
    library.opir_gate_forward(
        u.data_ptr(), c, h * w, y.data_ptr(), None if sums is None else sums.data_ptr(),
        b * h * w, parts, half_bits(u, y),
    )  # fmt: skip
    if sums is None:
        return y, u.new_empty((0,))
    # summed in fp32, returned in u's dtype as the reference's mean (the channel attention's
    # convolution takes it in its own dtype)
    return y, (sums.sum(dim=0) / (h * w)).view(b, c, 1, 1).to(u.dtype)


@_forward_op.register_fake
def _(u, with_mean):  # type: ignore[no-untyped-def]
    b, c2, h, w = u.shape
    y = torch.empty(
        (b, c2 // 2, h, w), dtype=u.dtype, device=u.device, memory_format=torch.channels_last
    )
    return y, (u.new_empty((b, c2 // 2, 1, 1)) if with_mean else u.new_empty((0,)))


@torch.library.custom_op("opir::gate_native_backward", mutates_args=())
def _backward_op(grad_y: Tensor, grad_mean: Tensor | None, u: Tensor) -> Tensor:
    """du (B, 2C, H, W) from dy and, when given, d mean."""
    library = native.library()
    assert library is not None, "check use_native() first"
    b, c2, h, w = u.shape
    # The gradient reaching the op may be in any layout: the kernels read channels-last rows
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    g_mean = None if grad_mean is None else grad_mean.reshape(b, c2 // 2).float().contiguous()
    g_u = torch.empty_like(u)
    library.opir_gate_backward(
        grad_y.data_ptr(), None if g_mean is None else g_mean.data_ptr(), u.data_ptr(), c2 // 2,
        h * w, g_u.data_ptr(), b * h * w, torch.get_num_threads(), half_bits(grad_y, u, g_u),
    )  # fmt: skip
    return g_u


@_backward_op.register_fake
def _(grad_y, grad_mean, u):  # type: ignore[no-untyped-def]
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    u, with_mean = inputs
    ctx.save_for_backward(u)
    ctx.with_mean = with_mean


def _backward(ctx, grad_y, grad_mean):  # type: ignore[no-untyped-def]
    (u,) = ctx.saved_tensors
    if not ctx.with_mean:
        grad_mean = None
    if grad_y is None:
        b, c2, h, w = u.shape
        grad_y = torch.zeros((b, c2 // 2, h, w), dtype=u.dtype, memory_format=torch.channels_last)
    return _backward_op(grad_y, grad_mean, u), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
