"""The inverse-operator convolution of OPIR (Eq. 11, 16-19): the public entry point.

`inverse_operator(...)` checks its arguments and calls `torch.ops.opir.inverse_operator`. The
parts live in their own modules, one idea each (after Liger-Kernel's layout):

- `reference`: the readable PyTorch forward and its closed-form backward (CPU path, test oracle);
- `planes`: the same forward written plane by plane, what inductor compiles on CPU;
- `triton_kernels`: the Triton kernels and their launchers (the only module importing triton),
  `triton_limits`: what they take, asked without importing them;
- `native`: the C kernels (`inverse_operator_cpu.c`), built at first use, called by ctypes;
- `op`: the custom op, the backend choice (`kernel_backend`), autograd, FLOP registration;
- `flops`: the FLOP formulas.

The names below are re-exported here so that callers import from one place; the Triton
launchers and their launch configurations load on first access (they need triton).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .flops import inverse_operator_backward_flops, inverse_operator_flops
from .op import BACKENDS, HAS_TRITON, current_backend, kernel_backend
from .planes import inverse_operator_planes
from .reference import (
    DEFAULT_DILATIONS,
    TAPS,
    inverse_operator_backward_reference,
    inverse_operator_reference,
)
from .triton_limits import triton_supports

__all__ = [
    "BACKENDS",
    "DEFAULT_DILATIONS",
    "HAS_TRITON",
    "TAPS",
    "current_backend",
    "inverse_operator",
    "inverse_operator_backward_flops",
    "inverse_operator_backward_reference",
    "inverse_operator_flops",
    "inverse_operator_planes",
    "inverse_operator_reference",
    "kernel_backend",
    "triton_supports",
]

# Names of `triton_kernels`, loaded when first asked for (PEP 562), so that importing this module
# never needs triton.
_TRITON_NAMES = (
    "BACKWARD_CONFIG",
    "FORWARD_CONFIG",
    "inverse_operator_backward_triton",
    "inverse_operator_forward_triton",
)


def __getattr__(name: str) -> object:
    if name in _TRITON_NAMES:
        from . import triton_kernels

        return getattr(triton_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_args(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int],
) -> None:
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    b, c, h, w = image.shape
    if c < 1:
        raise ValueError("image must have at least one channel")
    if len(dilations) < 1:
        raise ValueError("dilations must hold at least one scale")
    for d in dilations:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dilations must be positive ints, got {list(dilations)}")
    expected = {
        "kernel": (kernel, (b, 9, h, w)),
        "modulation": (modulation, (b, 9, h, w)),
        "fusion_logits": (fusion_logits, (b, len(dilations), h, w)),
        "bias": (bias, (b, c, h, w)),
    }
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            hint = ""
            if name == "fusion_logits" and t.dim() == 4 and t.shape[1] != len(dilations):
                hint = f" (S = {t.shape[1]} logits but {len(dilations)} dilations)"
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}{hint}")
        if t.device != image.device:
            raise ValueError(f"{name} is on {t.device} but image is on {image.device}")
        if t.dtype != image.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but image has {image.dtype}")
    if not image.dtype.is_floating_point:
        raise ValueError(f"image must be a floating-point tensor, got {image.dtype}")


def inverse_operator(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None = None,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> tuple[Tensor, Tensor]:
    """Restore `image` with a per-pixel multi-scale inverse operator (Eq. 11, 16-19).

    Args:
        image: (B, C, H, W), any C >= 1, fp32/fp16/bf16 (fp64 on the reference path).
        kernel: (B, 9, H, W) base 3x3 taps, row-major over delta in {-1, 0, 1}^2.
        modulation: (B, 9, H, W) TAM weights, or None (= 1).
        fusion_logits: (B, S, H, W), S = len(dilations).
        bias: (B, C, H, W) or None.
        dilations: S positive ints.

    Returns:
        (restored (B, C, H, W), uncertainty (B, 1, H, W)).

    Under autocast every floating input is cast to float32 first: the operands come from
    layers autocast runs at different precisions (a bf16 convolution's kernel beside an fp32
    image), and the op, memory-bound and accumulating in fp32 anyway, gains nothing from
    half-precision operands but loses digits of the restored image.

    Raises:
        ValueError: mismatched shapes, devices or dtypes, or bad dilations.
    """
    device_type = image.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        image, kernel, modulation, fusion_logits, bias = (
            None if t is None else t.float()
            for t in (image, kernel, modulation, fusion_logits, bias)
        )
    _check_args(image, kernel, modulation, fusion_logits, bias, dilations)
    return torch.ops.opir.inverse_operator(
        image, kernel, modulation, fusion_logits, bias, [int(d) for d in dilations]
    )
