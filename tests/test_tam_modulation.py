"""The tabulated TAM modulation against the direct form (opir_kernels.tam_modulation): values and
every gradient, on the shipped model's kernels of a real photo and on a perturbed TAM, edge
shapes (a constant plane, images smaller than the table) and half-precision inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opir_engine.image_io import read_image
from opir_engine.model import TAM
from opir_engine.weights import load_checkpoint
from opir_kernels.tam_modulation import (
    MIN_TABLE_POINTS,
    TABLE_POINTS,
    table_points,
    tam_form,
    tam_modulation,
    tam_modulation_reference,
    tam_modulation_tabulated,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("weight_k", "tap_offset", "embeddings")


@pytest.fixture(scope="module")
def shipped() -> tuple[list[TAM], torch.Tensor]:
    """The shipped model's two TAMs and its stage-1 kernel (1, 9, 96, 128) of a real photo."""
    model, _ = load_checkpoint(ROOT / "weights" / "opir-small-allinone.safetensors")
    photo = read_image(ROOT / "samples" / "chelsea_rain.jpg").rgb[None, :, :96, :128]
    with torch.no_grad():
        kernel = model.kpn(photo, None).kernel
    return list(model.tams), kernel


def _arguments(tam: TAM, kernel: torch.Tensor, task_weights: torch.Tensor) -> tuple:
    task = tam.proj_task(task_weights @ tam.embeddings)
    return kernel, tam.weight_k, task, tam.tap_offset, tam.out.weight, tam.out.bias


def _perturbed(seed: int) -> TAM:
    """A TAM whose output layer is far from its identity init: m varies strongly with k."""
    torch.manual_seed(seed)
    tam = TAM(4, 16, 8)
    with torch.no_grad():
        for p in tam.parameters():
            p.add_(torch.randn_like(p))
    return tam


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("task", [[0, 1, 0, 0], [0, 0, 0, 1], [0.1, 0.5, 0.1, 0.3]])
def test_tabulated_matches_direct_on_the_shipped_model(shipped, stage: int, task: list) -> None:
    tams, kernel = shipped
    args = _arguments(tams[stage], kernel, torch.tensor([task], dtype=torch.float32))
    with torch.no_grad():
        direct = tam_modulation_reference(*args)
        tabulated = tam_modulation_tabulated(*args)
    assert tabulated.shape == direct.shape == kernel.shape
    torch.testing.assert_close(tabulated, direct, atol=5e-7, rtol=0)


def test_tabulated_matches_direct_where_m_bends_strongly() -> None:
    """Kernel values over [-3, 3] through a perturbed TAM (m ranges over several units): the
    interpolation error stays at float32 rounding of m's size."""
    tam = _perturbed(0)
    # every plane spans [-3, 3], its values in no order along the image
    kernel = torch.linspace(-3, 3, 60 * 70)[torch.randperm(60 * 70)].reshape(60, 70)
    kernel = kernel.repeat(2, 9, 1, 1)
    args = _arguments(tam, kernel, torch.softmax(torch.randn(2, 4), dim=1))
    with torch.no_grad():
        direct = tam_modulation_reference(*args)
        tabulated = tam_modulation_tabulated(*args)
    assert direct.abs().max() > 1  # far from the identity init
    torch.testing.assert_close(tabulated, direct, atol=1e-5, rtol=1e-6)
    # the table is what makes it exact: with 9 points (a step of 0.75) linear interpolation
    # misses m's bends by far more
    coarse = tam_modulation_tabulated(*args, points=9).detach()
    assert (coarse - direct).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["shipped", "perturbed"])
def test_gradients_match_direct(shipped, which: str) -> None:
    tam = shipped[0][1] if which == "shipped" else _perturbed(1)
    kernel = shipped[1] if which == "shipped" else torch.randn(1, 9, 70, 80) * 0.8
    grad_out = torch.randn(kernel.shape, generator=torch.Generator().manual_seed(2))
    task_weights = torch.tensor([[0.0, 0.6, 0.1, 0.3]])
    grads = []
    for form in (tam_modulation_reference, tam_modulation_tabulated):
        tam.zero_grad()
        k = kernel.clone().requires_grad_()
        (form(*_arguments(tam, k, task_weights)) * grad_out).sum().backward()
        named = dict(tam.named_parameters())
        grads.append([k.grad] + [named[n].grad.clone() for n in named])
    for direct, tabulated in zip(*grads, strict=True):
        torch.testing.assert_close(tabulated, direct, rtol=1e-4, atol=1e-5 * direct.abs().max())


def test_a_constant_plane_reads_its_one_value() -> None:
    tam = _perturbed(3)
    kernel = torch.full((1, 9, 80, 80), 0.25)
    kernel[:, 4] = torch.linspace(-1, 1, 6400).reshape(80, 80)  # one tap varies, eight do not
    args = _arguments(tam, kernel, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    with torch.no_grad():
        torch.testing.assert_close(
            tam_modulation_tabulated(*args), tam_modulation_reference(*args), atol=1e-5, rtol=0
        )


def test_small_images_take_the_direct_form() -> None:
    """At most MIN_TABLE_POINTS pixels a table costs more than it saves: the result is the
    direct form's, bit for bit; above, a table of a sixteenth of the pixels, 1025 to 4097."""
    tam = _perturbed(4)
    task_weights = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        small = _arguments(tam, torch.randn(1, 9, 25, 41), task_weights)
        assert MIN_TABLE_POINTS >= 25 * 41
        assert torch.equal(tam_modulation(*small), tam_modulation_reference(*small))
        for side, points in [(40, 1025), (128, 1025), (200, 2501), (256, 4097), (300, 4097)]:
            assert table_points(side * side) == points
        large = _arguments(tam, torch.randn(1, 9, 200, 200), task_weights)
        assert torch.equal(tam_modulation(*large), tam_modulation_tabulated(*large, points=2501))
        assert torch.equal(tam(large[0], task_weights), tam_modulation(*large))  # the module
        crop = _arguments(tam, torch.randn(2, 9, 128, 128), task_weights.repeat(2, 1))
        assert torch.equal(tam_modulation(*crop), tam_modulation_tabulated(*crop, points=1025))


def test_the_smallest_table_matches_direct_where_m_bends_strongly() -> None:
    """The training crops' 1025 points, on the strongly bending perturbed TAM: values within
    1e-5 of the direct form, and every gradient as close as the full table's."""
    tam = _perturbed(7)
    kernel = torch.linspace(-3, 3, 128 * 128)[torch.randperm(128 * 128)].reshape(128, 128)
    kernel = kernel.repeat(2, 9, 1, 1).requires_grad_()
    args = _arguments(tam, kernel, torch.softmax(torch.randn(2, 4), dim=1))
    direct = tam_modulation_reference(*args)
    tabulated = tam_modulation_tabulated(*args, points=MIN_TABLE_POINTS)
    assert direct.abs().max() > 1
    torch.testing.assert_close(tabulated, direct, atol=1e-5, rtol=1e-6)
    grad_out = torch.randn(direct.shape, generator=torch.Generator().manual_seed(3))
    inputs = [kernel, *tam.parameters()]
    g_direct = torch.autograd.grad((direct * grad_out).sum(), inputs, retain_graph=True)
    g_table = torch.autograd.grad((tabulated * grad_out).sum(), inputs)
    for a, b in zip(g_table, g_direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_kernels_are_tabulated_in_float32(shipped, dtype: torch.dtype) -> None:
    tams, kernel = shipped
    args = _arguments(tams[0], kernel, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    with torch.no_grad():
        half = tam_modulation_tabulated(kernel.to(dtype), *args[1:])
        direct = tam_modulation_reference(kernel.to(dtype).float(), *args[1:])
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), direct.to(dtype).float(), atol=8e-3, rtol=0)


def test_a_table_needs_two_points() -> None:
    tam = _perturbed(5)
    args = _arguments(tam, torch.randn(1, 9, 8, 8), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 points, got 1"):
        tam_modulation_tabulated(*args, points=1)


def test_the_form_can_be_chosen_per_block() -> None:
    tam = _perturbed(6)
    args = _arguments(tam, torch.randn(1, 9, 80, 80), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    with torch.no_grad():
        with tam_form("direct"):
            assert torch.equal(tam_modulation(*args), tam_modulation_reference(*args))
        with tam_form("tabulated"):
            small = (args[0][..., :8, :8], *args[1:])
            assert torch.equal(
                tam_modulation(*small), tam_modulation_tabulated(*small, points=MIN_TABLE_POINTS)
            )
        with tam_form("tabulated", points=TABLE_POINTS):  # the full table at any size
            assert torch.equal(tam_modulation(*args), tam_modulation_tabulated(*args))
        assert torch.equal(  # auto again: 6400 pixels, a table of 1025 points
            tam_modulation(*args), tam_modulation_tabulated(*args, points=MIN_TABLE_POINTS)
        )
    with (
        pytest.raises(ValueError, match="TAM form must be one of auto, direct, tabulated"),
        tam_form("fast"),
    ):
        pass
    with pytest.raises(ValueError, match="at least 2 points, got 1"), tam_form("tabulated", 1):
        pass
