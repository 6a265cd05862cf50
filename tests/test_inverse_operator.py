"""The inverse-operator op: Triton (interpreted on CPU), the native CPU kernels, unfold and the
closed-form backward against the PyTorch reference; autograd, opcheck, torch.compile, FLOPs and
argument checks."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from opir_kernels import native, op, triton_kernels
from opir_kernels.flops import inverse_operator_backward_flops, inverse_operator_flops
from opir_kernels.inverse_operator import inverse_operator, kernel_backend
from opir_kernels.planes import inverse_operator_planes
from opir_kernels.reference import (
    TAPS,
    inverse_operator_backward_reference,
    inverse_operator_reference,
)
from opir_kernels.triton_kernels import (
    inverse_operator_backward_triton,
    inverse_operator_forward_triton,
)
from opir_kernels.triton_limits import triton_supports


def _load_bench(name: str) -> ModuleType:
    """A script of bench/ (not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inverse_operator_unfold = _load_bench("unfold_baseline").inverse_operator_unfold

NAMES = ("image", "kernel", "modulation", "fusion_logits", "bias")
DILATIONS_4 = (1, 2, 3, 4)

# (B, C, H, W), dilations, has_modulation, has_bias. BLOCK is 256 pixels per program.
CASES = [
    pytest.param((1, 3, 17, 23), (1, 2, 3, 4), True, True, id="odd-391px"),
    pytest.param((1, 3, 1, 1), (1, 2, 3, 4), True, True, id="1x1"),
    pytest.param((2, 3, 9, 11), (1, 2, 3, 4), True, True, id="batch2"),
    pytest.param((1, 1, 8, 8), (1, 2, 3, 4), True, True, id="C1"),
    pytest.param((1, 4, 7, 5), (1, 2, 3, 4), False, True, id="C4-no-modulation"),
    pytest.param((1, 3, 20, 30), (1, 2, 3, 4), True, False, id="600px-no-bias"),
    pytest.param((1, 2, 16, 32), (1, 2, 3, 4), True, True, id="16x32-two-full-tiles"),
    pytest.param((1, 3, 3, 5), (1, 7), True, True, id="dilation-beyond-image"),
    pytest.param((1, 3, 6, 7), (3,), False, False, id="S1-bare"),
]

# (dtype, atol, rtol): the kernels accumulate in fp32 like the reference, so half precision
# differs only by the final rounding of each output (2^-11 relative for fp16, 2^-8 for bf16).
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-4, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-3, 1e-2, id="bf16"),
]

Inputs = dict[str, Tensor | None]


def _make_inputs(
    shape: Sequence[int],
    scales: int,
    has_modulation: bool = True,
    has_bias: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Inputs:
    """Random op inputs: image (B, C, H, W) in [0, 1], taps (B, 9, H, W), logits (B, S, H, W)."""
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    inputs: Inputs = {
        "image": torch.rand(b, c, h, w, generator=gen),
        "kernel": torch.randn(b, 9, h, w, generator=gen) / 3,
        "modulation": 2 * torch.rand(b, 9, h, w, generator=gen) if has_modulation else None,
        "fusion_logits": torch.randn(b, scales, h, w, generator=gen),
        "bias": 0.1 * torch.randn(b, c, h, w, generator=gen) if has_bias else None,
    }
    return {k: None if t is None else t.to(dtype) for k, t in inputs.items()}


def _grad_outputs(inputs: Inputs, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random upstream grads for (restored (B, C, H, W), uncertainty (B, 1, H, W))."""
    image = inputs["image"]
    gen = torch.Generator().manual_seed(seed)
    b, _, h, w = image.shape
    g = torch.randn(image.shape, generator=gen).to(image.dtype)
    gu = torch.randn((b, 1, h, w), generator=gen).to(image.dtype)
    return g, gu


def _upcast(inputs: Inputs, dtype: torch.dtype = torch.float32) -> Inputs:
    return {k: None if t is None else t.to(dtype) for k, t in inputs.items()}


def _forward_and_grads(
    fn, inputs: Inputs, dilations: Sequence[int], grads: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Run `fn` on leaf copies of `inputs`, then autograd with `grads` for both outputs."""
    leaves = {
        k: None if t is None else t.detach().clone().requires_grad_() for k, t in inputs.items()
    }
    restored, uncertainty = fn(*(leaves[k] for k in NAMES), dilations)
    present = [k for k in NAMES if leaves[k] is not None]
    got = torch.autograd.grad((restored, uncertainty), [leaves[k] for k in present], grads)
    return restored.detach(), uncertainty.detach(), dict(zip(present, got, strict=True))


def _assert_close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _check_against_reference(
    fn, inputs: Inputs, dilations: Sequence[int], atol: float, rtol: float
) -> None:
    """Outputs and every gradient of `fn` equal the fp32 reference on the upcast inputs."""
    grads = _grad_outputs(inputs)
    restored, uncertainty, got = _forward_and_grads(fn, inputs, dilations, grads)
    ref = _forward_and_grads(
        inverse_operator_reference, _upcast(inputs), dilations, (grads[0].float(), grads[1].float())
    )
    _assert_matches((restored, uncertainty, got), ref, inputs, atol, rtol)


def _assert_matches(result: tuple, ref: tuple, inputs: Inputs, atol: float, rtol: float) -> None:
    """`result` (restored, uncertainty, {name: grad}), on any device, equals the reference's on
    the CPU, with the dtype and shape of `inputs`."""
    restored, uncertainty, got = result
    assert restored.dtype == inputs["image"].dtype and uncertainty.dtype == restored.dtype
    _assert_close(restored.cpu(), ref[0], atol, rtol, "restored")
    _assert_close(uncertainty.cpu(), ref[1], atol, rtol, "uncertainty")
    assert got.keys() == ref[2].keys()
    for name, grad in got.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        _assert_close(grad.cpu(), ref[2][name], atol, rtol, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Triton (through TRITON_INTERPRET=1 on CPU) against the reference.
# ---------------------------------------------------------------------------------------------


# The tests build CPU tensors, so the Triton kernels run only through the interpreter.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU needs TRITON_INTERPRET=1 before import (tests/conftest.py sets it)",
)


def test_triton_passes_refuse_planes_past_32_bit_offsets_before_copying() -> None:
    """9 x 2^15 x 2^13 = 2^31 elements in the kernel's planes: one too many for the kernels'
    32-bit offsets. The inputs are stride-0 views (no memory); the refusal must come before
    `.contiguous()` would allocate 8 GiB, and name the shape and the way out."""
    h, w = 2**15, 2**13
    image = torch.zeros(1, 3, 1, 1).expand(1, 3, h, w)
    kernel = torch.zeros(1, 9, 1, 1).expand(1, 9, h, w)
    logits = torch.zeros(1, 4, 1, 1).expand(1, 4, h, w)
    with pytest.raises(ValueError, match=r"Triton forward .* 9 x 32768 x 8192: tile the image"):
        inverse_operator_forward_triton(image, kernel, None, logits, None, DILATIONS_4)
    with pytest.raises(ValueError, match=r"Triton backward .* 9 x 32768 x 8192: tile the image"):
        inverse_operator_backward_triton(
            image, image[:, :1], image, kernel, None, logits, DILATIONS_4
        )


@needs_interpreter
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), CASES)
def test_inverse_operator_matches_reference(
    shape, dilations, has_modulation, has_bias, dtype, atol, rtol
) -> None:
    """The custom op on the Triton backend: forward and all grads (its autograd) vs reference."""
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, dtype)
    with kernel_backend("triton"):
        _check_against_reference(inverse_operator, inputs, dilations, atol, rtol)


@needs_interpreter
@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), CASES)
def test_inverse_operator_launchers_match_reference(
    shape, dilations, has_modulation, has_bias
) -> None:
    """The launchers called directly: forward vs reference, backward vs the closed form."""
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias)
    args = [inputs[k] for k in NAMES]
    restored, uncertainty = inverse_operator_forward_triton(*args, dilations)
    ref_restored, ref_uncertainty = inverse_operator_reference(*args, dilations)
    _assert_close(restored, ref_restored, 1e-5, 1e-5, "restored")
    _assert_close(uncertainty, ref_uncertainty, 1e-5, 1e-5, "uncertainty")

    g, gu = _grad_outputs(inputs)
    got = inverse_operator_backward_triton(g, gu, *args[:4], dilations)
    ref = inverse_operator_backward_reference(g, gu, *args[:4], dilations)
    for name, a, e in zip(NAMES, got, ref, strict=True):
        if e is None:
            assert a is None and not has_modulation, name
            continue
        _assert_close(a, e, 1e-5, 1e-5, f"grad {name}")


@needs_interpreter
@pytest.mark.parametrize(
    ("tile", "dilations"),
    [
        pytest.param((4, 16), (1, 2, 3, 4), id="4x16"),
        # Small tiles mean many interpreted programs: 30 to 140 s each on 2 loaded cores.
        pytest.param((2, 4), (1, 2, 3, 4), id="2x4", marks=pytest.mark.slow),
        pytest.param((1, 32), (1, 2, 3, 4), id="1x32", marks=pytest.mark.slow),
        pytest.param((2, 4), (5, 1, 2), id="2x4-unsorted-dilations", marks=pytest.mark.slow),
    ],
)
def test_triton_tiles_cover_the_image(
    tile: tuple[int, int], dilations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any tile shape gives the reference, forward and backward: many tiles both ways, partial
    tiles at the right and bottom borders, tiles that need border tests and interior tiles that
    read without them (the largest dilation decides which), taps and gathers crossing into the
    next tile (17 x 23 fits no tile evenly)."""
    inputs = _make_inputs((2, 3, 17, 23), len(dilations))
    args = [inputs[k] for k in NAMES]
    config = {"BLOCK_H": tile[0], "BLOCK_W": tile[1], "num_warps": 1}
    restored, uncertainty = inverse_operator_forward_triton(*args, dilations, config=config)
    ref_restored, ref_uncertainty = inverse_operator_reference(*args, dilations)
    _assert_close(restored, ref_restored, 1e-5, 1e-5, "restored")
    _assert_close(uncertainty, ref_uncertainty, 1e-5, 1e-5, "uncertainty")

    for key, value in config.items():
        monkeypatch.setitem(triton_kernels.BACKWARD_CONFIG, key, value)
    g, gu = _grad_outputs(inputs)
    got = inverse_operator_backward_triton(g, gu, *args[:4], dilations)
    ref = inverse_operator_backward_reference(g, gu, *args[:4], dilations)
    for name, a, e in zip(NAMES, got, ref, strict=True):
        _assert_close(a, e, 1e-5, 1e-5, f"grad {name}")


def _strided_variants(t: Tensor) -> dict[str, Tensor]:
    """Same values as `t` (B, C, H, W) in non-contiguous layouts."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 2, t.shape[2], t.shape[3] + 3, dtype=t.dtype)
    wide[:, 1 : 1 + t.shape[1], :, 2 : 2 + t.shape[3]] = t
    return {
        "channels_last": t.contiguous(memory_format=torch.channels_last),
        "transposed": t.transpose(-1, -2).contiguous().transpose(-1, -2),
        "sliced": wide[:, 1 : 1 + t.shape[1], :, 2 : 2 + t.shape[3]],
    }


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=needs_interpreter), "native", "reference"]
)
def test_inverse_operator_non_contiguous_inputs_match(backend: str, layout: str) -> None:
    """Every input and both upstream grads non-contiguous give the contiguous result."""
    dilations = (1, 2, 3, 4)
    inputs = _make_inputs((1, 3, 9, 11), len(dilations))
    grads = _grad_outputs(inputs)
    strided = {k: _strided_variants(t)[layout] for k, t in inputs.items()}
    strided_grads = tuple(_strided_variants(g)[layout] for g in grads)
    assert not any(t.is_contiguous() for t in strided.values())
    with kernel_backend(backend):
        expected = _forward_and_grads(inverse_operator, inputs, dilations, grads)
        got = _forward_and_grads(inverse_operator, strided, dilations, strided_grads)
    _assert_close(got[0], expected[0], 1e-6, 1e-6, "restored")
    _assert_close(got[1], expected[1], 1e-6, 1e-6, "uncertainty")
    for name in NAMES:
        _assert_close(got[2][name], expected[2][name], 1e-6, 1e-6, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# The reference against the unfold formulation and its closed-form backward against autograd.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), CASES)
def test_reference_matches_unfold(shape, dilations, has_modulation, has_bias) -> None:
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, torch.float64)
    args = [inputs[k] for k in NAMES]
    restored, uncertainty = inverse_operator_reference(*args, dilations)
    unf_restored, unf_uncertainty = inverse_operator_unfold(*args, dilations)
    assert restored.dtype == unf_restored.dtype == torch.float64
    torch.testing.assert_close(restored, unf_restored, atol=1e-12, rtol=0)
    torch.testing.assert_close(uncertainty, unf_uncertainty, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), CASES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_planes_match_reference(shape, dilations, has_modulation, has_bias, dtype, atol, rtol):
    """The flattened form inductor compiles equals the reference: borders (no tap wraps into the
    next row), dilations past the image, 1x1, batches, half precision."""
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, dtype)
    args = [inputs[k] for k in NAMES]
    expected = inverse_operator_reference(*_upcast(inputs).values(), dilations)
    got = inverse_operator_planes(*args, dilations)
    assert got[0].dtype == got[1].dtype == dtype
    _assert_close(got[0], expected[0], atol, rtol, "restored")
    _assert_close(got[1], expected[1], atol, rtol, "uncertainty")


@pytest.mark.parametrize("layout", ["fp64", "channels_last", "transposed"])
def test_planes_match_reference_in_fp64_and_strided_layouts(layout: str) -> None:
    inputs = _make_inputs((2, 3, 7, 9), 4, dtype=torch.float64)
    expected = inverse_operator_reference(*inputs.values(), DILATIONS_4)
    if layout == "channels_last":
        inputs = {k: t.contiguous(memory_format=torch.channels_last) for k, t in inputs.items()}
    elif layout == "transposed":  # same values, H and W strides swapped
        inputs = {k: t.transpose(-1, -2).contiguous().transpose(-1, -2) for k, t in inputs.items()}
    got = inverse_operator_planes(*inputs.values(), DILATIONS_4)
    torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-12, rtol=0)


# Slow: the first inductor compile in a process takes 40 to 80 s on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "dilations", "has_modulation", "has_bias"),
    [CASES[4], CASES[7], CASES[8]],  # no modulation, a dilation past the image, S = 1 bare
)
def test_compiled_forward_matches_reference(shape, dilations, has_modulation, has_bias) -> None:
    """What inductor makes of `inverse_operator_planes` equals the eager reference."""
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias)
    args = [inputs[k] for k in NAMES]
    compiled = torch.compile(inverse_operator, fullgraph=True, dynamic=False)
    with kernel_backend("reference"), torch._inductor.config.patch(force_disable_caches=True):
        got = compiled(*args, dilations=dilations)
    expected = inverse_operator_reference(*args, dilations)
    _assert_close(got[0], expected[0], 1e-6, 1e-5, "restored")
    _assert_close(got[1], expected[1], 1e-6, 1e-5, "uncertainty")


def test_planes_read_zero_outside_the_image() -> None:
    """A single tap at offset (0, +1), dilation 1: each pixel takes its right neighbour, and the
    last column reads 0 (not the first pixel of the next row)."""
    image = torch.arange(12.0).view(1, 1, 3, 4)
    kernel = torch.zeros(1, 9, 3, 4)
    kernel[:, 5] = 1.0  # delta = (0, +1)
    restored, _ = inverse_operator_planes(image, kernel, None, torch.zeros(1, 1, 3, 4), None, [1])
    expected = torch.tensor([[1.0, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]])
    torch.testing.assert_close(restored[0, 0], expected)


@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), CASES)
def test_backward_reference_matches_autograd(shape, dilations, has_modulation, has_bias) -> None:
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, torch.float64)
    grads = _grad_outputs(inputs)
    _, _, expected = _forward_and_grads(inverse_operator_reference, inputs, dilations, grads)
    args = [inputs[k] for k in NAMES[:4]]
    got = inverse_operator_backward_reference(*grads, *args, dilations)
    for name, grad in zip(NAMES, got, strict=True):
        if inputs[name] is None:
            # bias grad is returned whether or not there is a bias; modulation's only with one.
            assert name == "bias" or grad is None, name
            continue
        torch.testing.assert_close(grad, expected[name], atol=1e-12, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# Autograd, opcheck and torch.compile of the custom op.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "has_modulation", "has_bias", "fast_mode"),
    [((1, 2, 3, 3), True, True, False), ((1, 2, 4, 5), False, False, True)],
)
def test_inverse_operator_gradcheck(shape, has_modulation, has_bias, fast_mode) -> None:
    """Finite differences through `torch.ops.opir.inverse_operator` (reference path, fp64).

    The full Jacobian check takes ~10 s on 2 loaded cores, so the second case projects it on
    random vectors (fast_mode); the closed form is checked exactly above on every shape.
    """
    dilations = (1, 2)
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, torch.float64)
    leaves = [None if t is None else t.requires_grad_() for t in (inputs[k] for k in NAMES)]

    def run(*args: Tensor | None) -> tuple[Tensor, Tensor]:
        return inverse_operator(*args, dilations=dilations)

    with kernel_backend("reference"):
        assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-8, fast_mode=fast_mode)


def _op_args(inputs: Inputs, dilations: Sequence[int], requires_grad: bool) -> tuple:
    tensors = [None if t is None else t.requires_grad_(requires_grad) for t in inputs.values()]
    return (*tensors, list(dilations))


@pytest.mark.parametrize(("has_modulation", "has_bias"), [(True, True), (False, False)])
def test_inverse_operator_opcheck(has_modulation: bool, has_bias: bool) -> None:
    """Schema, autograd registration, fake tensors and AOT dispatch (dynamic shapes)."""
    dilations = (1, 3)
    inputs = _make_inputs((1, 3, 5, 6), len(dilations), has_modulation, has_bias)
    with kernel_backend("reference"):
        torch.library.opcheck(
            torch.ops.opir.inverse_operator.default, _op_args(inputs, dilations, True)
        )
        # The forward's test_aot_dispatch_dynamic already traces the joint graph, this op
        # included, with dynamic shapes; repeating it here would cost ~9 s for nothing new.
        torch.library.opcheck(
            torch.ops.opir.inverse_operator_backward.default,
            (*_grad_outputs(inputs), *_op_args(inputs, dilations, False)[:4], list(dilations)),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@needs_interpreter
def test_inverse_operator_opcheck_triton_backend() -> None:
    """The Triton backend passes the checks that run real tensors.

    test_faketensor and test_aot_dispatch_dynamic are left out: under TRITON_INTERPRET=1
    `wrap_triton` returns the interpreted kernel itself, which then runs on fake tensors and
    reads their (absent) storage. On CUDA the same code traces the kernel as a graph node.
    """
    dilations = (1, 2, 3, 4)
    inputs = _make_inputs((1, 3, 5, 6), len(dilations))
    with kernel_backend("triton"):
        torch.library.opcheck(
            torch.ops.opir.inverse_operator.default,
            _op_args(inputs, dilations, True),
            test_utils=("test_schema", "test_autograd_registration"),
        )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_inverse_operator_compiles_fullgraph(backend: str) -> None:
    """torch.compile(fullgraph=True) traces through the op (no graph break); forward and grads
    equal eager. With the reference the op decomposes into `inverse_operator_planes` for
    inductor; the native kernels stay opaque calls in the graph, forward and backward."""
    dilations = (1, 2, 3, 4)
    inputs = _make_inputs((1, 3, 9, 11), len(dilations))

    def loss_of(image, kernel, modulation, fusion_logits, bias):  # type: ignore[no-untyped-def]
        restored, uncertainty = inverse_operator(
            image, kernel, modulation, fusion_logits, bias, dilations
        )
        loss = (restored - image).square().mean() + 0.1 * uncertainty.mean()
        return loss, restored, uncertainty

    compiled = torch.compile(loss_of, fullgraph=True)  # raises on any graph break
    results = []
    for fn in (loss_of, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
        # Caches off: their key holds the op call, not the body it decomposes into, so a cached
        # graph could predate an edit of the reference.
        with kernel_backend(backend), torch._inductor.config.patch(force_disable_caches=True):
            loss, restored, uncertainty = fn(*leaves)
            loss.backward()
        results.append((loss, restored, uncertainty, *(t.grad for t in leaves)))
    for what, eager, comp in zip(
        ("loss", "restored", "uncertainty", *NAMES), *results, strict=True
    ):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-5, msg=what)


# ---------------------------------------------------------------------------------------------
# The native CPU kernels (kernels/inverse_operator_cpu.c) against the reference.
# ---------------------------------------------------------------------------------------------

# Beyond CASES: rows of several 128-pixel blocks whose first and last vectors load with column
# masks, widths that are not a multiple of the vector, more channels than the gather's group of
# 4, the most scales the kernels take, and enough rows (B H >= 32) that two threads split them,
# here in the middle of the second image.
NATIVE_CASES = [
    *CASES,
    pytest.param((1, 6, 9, 37), (1, 2, 3, 4), True, True, id="C6-two-channel-groups"),
    pytest.param((2, 3, 13, 300), (1, 2, 3, 4), True, True, id="300px-rows-3-blocks"),
    pytest.param((1, 2, 5, 131), (2, 5), False, True, id="131px-d2-d5"),
    pytest.param((1, 3, 40, 19), (1, 2, 3, 4), True, False, id="tall-narrow"),
    pytest.param((3, 3, 11, 140), (1, 2, 3, 4), True, True, id="two-threads-mid-image"),
    pytest.param((1, 2, 6, 40), tuple(range(1, 17)), True, True, id="S16"),
]


def test_native_kernels_build_here() -> None:
    """The development and CI machines have a C compiler, so the native kernels must build:
    a skip here would leave them untested."""
    assert native.available(), native.unavailable_reason()


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Torch (and so the native kernels' row split) on two threads for the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), NATIVE_CASES)
def test_native_matches_reference(
    shape, dilations, has_modulation, has_bias, dtype, atol, rtol
) -> None:
    """The custom op on the native kernels, forward and every gradient, on two threads."""
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, dtype)
    with kernel_backend("native"):
        _check_against_reference(inverse_operator, inputs, dilations, atol, rtol)


@pytest.mark.usefixtures("two_threads")
def test_native_portable_build_matches_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built without -march (8-float vectors, the masked loads done lane by lane, no streaming
    stores): what a machine without AVX-512 runs, and what every other test here never
    builds."""
    monkeypatch.setattr(native, "FLAG_SETS", (native._BASE_FLAGS,))
    monkeypatch.setenv("OPIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_reason", None)
    assert native.available(), native.unavailable_reason()
    for shape, dilations in (((2, 3, 17, 45), (1, 2, 3, 4)), ((1, 5, 33, 7), (2, 5))):
        inputs = _make_inputs(shape, len(dilations))
        with kernel_backend("native"):
            _check_against_reference(inverse_operator, inputs, dilations, 1e-5, 1e-5)
    assert len(list(tmp_path.rglob("*.so"))) == 1  # built here, not the -march=native library


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_native_kernels_work_in_a_child_forked_while_the_lock_was_held() -> None:
    """A process forked while the native module's lock is held (another thread building, say)
    gets a fresh lock: its first call does not hang."""
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    inputs = _make_inputs((1, 3, 20, 24), 4)
    expected = inverse_operator_reference(*inputs.values())[0]
    with native._lock:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the op runs and is right, never return
            ok = False
            try:
                torch.set_num_threads(1)  # torch's OpenMP pool does not survive a fork
                with kernel_backend("native"):
                    got = inverse_operator(*inputs.values())[0]
                ok = bool((got - expected).abs().max() < 1e-5)
            finally:
                os._exit(0 if ok else 1)
    for _ in range(300):  # up to 30 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the native module's lock")
    assert os.waitstatus_to_exitcode(status) == 0


def test_native_threads_give_the_same_bits() -> None:
    """Splitting the rows across threads changes no result: each row is computed alone."""
    dilations = (1, 2, 3, 4)
    inputs = _make_inputs((3, 3, 23, 70), len(dilations))
    grads = _grad_outputs(inputs)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with kernel_backend("native"):
                results.append(_forward_and_grads(inverse_operator, inputs, dilations, grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        for name in NAMES:
            assert torch.equal(other[2][name], results[0][2][name]), name


def _ops_run(fn: Callable[[], object]) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_auto_backend_picks_native_on_cpu_and_reference_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auto: native for CPU fp32 run eagerly; the reference while torch.compile traces (inductor
    fuses it into the graph); fp64 and more than 16 scales go to the reference, and asking for
    native there says why it cannot run."""
    small = _make_inputs((1, 3, 6, 7), 4)
    with kernel_backend("auto"):
        ran = _ops_run(lambda: inverse_operator(*small.values()))
    assert "opir::inverse_operator_native" in ran
    with kernel_backend("auto"):
        assert op._implementation(small["image"], DILATIONS_4) == "native"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert op._implementation(small["image"], DILATIONS_4) == "reference"
        with kernel_backend("native"):  # asked for, it runs under compile too (an opaque call)
            assert op._implementation(small["image"], DILATIONS_4) == "native"
    monkeypatch.undo()
    wide = tuple(range(1, 18))
    cases = {
        "fp64": (_make_inputs((1, 3, 6, 7), 4, dtype=torch.float64), (1, 2, 3, 4)),
        "S17": (_make_inputs((1, 3, 6, 7), len(wide)), wide),
    }
    for what, (inputs, dilations) in cases.items():
        args = [inputs[k] for k in NAMES]
        with kernel_backend("auto"):
            ran = _ops_run(lambda a=args, d=dilations: inverse_operator(*a, dilations=d))
        assert "opir::inverse_operator_native" not in ran, what
        got = inverse_operator(*args, dilations=dilations)
        _assert_close(got[0], inverse_operator_reference(*args, dilations)[0], 0, 0, what)
        with kernel_backend("native"), pytest.raises(RuntimeError, match="native CPU kernels"):
            inverse_operator(*args, dilations=dilations)


def test_native_ops_opcheck() -> None:
    """Schema, fake tensors and AOT dispatch of the two opaque ops torch.compile sees."""
    dilations = [1, 3]
    inputs = _make_inputs((1, 3, 5, 6), len(dilations))
    args = [inputs[k] for k in NAMES]
    torch.library.opcheck(torch.ops.opir.inverse_operator_native.default, (*args, dilations))
    no_mod = _make_inputs((1, 3, 5, 6), len(dilations), has_modulation=False)
    torch.library.opcheck(
        torch.ops.opir.inverse_operator_native_backward.default,
        (*_grad_outputs(no_mod), *(no_mod[k] for k in NAMES[:4]), dilations),
    )


_BUILD_PROBE = textwrap.dedent(
    """
    import torch
    from opir_kernels import native
    from opir_kernels.inverse_operator import inverse_operator, kernel_backend
    print(native.available(), native.unavailable_reason())
    torch.manual_seed(0)
    x = torch.rand(1, 3, 5, 6)
    k, l = torch.randn(1, 9, 5, 6), torch.randn(1, 4, 5, 6)
    with kernel_backend("auto"):
        print(float(inverse_operator(x, k, None, l)[0].sum()))
    try:
        with kernel_backend("native"):
            inverse_operator(x, k, None, l)
    except RuntimeError as error:
        print(error)
    """
)


def _probe(cache: Path, compiler: str | None) -> list[str]:
    env = {**os.environ, "OPIR_CACHE_DIR": str(cache)}
    env.pop("CC", None)
    if compiler is not None:
        env["CC"] = compiler
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_native_build_is_cached_and_a_failed_build_falls_back(tmp_path: Path) -> None:
    """A compiler that fails leaves the op on the reference (same result, one line saying why
    native cannot run); a library built once is reused without a compiler."""
    failing = _probe(tmp_path / "cache", "false")
    assert failing[0].startswith("False false failed on inverse_operator_cpu.c")
    assert "the native CPU kernels cannot run: false failed" in failing[2]
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind

    built = _probe(tmp_path / "cache", None)
    assert built[0] == "True None" and len(built) == 2  # native ran, nothing raised
    assert float(built[1]) == pytest.approx(float(failing[1]), rel=1e-5)
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1
    assert _probe(tmp_path / "cache", "false")[0] == "True None"  # loaded, not rebuilt


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------


class _Num:
    """A float that counts each +, -, *, /, exp, abs and sign done with it as one FLOP, in the
    shared `count` (a one-element list); comparisons (the softmax's max) are free."""

    __slots__ = ("count", "value")

    def __init__(self, value: float, count: list[int]) -> None:
        self.value, self.count = float(value), count

    def _new(self, value: float) -> _Num:
        self.count[0] += 1
        return _Num(value, self.count)

    def __add__(self, other: _Num | float) -> _Num:
        return self._new(self.value + float(other))

    def __sub__(self, other: _Num | float) -> _Num:
        return self._new(self.value - float(other))

    def __mul__(self, other: _Num | float) -> _Num:
        return self._new(self.value * float(other))

    def __truediv__(self, other: _Num | float) -> _Num:
        return self._new(self.value / float(other))

    def __float__(self) -> float:
        return self.value

    def exp(self) -> _Num:
        return self._new(math.exp(self.value))

    def abs(self) -> _Num:
        return self._new(abs(self.value))

    def sign(self) -> _Num:
        return self._new(float((self.value > 0) - (self.value < 0)))


def _reduce(values: list[_Num]) -> _Num:
    """A reduction of n values: n - 1 adds (running sums start at zero: one add per term)."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _naive_op(
    inputs: Inputs, grads: tuple[Tensor, Tensor], dilations: Sequence[int]
) -> tuple[dict[str, Tensor], int, int]:
    """The op's definition (kernels/reference.py) and its closed-form gradients, pixel by pixel
    on counting floats, for one image (1, C, H, W). Taps outside the image are computed on
    zeros, as the kernels do. Returns {name: value}, forward FLOPs, backward FLOPs."""
    _, c_n, h, w = inputs["image"].shape
    plane = {k: None if t is None else t[0].tolist() for k, t in inputs.items()}
    g, gu = grads[0][0].tolist(), grads[1][0, 0].tolist()
    count = [0]

    def zero() -> _Num:
        return _Num(0.0, count)

    def at(p: list, y: int, x: int) -> float:
        return p[y][x] if 0 <= y < h and 0 <= x < w else 0.0

    out = {k: [[[0.0] * w for _ in range(h)] for _ in range(n)] for k, n in
           (("restored", c_n), ("uncertainty", 1), ("image", c_n), ("kernel", 9),
            ("modulation", 9), ("fusion_logits", len(dilations)))}  # fmt: skip
    k_mod, alpha = {}, {}
    for y in range(h):
        for x in range(w):
            k = [_Num(plane["kernel"][i][y][x], count) for i in range(9)]
            if plane["modulation"] is not None:  # Eq. 19
                k = [k[i] * plane["modulation"][i][y][x] for i in range(9)]
            logits = [_Num(p[y][x], count) for p in plane["fusion_logits"]]
            top = max(logits, key=float)
            e = [(v - top).exp() for v in logits]
            total = _reduce(e)
            k_mod[y, x], alpha[y, x] = k, [v / total for v in e]  # Eq. 18
            for c in range(c_n):
                acc = zero()
                for s, d in enumerate(dilations):
                    j = zero()
                    for i, (dy, dx) in enumerate(TAPS):
                        j = j + k[i] * at(plane["image"][c], y + d * dy, x + d * dx)  # Eq. 16
                    acc = acc + alpha[y, x][s] * j
                if plane["bias"] is not None:
                    acc = acc + plane["bias"][c][y][x]
                out["restored"][c][y][x] = acc.value
            out["uncertainty"][0][y][x] = (_reduce([t.abs() for t in k]) / 9).value  # Eq. 11
    forward = count[0]

    for y in range(h):  # d K~, d alpha, and through them d K, d m, d logits
        for x in range(w):
            k = [_Num(plane["kernel"][i][y][x], count) for i in range(9)]
            if plane["modulation"] is not None:  # K~ recomputed, as the forward did
                k = [k[i] * plane["modulation"][i][y][x] for i in range(9)]
            grad_k, grad_a = [zero() for _ in range(9)], [zero() for _ in dilations]
            logits = [_Num(p[y][x], count) for p in plane["fusion_logits"]]
            top = max(logits, key=float)
            e = [(v - top).exp() for v in logits]
            total = _reduce(e)
            a = [v / total for v in e]  # alpha recomputed
            for c in range(c_n):
                for s, d in enumerate(dilations):
                    j = zero()
                    for i, (dy, dx) in enumerate(TAPS):
                        v = at(plane["image"][c], y + d * dy, x + d * dx)
                        j = j + k[i] * v
                        grad_k[i] = grad_k[i] + a[s] * g[c][y][x] * v
                    grad_a[s] = grad_a[s] + j * g[c][y][x]
            dot = zero()
            for s in range(len(dilations)):
                dot = dot + a[s] * grad_a[s]
            for s in range(len(dilations)):
                out["fusion_logits"][s][y][x] = (a[s] * (grad_a[s] - dot)).value
            for i in range(9):
                grad = grad_k[i] + k[i].sign() * gu[y][x] / 9
                if plane["modulation"] is None:
                    out["kernel"][i][y][x] = grad.value
                else:
                    out["kernel"][i][y][x] = (grad * plane["modulation"][i][y][x]).value
                    out["modulation"][i][y][x] = (grad * plane["kernel"][i][y][x]).value
    for c in range(c_n):  # the image's gather: q takes alpha_s K~_i g from p = q - d_s delta_i
        for y in range(h):
            for x in range(w):
                acc = zero()
                for s, d in enumerate(dilations):
                    for i, (dy, dx) in enumerate(TAPS):
                        p = (y - d * dy, x - d * dx)
                        a_s = alpha[p][s] if p in alpha else zero()
                        k_i = k_mod[p][i] if p in k_mod else zero()
                        acc = acc + a_s * k_i * at(g[c], *p)
                out["image"][c][y][x] = acc.value
    values = {k: torch.tensor(v, dtype=torch.float64)[None] for k, v in out.items()}
    return values, forward, count[0] - forward


@pytest.mark.parametrize(("has_modulation", "has_bias"), [(True, True), (False, False)])
def test_flop_formulas_count_a_naive_loop(has_modulation: bool, has_bias: bool) -> None:
    """The FLOP formulas against the operations a naive pixel loop performs, on a 3x4 image
    with 3 channels and 4 scales, the loop's results checked against the reference first.
    Conventions (as the formulas'): a running sum pays one add per term (a multiply-add is 2
    FLOPs), a reduction of n values n - 1, a comparison nothing.

    The backward formula leaves out recomputing K~ = K m (9 a pixel when modulated), adding
    UM's term to d K~ (9) and the softmax's one add fewer (it counts 8 S for the recomputed
    softmax and its backward; the loop does 8 S - 1): 8 + 9 m a pixel fewer than the loop."""
    c, h, w, dilations = 3, 3, 4, (1, 2, 3, 4)
    inputs = _make_inputs((1, c, h, w), len(dilations), has_modulation, has_bias, torch.float64)
    grads = _grad_outputs(inputs)
    values, forward, backward = _naive_op(inputs, grads, dilations)
    restored, uncertainty, expected = _forward_and_grads(
        inverse_operator_reference, inputs, dilations, grads
    )
    torch.testing.assert_close(values["restored"], restored)
    torch.testing.assert_close(values["uncertainty"], uncertainty)
    for name in ("image", "kernel", "modulation", "fusion_logits"):
        if name in expected:
            torch.testing.assert_close(values[name], expected[name], msg=name)

    scales = len(dilations)
    assert inverse_operator_flops(1, c, h, w, scales, has_modulation, has_bias) == forward
    left_out = h * w * (8 + 9 * has_modulation)
    assert inverse_operator_backward_flops(1, c, h, w, scales, has_modulation) == (
        backward - left_out
    )


def test_flop_counter_counts_the_op_with_its_formulas() -> None:
    """FlopCounterMode (and so the profiler) counts the op and its backward op through the
    registered formulas."""
    b, c, h, w, s = 1, 3, 2, 2, 4
    inputs = _make_inputs((b, c, h, w), s)
    leaves = [t.requires_grad_() for t in inputs.values()]
    with FlopCounterMode(display=False) as counter:
        restored, uncertainty = inverse_operator(*leaves)
        torch.autograd.grad((restored, uncertainty), leaves, _grad_outputs(inputs))
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.opir.inverse_operator] == inverse_operator_flops(b, c, h, w, s)
    backward = inverse_operator_backward_flops(b, c, h, w, s)
    assert counts[torch.ops.opir.inverse_operator_backward] == backward
    assert counter.get_total_flops() == inverse_operator_flops(b, c, h, w, s) + backward


# ---------------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------------


def _bad(
    name: str, change: Callable[[Tensor], Tensor], dtype: torch.dtype = torch.float32
) -> Inputs:
    """Valid inputs (1, 3, 4, 5), S = 4, in `dtype`, with `change` applied to one of them."""
    inputs = _make_inputs((1, 3, 4, 5), 4, dtype=dtype)
    inputs[name] = change(inputs[name])
    return inputs


BAD_ARGS = [
    pytest.param(_bad("image", lambda t: t[0]), (1, 2, 3, 4), r"image must be \(B, C, H, W\)",
                 id="image-3d"),
    pytest.param(_bad("kernel", lambda t: t[:, :8]), (1, 2, 3, 4), r"kernel must have shape",
                 id="kernel-shape"),
    pytest.param(_bad("modulation", lambda t: t[..., :4]), (1, 2, 3, 4),
                 r"modulation must have shape", id="modulation-shape"),
    pytest.param(_bad("fusion_logits", lambda t: t[..., :3, :]), (1, 2, 3, 4),
                 r"fusion_logits must have shape", id="logits-shape"),
    pytest.param(_bad("bias", lambda t: t[:, :2]), (1, 2, 3, 4), r"bias must have shape",
                 id="bias-shape"),
    pytest.param(_bad("kernel", lambda t: torch.cat([t, t])), (1, 2, 3, 4),
                 r"kernel must have shape \(1, 9, 4, 5\), got \(2, 9, 4, 5\)", id="kernel-batch"),
    pytest.param(_bad("fusion_logits", lambda t: t), (1, 2, 3),
                 r"fusion_logits .*S = 4 logits but 3 dilations", id="S-vs-dilations"),
    pytest.param(_bad("kernel", lambda t: t.double()), (1, 2, 3, 4),
                 r"kernel has dtype torch.float64 but image has torch.float32", id="kernel-dtype"),
    pytest.param(_bad("bias", lambda t: t.half()), (1, 2, 3, 4), r"bias has dtype",
                 id="bias-dtype"),
    pytest.param(_bad("modulation", lambda t: t.to("meta")), (1, 2, 3, 4),
                 r"modulation is on meta but image is on cpu", id="modulation-device"),
    pytest.param(_bad("fusion_logits", lambda t: t), (0, 1, 2, 3),
                 r"dilations must be positive ints", id="dilation-zero"),
    pytest.param(_bad("fusion_logits", lambda t: t), (1, -2, 3, 4),
                 r"dilations must be positive ints", id="dilation-negative"),
    pytest.param(_bad("fusion_logits", lambda t: t), (1, 2.0, 3, 4),
                 r"dilations must be positive ints", id="dilation-float"),
    pytest.param(_bad("fusion_logits", lambda t: t), (1, True, 3, 4),
                 r"dilations must be positive ints", id="dilation-bool"),
    pytest.param(_bad("fusion_logits", lambda t: t[:, :0]), (),
                 r"dilations must hold at least one scale", id="no-dilations"),
    pytest.param(_bad("bias", lambda t: t, dtype=torch.int32), (1, 2, 3, 4),
                 r"image must be a floating-point tensor", id="int-image"),
]  # fmt: skip


@pytest.mark.parametrize(("inputs", "dilations", "message"), BAD_ARGS)
def test_inverse_operator_rejects_bad_arguments(inputs: Inputs, dilations, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        inverse_operator(*(inputs[k] for k in NAMES), dilations=dilations)


def test_kernel_backend_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="kernel backend must be one of"), kernel_backend("cuda"):
        pass


def test_triton_dispatch_limits() -> None:
    """The Triton kernels take up to 8 scales of dilation up to 127 (packed 8 bits a scale):
    forced beyond that, a ValueError names the limit; auto sends such a call elsewhere."""
    assert triton_supports((1, 2, 3, 4)) and triton_supports((127,) * 8)
    assert not triton_supports(tuple(range(1, 10))) and not triton_supports((128,))
    inputs = _make_inputs((1, 3, 5, 6), 9)
    with kernel_backend("triton"), pytest.raises(ValueError, match="at most 8 scales"):
        inverse_operator(*inputs.values(), dilations=tuple(range(1, 10)))
    with kernel_backend("auto"):  # CPU: native or reference, never Triton
        assert op._implementation(inputs["image"], tuple(range(1, 10))) in ("native", "reference")


def test_kernel_backend_is_per_thread() -> None:
    """A backend chosen in one thread is not seen by another, which keeps its own (the default
    from OPIR_KERNEL) while the first thread's block runs."""
    entered, checked = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def other() -> None:
        entered.wait(10)
        seen["other, while main chose reference"] = op.current_backend()
        with kernel_backend("triton"):
            seen["other, in its own block"] = op.current_backend()
        checked.set()

    default = op.current_backend()
    thread = threading.Thread(target=other)
    thread.start()
    with kernel_backend("reference"):
        entered.set()
        assert checked.wait(10)
        seen["main, in its block"] = op.current_backend()
    thread.join(10)
    assert seen == {
        "other, while main chose reference": default,
        "other, in its own block": "triton",
        "main, in its block": "reference",
    }
    assert op.current_backend() == default


def test_backward_runs_the_backend_its_forward_chose() -> None:
    """Autograd may run the backward in another thread: it takes the forward's backend, not
    the one in force where (or when) it runs."""
    inputs = _make_inputs((1, 3, 6, 7), 4)
    leaves = [t.requires_grad_() for t in inputs.values()]
    with kernel_backend("reference"):
        restored, _ = inverse_operator(*leaves)
    with kernel_backend("native"):
        ran = _ops_run(lambda: restored.sum().backward())
    assert "opir::inverse_operator_native_backward" not in ran
    assert "opir::inverse_operator_backward" in ran


def test_auto_says_once_when_the_native_kernels_cannot_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a C compiler auto runs the reference, and says so once per process, naming why;
    OPIR_NATIVE=0 (a choice) is not warned about."""
    inputs = _make_inputs((1, 3, 6, 7), 4)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_reason", "no C compiler found (set CC, or install gcc or clang)")
    monkeypatch.setattr(op, "_native_fallback_said", False)
    with kernel_backend("auto"):
        with pytest.warns(RuntimeWarning, match=r"native CPU kernels are unavailable \(no C comp"):
            got = inverse_operator(*inputs.values())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            inverse_operator(*inputs.values())  # said already
    _assert_close(got[0], inverse_operator_reference(*inputs.values())[0], 0, 0, "restored")

    monkeypatch.setattr(native, "_reason", native.TURNED_OFF)
    monkeypatch.setattr(op, "_native_fallback_said", False)
    with kernel_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse_operator(*inputs.values())


def test_the_op_imports_and_runs_without_triton() -> None:
    """Where triton is not installed the op imports, runs on the CPU (native and reference)
    with nothing said, and asking for Triton says why it cannot."""
    probe = textwrap.dedent(
        """
        import importlib.util, sys
        find = importlib.util.find_spec

        class NoTriton:  # as on a machine where triton is not installed
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoTriton())
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else find(name, *a)
        import torch
        from opir_kernels.inverse_operator import HAS_TRITON, inverse_operator, kernel_backend
        x, k, l = torch.rand(1, 3, 5, 6), torch.randn(1, 9, 5, 6), torch.randn(1, 4, 5, 6)
        with kernel_backend("reference"):
            expected = inverse_operator(x, k, None, l)[0]
        got = inverse_operator(x, k, None, l)[0]
        print(HAS_TRITON, "triton" in sys.modules, bool((got - expected).abs().max() < 1e-5))
        try:
            with kernel_backend("triton"):
                inverse_operator(x, k, None, l)
        except RuntimeError as error:
            print(error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False False True",
        "the Triton kernels need triton, which is not installed",
    ]
    assert done.stderr == ""


def test_autocast_casts_every_operand_to_float32() -> None:
    """Under CPU autocast a bf16 kernel (from an autocast convolution) beside an fp32 image is
    taken, every operand upcast: the result is the op's on the upcast operands, bit for bit,
    and float32. Outside autocast the same mix is refused."""
    inputs = _make_inputs((1, 3, 9, 11), 4)
    mixed = {**inputs, "kernel": inputs["kernel"].bfloat16(), "bias": inputs["bias"].bfloat16()}
    upcast = {k: None if v is None else v.float() for k, v in mixed.items()}
    expected = inverse_operator(*(upcast[k] for k in NAMES), dilations=DILATIONS_4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = inverse_operator(*(mixed[k] for k in NAMES), dilations=DILATIONS_4)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        assert torch.equal(g, e)
    with pytest.raises(ValueError, match=r"kernel has dtype torch\.bfloat16 but image has"):
        inverse_operator(*(mixed[k] for k in NAMES), dilations=DILATIONS_4)
