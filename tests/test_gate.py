"""The NAFBlock's SimpleGate with the channel attention's mean (kernels/gate.py): the native
kernels against the PyTorch reference, forward and gradients, and where each runs."""

from __future__ import annotations

import pytest
import torch

from opir_kernels import native
from opir_kernels.gate import gate_reference, simple_gate
from opir_kernels.inverse_operator import kernel_backend
from opir_kernels.nafblock_native import native_nafblock

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def _u(b: int, c2: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, c2, h, w, generator=g).to(memory_format=torch.channels_last)
    return u.requires_grad_()


def _run(u: torch.Tensor, with_mean: bool, seed: int = 1) -> tuple[list, torch.Tensor]:
    y, mean = simple_gate(u, with_mean)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    if with_mean:  # the channel attention reads the mean, weighted per channel
        loss = loss + (mean * torch.randn(mean.shape, generator=g)).sum() * 50
    outputs = [y] if mean is None else [y, mean]
    return outputs, torch.autograd.grad(loss, u)[0]


@pytest.mark.parametrize("with_mean", [False, True], ids=["gate", "gate+mean"])
@pytest.mark.parametrize(
    "shape",
    [(2, 32, 9, 13), (1, 64, 7, 5), (3, 256, 4, 4), (2, 6, 5, 6), (1, 32, 1, 1), (2, 32, 80, 64)],
    ids=["C16", "C32", "C128", "C3", "one-pixel", "two-threads"],
)
def test_native_matches_reference_forward_and_gradients(shape: tuple, with_mean: bool) -> None:
    u = _u(*shape)
    outputs, grad = _run(u, with_mean)
    with kernel_backend("reference"):
        outputs_ref, grad_ref = _run(u, with_mean)
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outputs[0], outputs_ref[0], atol=0, rtol=0)  # one multiply each
    if with_mean:
        assert outputs[1].shape == (shape[0], shape[1] // 2, 1, 1)
        torch.testing.assert_close(outputs[1], outputs_ref[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 32, 9, 13), (1, 256, 4, 4), (2, 6, 5, 6)],
                         ids=["C16", "C128", "C3-scalar"])  # fmt: skip
def test_bf16_maps_match_the_fp32_reference(shape: tuple) -> None:
    """A bf16 u (a bf16 convolution's output): y is PyTorch's bf16 product bit for bit; the
    mean, summed in fp32, is y's fp32 mean rounded once to bf16 (the reference's dtype); du is
    the fp32 gradient on the same values rounded to bf16."""
    u = _u(*shape).detach().to(torch.bfloat16).requires_grad_()
    (y, mean), grad = _run(u, with_mean=True)
    assert y.dtype == mean.dtype == grad.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, gate_reference(u.detach())[0])
    wide_mean = y.detach().float().mean((2, 3), keepdim=True)
    torch.testing.assert_close(mean.float(), wide_mean, atol=1e-6, rtol=2**-8)
    wide = u.detach().float().requires_grad_()
    (_, _), grad_ref = _run(wide, with_mean=True)  # fp32: the same weights of the loss
    assert float((grad.float() - grad_ref).norm() / grad_ref.norm()) < 4e-3


def test_a_bf16_block_runs_the_kernels_beside_its_bf16_weights() -> None:
    # `opir restore --precision bf16` puts the whole model in bf16: the gate runs natively on
    # its bf16 maps and hands the channel attention a bf16 mean, as the reference does
    from opir_engine.model.nafnet import NAFBlock

    torch.manual_seed(0)
    block = NAFBlock(16).to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():
        block.beta.normal_()
        block.gamma.normal_()
        x = torch.randn(1, 16, 12, 10, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        out = block(x)
        with kernel_backend("reference"):
            want = block(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - want.float()).norm() / want.float().norm()) < 4e-3


def test_the_mean_does_not_depend_on_the_thread_count() -> None:
    u = _u(3, 32, 70, 50)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = simple_gate(u.detach(), with_mean=True)
        torch.set_num_threads(2)
        two = simple_gate(u.detach(), with_mean=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0])
    torch.testing.assert_close(one[1], two[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "layout"),
    [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.contiguous_format),
     (torch.float16, torch.channels_last), (torch.float64, torch.channels_last)],
    ids=["fp32-plain", "bf16-plain", "fp16", "fp64"],
)  # fmt: skip
def test_where_the_kernels_do_not_run_the_reference_does_bit_for_bit(
    dtype: torch.dtype, layout: torch.memory_format
) -> None:
    u = torch.randn(2, 32, 5, 7, dtype=dtype).to(memory_format=layout)
    got, want = simple_gate(u, True), gate_reference(u, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_nafblock_switch_runs_the_reference() -> None:
    u = torch.randn(2, 32, 5, 7).to(memory_format=torch.channels_last)
    with native_nafblock(False):
        got = simple_gate(u, True)
    want = gate_reference(u, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_custom_op_registration_passes_opcheck() -> None:
    u = _u(2, 32, 3, 5)
    torch.library.opcheck(torch.ops.opir.gate_native.default, (u, True))
    torch.library.opcheck(torch.ops.opir.gate_native.default, (u, False))
    half = u.detach().to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.opir.gate_native.default, (half, True))
