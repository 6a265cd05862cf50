"""The TAM's modulation m = g_TAM(K_p(q), e_t) (paper Eq. 19-21), without its hidden layer.

For image b and tap i the TAM is a function of one number, the kernel value k:

    m_{b,i}(k) = c + sum_h v_h GELU(w_h k + a_{b,h} + o_{i,h})                        (Eq. 21)

with a_b = W_e e_t(b) the task term, o_i the tap's offset and (v, c) the output layer. The direct
form evaluates that at every tap of every pixel: a (B, 9, H, W, hidden) tensor, `hidden` GELUs
per tap, read and written several times. On the CPU that was 96% of an operator stage (107 of
111 ms at 512x512, the op itself 3.6 ms).

The tabulated form evaluates m_{b,i} exactly at P points evenly spread over [min k, max k] of
that image and tap, then reads every pixel's value off the table by linear interpolation: 9
small tables per image instead of 9 H W `hidden`-wide MLPs. The interpolation error is at most
(max |m''|) delta^2 / 8 with delta = (max k - min k) / (P - 1); m is a sum of a few GELUs, so
with P = 4097 that is far below float32 rounding for any kernel range a model produces
(tests/test_tam_modulation.py measures it). Gradients flow through the table to the MLP's
parameters; the kernel's gradient reads a second table, of the exact derivative m'.

The table's size follows the image (`table_points`): a sixteenth of its pixels, 1025 to 4097
points. On a training crop of 128x128 a 4097-point table with its derivative cost about as much
as the direct form (a step 1.01x faster); 1025 points make the step about 1.1x faster, and on the
trained models' kernels every size from 257 points up agrees with the direct form to float32
rounding (m is nearly linear over a kernel's range). Photos of 256x256 and larger keep 4097.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

TABLE_POINTS = 4097  # the largest table (photos of 256x256 and up)
MIN_TABLE_POINTS = 1025  # the smallest: training crops of 128x128
FORMS = ("auto", "direct", "tabulated")
# Per thread and task, like the op's backend (inverse_operator.kernel_backend); a graph traced
# by torch.compile always takes "auto" and tables sized by the image.
_form: contextvars.ContextVar[tuple[str, int | None]] = contextvars.ContextVar(
    "opir_tam_form", default=("auto", None)
)


def table_points(pixels: int) -> int:
    """The points of the table for a kernel plane of `pixels`: a sixteenth of them, within
    MIN_TABLE_POINTS .. TABLE_POINTS (module docstring: why, and what it costs in accuracy)."""
    return min(TABLE_POINTS, max(MIN_TABLE_POINTS, pixels // 16 + 1))


@contextlib.contextmanager
def tam_form(name: str, points: int | None = None) -> Iterator[None]:
    """Evaluate the TAM "direct" (the MLP at every tap, today's oracle and the benchmarks'
    baseline), "tabulated", or "auto" (tabulated where the image has more pixels than its
    table has points) inside the block; `points` fixes the table's size (default: sized by
    the image, `table_points`)."""
    if name not in FORMS:
        raise ValueError(f"TAM form must be one of {', '.join(FORMS)}, got {name!r}")
    if points is not None and points < 2:
        raise ValueError(f"a table needs at least 2 points, got {points}")
    token = _form.set((name, points))
    try:
        yield
    finally:
        _form.reset(token)


def _pre_activation(values: Tensor, weight_k: Tensor, task: Tensor, tap_offset: Tensor) -> Tensor:
    """The hidden layer's input w_h k + a_{b,h} + o_{i,h} (Eq. 21) for kernel values
    (B, 9, *S): a pixel's (S = H, W) or a table's (S = points) -> (B, 9, *S, hidden)."""
    spread = (None,) * (values.dim() - 2)  # broadcast over S
    return (
        values.unsqueeze(-1) * weight_k
        + task[(slice(None), None, *spread)]
        + tap_offset[(None, slice(None), *spread)]
    )


def tam_modulation_reference(
    kernel: Tensor, weight_k: Tensor, task: Tensor, tap_offset: Tensor, out_weight: Tensor,
    out_bias: Tensor,
) -> Tensor:  # fmt: skip
    """The direct form: kernel (B, 9, H, W), weight_k (hidden,), task (B, hidden) = W_e e_t,
    tap_offset (9, hidden), out_weight (1, hidden), out_bias (1,) -> m (B, 9, H, W).

    Reads B 9 H W values and writes a (B, 9, H, W, hidden) pre-activation, its GELU and the
    result: the oracle the tabulated form is tested against."""
    pre = _pre_activation(kernel, weight_k, task, tap_offset)  # (B, 9, H, W, hidden)
    return F.linear(F.gelu(pre), out_weight, out_bias).squeeze(-1)


def tam_modulation_tabulated(
    kernel: Tensor, weight_k: Tensor, task: Tensor, tap_offset: Tensor, out_weight: Tensor,
    out_bias: Tensor, points: int = TABLE_POINTS,
) -> Tensor:  # fmt: skip
    """The tabulated form, same arguments and result as `tam_modulation_reference` (to within
    the interpolation error): a (B, 9, points) table of exact values, then one gather of a value
    and a slope per tap and pixel."""
    if points < 2:
        raise ValueError(f"a table needs at least 2 points, got {points}")
    dtype = kernel.dtype
    k = kernel.float() if dtype in (torch.float16, torch.bfloat16) else kernel
    b, taps = k.shape[:2]
    flat = k.reshape(b, taps, -1)  # (B, 9, HW)
    # Where the table's points lie is a choice, not a function of the kernel: no gradient
    values = flat.detach()
    lo = values.amin(dim=2)
    span = values.amax(dim=2) - lo
    # A constant plane still needs a positive step; any value of k then sits on point 0
    step = torch.where(span > 0, span / (points - 1), torch.ones_like(span))  # (B, 9)
    grid = lo[..., None] + step[..., None] * torch.arange(points, device=k.device, dtype=k.dtype)
    pre = _pre_activation(grid, weight_k.to(k.dtype), task.to(k.dtype), tap_offset.to(k.dtype))
    out_w = out_weight.to(k.dtype)
    table = F.linear(F.gelu(pre), out_w, out_bias.to(k.dtype)).squeeze(-1)
    slope = table.diff(dim=2)  # (B, 9, points - 1): the change per step
    position = ((values - lo[..., None]) / step[..., None]).clamp_(0, points - 1)
    index = position.floor().clamp_(max=points - 2)
    fraction = position - index
    index = index.long()
    m = table.gather(2, index) + slope.gather(2, index) * fraction
    if flat.requires_grad:
        # dm/dk from the table's differences would lose most of its digits (neighbouring
        # entries agree to ~1e-6), so the kernel's gradient reads the exact derivative
        # sum_h v_h w_h GELU'(pre_h), tabulated and interpolated the same way; the added term
        # is zero in value and carries only that gradient.
        with torch.no_grad():
            derivative = (_gelu_derivative(pre) * (out_w[0] * weight_k.to(k.dtype))).sum(-1)
            d = derivative.gather(2, index) + derivative.diff(dim=2).gather(2, index) * fraction
        m = m + d * (flat - values)
    return m.reshape(kernel.shape).to(dtype)


def _gelu_derivative(x: Tensor) -> Tensor:
    """GELU'(x) = Phi(x) + x phi(x) for the exact (erf) GELU."""
    density = torch.exp(-0.5 * x * x) * (2 * torch.pi) ** -0.5
    return 0.5 * (1 + torch.erf(x * 0.5**0.5)) + x * density


def tam_modulation(
    kernel: Tensor, weight_k: Tensor, task: Tensor, tap_offset: Tensor, out_weight: Tensor,
    out_bias: Tensor,
) -> Tensor:  # fmt: skip
    """m (B, 9, H, W): tabulated where a table is cheaper than the direct form (more pixels than
    table points), else direct, unless `tam_form` says which. Arguments as
    `tam_modulation_reference`."""
    # Dynamo cannot read a ContextVar: a compiled graph takes the automatic choice
    form, points = ("auto", None) if torch.compiler.is_compiling() else _form.get()
    pixels = kernel.shape[-2] * kernel.shape[-1]
    points = points or table_points(pixels)
    if form == "auto":
        form = "tabulated" if pixels > points else "direct"
    if form == "tabulated":
        return tam_modulation_tabulated(
            kernel, weight_k, task, tap_offset, out_weight, out_bias, points
        )
    return tam_modulation_reference(kernel, weight_k, task, tap_offset, out_weight, out_bias)
