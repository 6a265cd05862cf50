"""The NAFBlock's LayerNorm (kernels/layer_norm.py): the native kernels against the PyTorch
reference, forward and gradients, on the shapes and layouts the KPN gives them, and which
implementation runs where."""

from __future__ import annotations

import pytest
import torch

from opir_engine.model.nafnet import NAFBlock
from opir_kernels import native
from opir_kernels.inverse_operator import kernel_backend
from opir_kernels.layer_norm import layer_norm_channels, layer_norm_reference
from opir_kernels.nafblock_native import native_supports

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

EPS = 1e-6


def _maps(b: int, c: int, h: int, w: int, residual: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def cl(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=g).to(memory_format=torch.channels_last)
        return t.requires_grad_()

    # An offset and spread per channel, as the KPN's maps have: the mean matters
    x = (cl(b, c, h, w) * 3 + 1.5).detach().requires_grad_()
    return {
        "x": x,
        "weight": torch.randn(c, generator=g).requires_grad_(),
        "bias": torch.randn(c, generator=g).requires_grad_(),
        "y": cl(b, c, h, w) if residual else None,
        "scale": torch.randn(1, c, 1, 1, generator=g).requires_grad_() if residual else None,
    }


def _run(fn, maps: dict, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list]:
    v, n = fn(maps["x"], maps["weight"], maps["bias"], EPS, maps["y"], maps["scale"])
    g = torch.Generator().manual_seed(seed)
    # Gradients reach both outputs (the residual stream goes on past the norm), in plain layout
    loss = (n * torch.randn(n.shape, generator=g)).sum() + (
        v * torch.randn(v.shape, generator=g)
    ).sum()
    inputs = [t for t in maps.values() if t is not None]
    return v, n, list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
@pytest.mark.parametrize(
    "shape",
    [(2, 16, 9, 13), (1, 32, 7, 5), (3, 64, 4, 4), (1, 256, 2, 3), (2, 24, 5, 6), (1, 16, 1, 1)],
    ids=["C16", "C32", "C64", "C256", "C24-scalar", "one-pixel"],
)
def test_native_matches_reference_forward_and_gradients(shape: tuple, residual: bool) -> None:
    maps = _maps(*shape, residual=residual)
    v, n, grads = _run(layer_norm_channels, maps)
    with kernel_backend("reference"):
        v_ref, n_ref, grads_ref = _run(layer_norm_channels, maps)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(n, n_ref, atol=1e-5, rtol=1e-5)
    # The parameter gradients sum over every pixel, in another order
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert n.is_contiguous(memory_format=torch.channels_last)


def test_native_runs_on_channels_last_fp32_and_bf16_only() -> None:
    x = torch.randn(1, 16, 4, 4)
    assert native_supports(x.to(memory_format=torch.channels_last))
    assert native_supports(x.to(torch.bfloat16, memory_format=torch.channels_last))
    assert not native_supports(x)  # plain layout: the reference
    assert not native_supports(x.to(torch.float16, memory_format=torch.channels_last))
    y = torch.randn(1, 16, 4, 4)
    assert not native_supports(x.to(memory_format=torch.channels_last), y)  # y in plain layout


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach()).norm() / want.detach().norm())


# (x, y): bf16 throughout (a block's first norm after a bf16 convolution, both halves of the
# residual), and the residual stream in fp32 beside a bf16 convolution's output
@pytest.mark.parametrize(
    ("x_dtype", "y_dtype"),
    [(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["bf16-norm", "bf16-residual", "fp32-residual-bf16-branch"],
)
# 20 channels: no multiple of any vector length (8 or 16 floats), the scalar path everywhere
@pytest.mark.parametrize("shape", [(2, 16, 9, 13), (1, 64, 4, 5), (2, 20, 5, 6)],
                         ids=["C16", "C64", "C20-scalar"])  # fmt: skip
def test_bf16_maps_match_the_fp32_reference_to_bf16_rounding(
    shape: tuple, x_dtype: torch.dtype, y_dtype: torch.dtype | None
) -> None:
    """bf16 maps in, fp32 arithmetic: every output and gradient is the fp32 reference's on the
    same (bf16) values, rounded once or twice to bf16 (a relative error of about 2^-9); v, the
    fp32 sum x + y scale, is the reference's to fp32 rounding."""
    maps = _maps(*shape, residual=y_dtype is not None)
    maps["x"] = maps["x"].detach().to(x_dtype).requires_grad_()
    if y_dtype is not None:
        maps["y"] = maps["y"].detach().to(y_dtype).requires_grad_()
    v, n, grads = _run(layer_norm_channels, maps)
    # as addcmul gives it: the fp32 scale makes the residual's sum fp32; without one, x's
    v_dtype = x_dtype if y_dtype is None else torch.float32
    assert v.dtype == v_dtype and n.dtype == v_dtype  # no autocast: n as v
    assert n.is_contiguous(memory_format=torch.channels_last)
    wide = {k: None if t is None else t.detach().float().requires_grad_() for k, t in maps.items()}
    v_ref, n_ref, grads_ref = _run(layer_norm_reference, wide)
    assert _relative_error(n, n_ref) < 4e-3
    assert _relative_error(v, v_ref) < (4e-3 if v_dtype == torch.bfloat16 else 1e-7)
    for got, want, given in zip(grads, grads_ref, [t for t in maps.values() if t is not None],
                                strict=True):  # fmt: skip
        assert got.dtype == given.dtype
        assert _relative_error(got, want) < 6e-3


def test_under_bf16_autocast_the_norm_feeds_its_convolution_in_bf16() -> None:
    maps = _maps(1, 16, 5, 6, residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, n = layer_norm_channels(maps["x"], maps["weight"], maps["bias"], EPS, maps["y"],
                                   maps["scale"])  # fmt: skip
    assert v.dtype == torch.float32 and n.dtype == torch.bfloat16
    v_ref, n_ref = layer_norm_reference(maps["x"], maps["weight"], maps["bias"], EPS, maps["y"],
                                        maps["scale"])  # fmt: skip
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-6)
    # the fp32 norm rounded once: within one bf16 step (2^-8 relative) of the reference's
    torch.testing.assert_close(n.float(), n_ref, atol=1e-6, rtol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_where_the_kernels_do_not_run_the_reference_does_bit_for_bit(dtype: torch.dtype) -> None:
    x = torch.randn(2, 16, 5, 7, dtype=dtype)  # plain layout
    y, scale = torch.randn_like(x), torch.randn(1, 16, 1, 1, dtype=dtype)
    w, b = torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype)
    got = layer_norm_channels(x, w, b, EPS, y, scale)
    want = layer_norm_reference(x, w, b, EPS, y, scale)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_without_residual_v_is_the_input_itself() -> None:
    x = torch.randn(1, 16, 3, 3).to(memory_format=torch.channels_last)
    v, _ = layer_norm_channels(x, torch.ones(16), torch.zeros(16), EPS)
    assert v is x


def test_parameter_gradients_do_not_depend_on_the_thread_count() -> None:
    maps = _maps(2, 32, 40, 60, residual=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(layer_norm_channels, maps)
        torch.set_num_threads(2)
        two = _run(layer_norm_channels, maps)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], two[1])  # per pixel: exactly the same
    for a, b in zip(one[2], two[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_custom_op_registration_passes_opcheck() -> None:
    maps = _maps(1, 16, 3, 5, residual=True)
    args = (maps["x"], maps["y"], maps["scale"], maps["weight"], maps["bias"], EPS)
    torch.library.opcheck(torch.ops.opir.layer_norm_native.default, args)
    torch.library.opcheck(
        torch.ops.opir.layer_norm_native.default,
        (maps["x"], None, None, maps["weight"], maps["bias"], EPS),
    )
    half = {k: maps[k].detach().to(torch.bfloat16).requires_grad_() for k in ("x", "y")}
    torch.library.opcheck(
        torch.ops.opir.layer_norm_native.default,
        (half["x"], half["y"], maps["scale"], maps["weight"], maps["bias"], EPS, True),
    )


def _block(channels: int) -> NAFBlock:
    torch.manual_seed(0)
    block = NAFBlock(channels)
    with torch.no_grad():  # as trained: beta and gamma no longer zero
        block.beta.normal_()
        block.gamma.normal_()
    return block.to(memory_format=torch.channels_last)


def test_nafblock_under_bf16_autocast_matches_the_reference_block() -> None:
    # The block as bf16 autocast training runs it: convolutions in bf16, the norm and gate in
    # the native kernels on bf16 maps, against the same block with PyTorch's norm and gate
    block = _block(16)
    x = torch.randn(2, 16, 24, 20).to(memory_format=torch.channels_last).requires_grad_()

    def run() -> tuple[torch.Tensor, tuple]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        return out, torch.autograd.grad(out.float().square().sum(), [x, *block.parameters()])

    out, grads = run()
    with kernel_backend("reference"):
        out_ref, grads_ref = run()
    assert _relative_error(out, out_ref.float()) < 4e-3
    for got, want in zip(grads, grads_ref, strict=True):
        assert _relative_error(got, want.float()) < 3e-2


def test_nafblock_with_the_kernels_matches_the_reference_block() -> None:
    block = _block(16)
    x = torch.randn(2, 16, 24, 20).to(memory_format=torch.channels_last).requires_grad_()
    out = block(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    with kernel_backend("reference"):
        out_ref = block(x)
        grads_ref = torch.autograd.grad(out_ref.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_nafblock_compiles_with_the_reference_inside() -> None:
    # Under torch.compile the reference runs, for inductor to fuse: no graph break at the norm
    block = _block(16)
    x = torch.randn(1, 16, 16, 16).to(memory_format=torch.channels_last)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=2e-5, rtol=1e-5)
