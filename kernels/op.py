"""The custom op `torch.ops.opir.inverse_operator`: which implementation runs (the backend), the
op and its backward op, autograd, and the FLOP formulas.

Both ops are registered with `torch.library.triton_op`, so that torch.compile traces into their
bodies: on CPU inductor fuses `inverse_operator_planes` into the model's graph, on CUDA it sees
the Triton kernels. `triton_op` itself needs no triton, so the registration is the same on every
install, and a CPU install compiles the op as this machine does. The Triton launchers are
imported only where triton is installed (`triton_kernels` is the one module that imports it);
without it, the CUDA path runs the reference and asking for "triton" says why it cannot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from . import native
from .flops import inverse_operator_backward_flops, inverse_operator_flops
from .planes import inverse_operator_planes
from .reference import inverse_operator_backward_reference, inverse_operator_reference
from .triton_limits import MAX_TRITON_DILATION, MAX_TRITON_SCALES, offsets_fit, triton_supports

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from .triton_kernels import inverse_operator_backward_triton, inverse_operator_forward_triton

BACKENDS = ("auto", "triton", "native", "reference")

# A context variable, not a module global: each thread (and each asyncio task) sees its own
# choice, and a new thread starts from OPIR_KERNEL (read once, at import).
_DEFAULT_BACKEND = os.environ.get("OPIR_KERNEL", "auto")
_backend: ContextVar[str] = ContextVar("opir_kernel_backend", default=_DEFAULT_BACKEND)
_native_fallback_said = False


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Choose the op's implementation while the block runs, in this thread (or asyncio task)
    only; other threads keep theirs.

    "auto" (default; env OPIR_KERNEL sets it at import): Triton for CUDA tensors (the reference
    for fp64, for dilations the kernels do not take, or where triton is not installed); on CPU,
    eager, the native kernels (`inverse_operator_cpu.c`, built at first use) where they build and
    take the arguments (fp32/fp16/bf16, at most 16 scales), else the reference, and a warning
    once per process when they cannot build; under torch.compile on CPU the reference, which
    inductor fuses into the graph. "native": the native kernels, an error where they cannot
    run. "triton": always Triton; on CPU tensors that needs TRITON_INTERPRET=1 set before opir
    is imported (Triton's interpreter, slow but exact: how the tests exercise the kernels).
    "reference": always PyTorch: the reference eager, `inverse_operator_planes` (the same maths
    written for inductor) under torch.compile.

    Under torch.compile the choice is made when the graph is traced, not when it runs: a
    compiled function keeps the implementation of the block it was first compiled in. The
    backward runs the implementation its forward chose (autograd may run it in another thread).
    """
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    """The backend this thread's calls of the op use now ("auto" unless set)."""
    return _backend.get()


def _say_native_fallback_once(reason: str) -> None:
    """Warn, once per process, that auto runs the reference because the native kernels cannot
    build (OPIR_NATIVE=0, a choice, is not warned about)."""
    global _native_fallback_said
    if _native_fallback_said or reason == native.TURNED_OFF:
        return
    _native_fallback_said = True
    warnings.warn(
        f"opir: the native CPU kernels are unavailable ({reason}); the op runs its PyTorch "
        "reference (same results, slower on its own)",
        RuntimeWarning,
        stacklevel=2,
    )


def _implementation(image: Tensor, dilations: Sequence[int]) -> str:
    """Which implementation runs for these arguments: "triton", "native" or "reference"."""
    backend = _backend.get()
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("the Triton kernels need triton, which is not installed")
        if not triton_supports(dilations):
            raise ValueError(
                f"the Triton kernels take at most {MAX_TRITON_SCALES} scales of dilation at most "
                f"{MAX_TRITON_DILATION}, got {list(dilations)}"
            )
        return "triton"
    if backend == "auto" and image.device.type == "cuda":
        # fp64 keeps its precision on the reference (the kernels accumulate in fp32); an image
        # whose planes outgrow the forward's 32-bit offsets goes there too.
        fits = offsets_fit(image, dilations)
        usable = triton_supports(dilations) and image.dtype != torch.float64 and fits
        return "triton" if usable and HAS_TRITON else "reference"
    if backend == "native":
        if not native.supports(image, dilations):
            reason = native.unavailable_reason() or (
                f"it takes CPU fp32/fp16/bf16 tensors and at most {native.MAX_SCALES} scales, "
                f"got {image.device.type} {image.dtype} and {len(dilations)}"
            )
            raise RuntimeError(f"the native CPU kernels cannot run: {reason}")
        return "native"
    # Eager, the native kernels replace the reference's hundreds of small ops; under
    # torch.compile inductor fuses the reference into the model's graph, which measured as fast
    # for the whole model (bench/op.py, README) and keeps the op traceable.
    if backend == "auto" and not torch.compiler.is_compiling():
        if native.supports(image, dilations):
            return "native"
        reason = native.unavailable_reason() if image.device.type == "cpu" else None
        if reason is not None:
            _say_native_fallback_once(reason)
    return "reference"


def _inverse_operator(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: list[int],
) -> tuple[Tensor, Tensor]:
    impl = _implementation(image, dilations)
    if impl == "triton":
        return inverse_operator_forward_triton(
            image, kernel, modulation, fusion_logits, bias, dilations
        )
    if impl == "native":  # an opaque call under torch.compile (it needs real data)
        return torch.ops.opir.inverse_operator_native(
            image, kernel, modulation, fusion_logits, bias, dilations
        )
    if torch.compiler.is_compiling():  # inductor decomposes this body: give it the fusable form
        return inverse_operator_planes(image, kernel, modulation, fusion_logits, bias, dilations)
    return inverse_operator_reference(image, kernel, modulation, fusion_logits, bias, dilations)


def _inverse_operator_backward(
    grad_restored: Tensor,
    grad_uncertainty: Tensor,
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    dilations: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads for (image, kernel, modulation, logits); modulation's is empty when it is None."""
    impl = _implementation(image, dilations)
    if impl == "native":
        return torch.ops.opir.inverse_operator_native_backward(
            grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits, dilations
        )
    if impl == "triton":
        g_image, g_kernel, g_mod, g_logits, _ = inverse_operator_backward_triton(
            grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits, dilations
        )
    else:
        g_image, g_kernel, g_mod, g_logits, _ = inverse_operator_backward_reference(
            grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits, dilations
        )
    if g_mod is None:
        g_mod = kernel.new_empty((0,))
    return g_image, g_kernel, g_mod, g_logits


@contextlib.contextmanager
def _quiet_without_triton() -> Iterator[None]:
    """`triton_op` looks for Triton kernels in the body it registers (for compile caches' keys)
    and logs a warning where triton is not installed; the CPU paths need none, so there the
    warning is noise."""
    logger = logging.getLogger("torch._library.triton")
    level = logger.level
    if not HAS_TRITON:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


with _quiet_without_triton():
    _inverse_operator_op = triton_op("opir::inverse_operator", _inverse_operator, mutates_args=())
    _inverse_operator_backward_op = triton_op(
        "opir::inverse_operator_backward", _inverse_operator_backward, mutates_args=()
    )


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    image, kernel, modulation, fusion_logits, bias, dilations = inputs
    ctx.save_for_backward(image, kernel, modulation, fusion_logits)
    ctx.dilations = list(dilations)
    ctx.has_bias = bias is not None
    # Autograd may run the backward in its own thread (one per device), which does not see this
    # thread's backend: the backward takes the forward's.
    ctx.backend = _backend.get()


def _backward(ctx, grad_restored: Tensor, grad_uncertainty: Tensor):  # type: ignore[no-untyped-def]
    image, kernel, modulation, fusion_logits = ctx.saved_tensors
    token = _backend.set(ctx.backend)
    try:
        g_image, g_kernel, g_mod, g_logits = torch.ops.opir.inverse_operator_backward(
            grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits, ctx.dilations
        )
    finally:
        _backend.reset(token)
    g_bias = grad_restored if ctx.has_bias else None
    return g_image, g_kernel, (g_mod if modulation is not None else None), g_logits, g_bias, None


_inverse_operator_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.opir.inverse_operator)
def _inverse_operator_flop_formula(
    image_shape, kernel_shape, modulation_shape, logits_shape, bias_shape, dilations,
    *args, **kwargs,
) -> int:  # type: ignore[no-untyped-def]  # fmt: skip
    b, c, h, w = image_shape
    return inverse_operator_flops(
        b, c, h, w, len(dilations), modulation_shape is not None, bias_shape is not None
    )


@register_flop_formula(torch.ops.opir.inverse_operator_backward)
def _inverse_operator_backward_flop_formula(
    grad_shape, grad_unc_shape, image_shape, kernel_shape, modulation_shape, logits_shape,
    dilations, *args, **kwargs,
) -> int:  # type: ignore[no-untyped-def]  # fmt: skip
    b, c, h, w = image_shape
    return inverse_operator_backward_flops(b, c, h, w, len(dilations), modulation_shape is not None)
