"""On a CUDA GPU: the op's Triton kernels against the CPU reference, torch.compile on CUDA, the
engine and `opir restore` on the GPU, and the engine's retry after a real CUDA out-of-memory.

Run on a machine with an NVIDIA GPU, with Triton compiled rather than interpreted:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py

tests/conftest.py defaults TRITON_INTERPRET to 1 (the CPU tests interpret the kernels), so the
variable must be set to 0 explicitly. Without CUDA, or under TRITON_INTERPRET=1, every test here
is skipped. Only files in the repository are used: samples/*.jpg and the shipped weights.

TF32: cuDNN runs fp32 convolutions in TF32 by default. Tests that compare two fp32 computations
for equality turn it off (`exact_fp32`), so that a tolerance measures the code and not TF32's
10-bit rounding; `test_engine_fp32_on_cuda_matches_cpu` also checks the default (TF32) path.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_inverse_operator import (
    CASES,
    DTYPES,
    NAMES,
    Inputs,
    _assert_matches,
    _forward_and_grads,
    _grad_outputs,
    _make_inputs,
    _upcast,
)

from opir_engine.evaluation.metrics import psnr
from opir_engine.inference.engine import OPIREngine, to_tensor
from opir_engine.model import CLASSES, OPIRLoss
from opir_engine.weights import load_checkpoint
from opir_kernels import op as dispatch
from opir_kernels.inverse_operator import inverse_operator, kernel_backend
from opir_kernels.reference import inverse_operator_reference
from opir_kernels.triton_limits import triton_supports

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="TRITON_INTERPRET=1 interprets Triton instead of compiling it: "
        "run with TRITON_INTERPRET=0",
    ),
]

DEVICE = torch.device("cuda")
BACKEND = "auto"  # what the product uses: Triton for CUDA tensors
REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
WEIGHTS = "opir-small-allinone"

# Beyond CASES: 2 x 77357 pixels, many full tiles per image both ways (4 x 64 pixels
# forward and backward), interior tiles (read without border tests) and partial ones.
LARGE = pytest.param((2, 3, 257, 301), (1, 2, 3, 4), True, True, id="2x3x257x301")


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """cuDNN convolutions in true fp32 (no TF32) for the test."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


# ---------------------------------------------------------------------------------------------
# The op: Triton on CUDA against the PyTorch reference on the CPU.
# ---------------------------------------------------------------------------------------------


def _to_device(inputs: Inputs, layout: str = "contiguous") -> Inputs:
    """`inputs` on DEVICE, contiguous, channels_last, or with H and W strides swapped."""

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(DEVICE)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t

    return {k: None if t is None else move(t) for k, t in inputs.items()}


def _spy(name: str):  # type: ignore[no-untyped-def]
    """A patch of `name` (a launcher the op's body calls) that counts its calls and runs it."""
    return mock.patch.object(dispatch, name, wraps=getattr(dispatch, name))


def _check_on_device(
    inputs: Inputs, dilations: Sequence[int], atol: float, rtol: float, layout: str
) -> None:
    """The op on DEVICE (its Triton launchers, forward and backward, through autograd): outputs
    and every gradient equal the reference run on the CPU in fp64 on the same values."""
    grads = _grad_outputs(inputs)
    device_inputs = _to_device(inputs, layout)
    device_grads = tuple(_to_device({"g": g}, layout)["g"] for g in grads)
    if layout != "contiguous":
        assert not device_inputs["image"].is_contiguous()
    forward = _spy("inverse_operator_forward_triton")
    backward = _spy("inverse_operator_backward_triton")
    with forward as fwd, backward as bwd, kernel_backend(BACKEND):
        restored, uncertainty, got = _forward_and_grads(
            inverse_operator, device_inputs, dilations, device_grads
        )
    # Triton ran both ways (auto sends dilations the kernels cannot take to the reference).
    runs_triton = triton_supports(dilations)
    assert fwd.call_count == bwd.call_count == int(runs_triton)
    ref = _forward_and_grads(
        inverse_operator_reference,
        _upcast(inputs, torch.float64),
        dilations,
        (grads[0].double(), grads[1].double()),
    )
    assert restored.device.type == DEVICE.type
    _assert_matches((restored, uncertainty, got), ref, inputs, atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("shape", "dilations", "has_modulation", "has_bias"), [*CASES, LARGE])
def test_triton_on_cuda_matches_reference(
    shape, dilations, has_modulation, has_bias, dtype, atol, rtol
) -> None:
    """Backend auto on CUDA tensors runs the Triton kernels; forward and every gradient equal
    the CPU reference (fp64) within the CPU suite's tolerances for each dtype."""
    inputs = _make_inputs(shape, len(dilations), has_modulation, has_bias, dtype)
    _check_on_device(inputs, dilations, atol, rtol, "contiguous")


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_triton_on_cuda_takes_non_contiguous_inputs(layout: str) -> None:
    """Every input and both upstream grads in a non-contiguous layout: same results."""
    dilations = (1, 2, 3, 4)
    inputs = _make_inputs((2, 3, 33, 47), len(dilations))
    _check_on_device(inputs, dilations, 1e-5, 1e-5, layout)


# ---------------------------------------------------------------------------------------------
# torch.compile on CUDA: the op, the tiny model, a training step.
# ---------------------------------------------------------------------------------------------


def test_op_compiles_fullgraph_on_cuda() -> None:
    """torch.compile(fullgraph=True) traces through the op (no graph break) with its Triton
    kernels in the graph; loss, outputs and every gradient equal eager."""
    dilations = (1, 2, 3, 4)
    inputs = _to_device(_make_inputs((2, 3, 45, 61), len(dilations)))

    def loss_of(image, kernel, modulation, fusion_logits, bias):  # type: ignore[no-untyped-def]
        restored, uncertainty = inverse_operator(
            image, kernel, modulation, fusion_logits, bias, dilations
        )
        loss = (restored - image).square().mean() + 0.1 * uncertainty.mean()
        return loss, restored, uncertainty

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True)  # raises on any graph break
    results = []
    for fn in (loss_of, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
        with kernel_backend(BACKEND), torch._inductor.config.patch(force_disable_caches=True):
            loss, restored, uncertainty = fn(*leaves)
            loss.backward()
        results.append((loss, restored, uncertainty, *(t.grad for t in leaves)))
    for what, eager, comp in zip(
        ("loss", "restored", "uncertainty", *NAMES), *results, strict=True
    ):
        assert comp.device.type == DEVICE.type, what
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-5, msg=what)


def _tiny(weights: Path) -> torch.nn.Module:
    """The conftest's seeded tiny OPIR (parameters moved off the identity init) on DEVICE."""
    model, _ = load_checkpoint(weights)
    return model.to(DEVICE)


def _batch(size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of two images, task weights rain and haze, targets and class labels, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, *size, generator=gen)
    target = (image + 0.05 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    labels = torch.tensor([CLASSES.index("rain"), CLASSES.index("haze")])
    weights = F.one_hot(labels, len(CLASSES)).float()
    return tuple(t.to(DEVICE) for t in (image, weights, target, labels))


def test_tiny_model_compiles_fullgraph_on_cuda(weights: Path, exact_fp32: None) -> None:
    """The tiny OPIR's forward under torch.compile(fullgraph=True) equals eager: restored,
    both stages, uncertainty and class logits."""
    model = _tiny(weights).eval()
    image, task_weights, _, _ = _batch((64, 96))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode(), kernel_backend(BACKEND):
        eager = model(image, task_weights)
        got = compiled(image, task_weights)
    assert len(got.stages) == 2
    for what, a, e in (
        ("restored", got.restored, eager.restored),
        ("stage 1", got.stages[0], eager.stages[0]),
        ("uncertainty", got.uncertainty, eager.uncertainty),
        ("class logits", got.class_logits, eager.class_logits),
    ):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=what)
    assert float((eager.restored - image).abs().mean()) > 1e-3  # the model does something


def test_compiled_training_step_matches_eager_on_cuda(weights: Path, exact_fp32: None) -> None:
    """A training step as `opir train --compile` takes it (train.py): the tiny model compiled,
    here with fullgraph=True, OPIRLoss eager, backward through the compiled graph. The loss and
    every parameter's gradient equal eager autograd's. (Compiling OPIRLoss into the same graph
    failed on the CPU with torch 2.13: inductor's replication_pad2d_backward stride check.)"""
    eager_model = _tiny(weights).train()
    compiled_model = copy.deepcopy(eager_model)
    image, task_weights, target, labels = _batch((64, 64))
    loss = OPIRLoss()
    torch._dynamo.reset()
    compiled_forward = torch.compile(compiled_model, fullgraph=True)
    with kernel_backend(BACKEND):
        eager_loss, _ = loss(eager_model(image, task_weights), target, labels)
        eager_loss.backward()
        compiled_loss, _ = loss(compiled_forward(image, task_weights), target, labels)
        compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    named = dict(compiled_model.named_parameters())
    checked = 0
    for name, p in eager_model.named_parameters():
        if p.grad is None:
            assert named[name].grad is None, name
            continue
        torch.testing.assert_close(named[name].grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)
        checked += 1
    assert checked > 10


# ---------------------------------------------------------------------------------------------
# The engine on CUDA, with the shipped weights and sample photos.
# ---------------------------------------------------------------------------------------------


def _samples() -> dict[str, tuple[Image.Image, str]]:
    """samples/*.jpg by name, each with the task it is restored with (its weather; rain for the
    clean photo, so that every sample goes through the model)."""
    photos = {}
    for meta in json.loads((SAMPLES / "samples.json").read_text()):
        with Image.open(SAMPLES / meta["file"]) as im:
            photos[meta["file"]] = (im.convert("RGB"), meta["kind"] or "rain")
    return photos


def _restore_samples(engine: OPIREngine) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (restored image (3, H, W) on the CPU, what task="auto" decides for the photo)."""
    out = {}
    for name, (photo, task) in _samples().items():
        result = engine.restore(photo, task=task)
        assert result.image.device.type == "cpu" and result.image.dtype == torch.float32
        assert result.image.shape == (3, photo.height, photo.width)
        out[name] = (result.image, engine.auto_task(result.probabilities))
    return out


@pytest.fixture(scope="module")
def cpu_results() -> dict[str, tuple[torch.Tensor, str]]:
    """The samples restored by the CPU engine (fp32, eager, defaults otherwise)."""
    engine = OPIREngine.from_pretrained(WEIGHTS, device="cpu", precision="fp32", compile=False)
    return _restore_samples(engine)


def _cuda_engine(precision: str = "fp32", compile: bool = False, **options) -> OPIREngine:  # type: ignore[no-untyped-def]
    engine = OPIREngine.from_pretrained(
        WEIGHTS, device=str(DEVICE), precision=precision, compile=compile, **options
    )
    assert engine.device.type == DEVICE.type
    assert next(engine.model.parameters()).device.type == DEVICE.type
    return engine


@pytest.mark.parametrize(
    ("tf32", "max_diff", "min_psnr"),
    [
        # fp32 throughout: only summation order differs from the CPU (native kernels, oneDNN).
        pytest.param(False, 5e-4, 80.0, id="exact-fp32"),
        # cuDNN's default, TF32 convolutions: emulated on the CPU (inputs and weights of every
        # convolution rounded to 10 mantissa bits) the samples differed by at most 1.4e-3,
        # mean 2.7e-4, PSNR >= 68 dB.
        pytest.param(True, 5e-3, 60.0, id="default-tf32"),
    ],
)
def test_engine_fp32_on_cuda_matches_cpu(
    cpu_results, tf32: bool, max_diff: float, min_psnr: float
) -> None:
    """precision fp32 on CUDA restores every sample like the CPU engine (max |diff| on [0, 1]
    under `max_diff`, PSNR against the CPU result over `min_psnr`), and task="auto" makes the
    same decision for each sample."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        results = _restore_samples(_cuda_engine("fp32"))
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    for name, (image, decision) in results.items():
        cpu_image, cpu_decision = cpu_results[name]
        assert decision == cpu_decision, name
        assert float((image - cpu_image).abs().max()) < max_diff, name
        assert psnr(image, cpu_image) > min_psnr, name


@pytest.mark.parametrize(
    ("precision", "min_psnr"),
    # Measured with the CPU engine in fp16 and bf16 against its fp32: 65-67 dB and 48-50 dB.
    [pytest.param("fp16", 50.0, id="fp16"), pytest.param("bf16", 40.0, id="bf16")],
)
def test_engine_half_precision_on_cuda_is_close_to_fp32(
    cpu_results, precision: str, min_psnr: float
) -> None:
    """fp16 and bf16 on CUDA: every sample within `min_psnr` dB of the fp32 CUDA result, and
    the same auto decision as the CPU engine (the closest call, astronaut_snow, is clean 0.54
    against snow 0.46 in every precision measured)."""
    reference = _restore_samples(_cuda_engine("fp32"))
    engine = _cuda_engine(precision)
    assert engine.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for name, (image, decision) in _restore_samples(engine).items():
        assert decision == cpu_results[name][1], name
        assert psnr(image, reference[name][0]) > min_psnr, name


def test_compiled_engine_on_cuda_matches_eager(exact_fp32: None) -> None:
    """compile=True on CUDA (fullgraph, static shapes; the buckets send every sample through
    512x512 tiles, so one graph) restores the samples like eager with the same buckets."""
    torch._dynamo.reset()
    compiled = _cuda_engine("fp32", compile=True)
    eager = _cuda_engine("fp32", compile=False, buckets=True)
    assert compiled.compiled and compiled.buckets
    got, expected = _restore_samples(compiled), _restore_samples(eager)
    for name, (image, decision) in got.items():
        assert decision == expected[name][1], name
        assert float((image - expected[name][0]).abs().max()) < 1e-4, name


def _tiled_options() -> dict[str, int]:
    # chelsea_rain (451x300) in 256-pixel tiles overlapping by 64: 2 x 3 tiles.
    return {"tile": 256, "tile_overlap": 64}


def test_tiling_on_cuda_matches_tiling_on_cpu(exact_fp32: None) -> None:
    """The same tiles blended on CUDA (the model's outputs come back from the GPU, and three
    tiles go through each forward) as on the CPU one by one."""
    photo, task = _samples()["chelsea_rain.jpg"]
    on_cpu = OPIREngine.from_pretrained(
        WEIGHTS, device="cpu", precision="fp32", compile=False, **_tiled_options()
    ).restore(photo, task=task)
    on_cuda = _cuda_engine(tiles_per_batch=3, **_tiled_options()).restore(photo, task=task)
    assert on_cuda.flops == on_cpu.flops  # the same tiles were processed
    assert float((on_cuda.image - on_cpu.image).abs().max()) < 5e-4


def test_tiled_is_close_to_untiled_on_cuda(exact_fp32: None) -> None:
    """Tiled (256, overlap 64) against one 512x512 pass on CUDA. The small model is not local
    (four U-Net levels, and channel attention averages over the whole input), so tiling cannot
    be exact: measured on the CPU, max |diff| 0.25 at a few pixels, mean 4.2e-3, PSNR 42.5 dB.
    Asserted: PSNR > 40 dB and mean < 6e-3."""
    photo, task = _samples()["chelsea_rain.jpg"]
    untiled = _cuda_engine().restore(photo, task=task)
    tiled = _cuda_engine(**_tiled_options()).restore(photo, task=task)
    assert tiled.flops > untiled.flops  # the overlaps are computed twice
    assert psnr(tiled.image, untiled.image) > 40.0
    assert float((tiled.image - untiled.image).abs().mean()) < 6e-3


# ---------------------------------------------------------------------------------------------
# Out of memory on CUDA, for real: the engine halves its tiles.
# ---------------------------------------------------------------------------------------------


def _empty_and_reset() -> int:
    """Release cached blocks, reset the peak; the bytes still reserved (live tensors)."""
    torch.cuda.synchronize(DEVICE)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    return torch.cuda.memory_reserved(DEVICE)


def test_real_cuda_out_of_memory_retries_with_half_tiles(exact_fp32: None) -> None:
    """The process's CUDA memory is capped between what 512-pixel tiles and one 1024-pixel pass
    need (both measured first, uncapped): the engine asked for 1024 runs out of memory, retries
    at 512 and returns what an engine tiling at 512 from the start returns."""
    rocket, _ = _samples()["rocket_haze.jpg"]
    photo = F.interpolate(to_tensor(rocket)[None], size=(1024, 1024), mode="bilinear")[0]
    options = {"tile_overlap": 32, "work_side": None}
    small, large = _cuda_engine(tile=512, **options), _cuda_engine(tile=1024, **options)

    base = _empty_and_reset()
    direct = small.restore(photo, task="haze")
    small_peak = torch.cuda.max_memory_reserved(DEVICE) - base
    _empty_and_reset()
    large.restore(photo, task="haze")
    large_peak = torch.cuda.max_memory_reserved(DEVICE) - base
    if large_peak < 3 * small_peak:
        pytest.skip(f"a 1024 pass reserves {large_peak} B, 512 tiles {small_peak} B: no room")
    limit = base + math.sqrt(small_peak * large_peak)

    attempts: list[int] = []
    process = large._process

    def spy(rgb, weights, tile):  # type: ignore[no-untyped-def]
        attempts.append(tile)
        return process(rgb, weights, tile)

    large._process = spy  # type: ignore[method-assign]
    _empty_and_reset()
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    torch.cuda.set_per_process_memory_fraction(limit / total, torch.cuda.current_device())
    try:
        result = large.restore(photo, task="haze")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()
    assert attempts == [1024, 512], (attempts, small_peak, large_peak, limit)
    assert result.image.shape == (3, 1024, 1024)
    assert float((result.image - direct.image).abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------
# `opir restore --device cuda` in a subprocess.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="default"),  # compiles: the CLI's default on CUDA
        pytest.param(["--precision", "fp16", "--no-compile"], id="fp16"),
    ],
)
def test_restore_cli_on_cuda(cpu_results, tmp_path: Path, extra: list[str]) -> None:
    """`opir restore samples/ OUT --device cuda` exits 0, writes one output per sample at the
    input's size and mode, decides each sample's task as the CPU engine does, and its summary
    says it ran on cuda."""
    out, report = tmp_path / "out", tmp_path / "report.json"
    # What the `opir` console script runs (no console script is needed on PATH).
    command = [sys.executable, "-c", "from opir_engine.cli.app import main; main()", "restore"]
    run = subprocess.run(
        [*command, str(SAMPLES), str(out), "--device", str(DEVICE), "--report", str(report),
         *extra],
        capture_output=True, text=True, timeout=400, cwd=REPO, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"on {DEVICE}" in run.stdout, run.stdout
    assert "4 done, 0 skipped, 0 failed" in run.stdout, run.stdout
    inputs = sorted(p.name for p in SAMPLES.glob("*.jpg"))
    assert sorted(p.name for p in out.iterdir()) == inputs
    for name in inputs:
        with Image.open(SAMPLES / name) as a, Image.open(out / name) as b:
            assert (b.size, b.mode) == (a.size, a.mode), name
    records = {Path(r["input"]).name: r for r in json.loads(report.read_text())["files"]}
    for name in inputs:
        assert records[name]["status"] == "done", records[name]
        assert records[name]["task"] == cpu_results[name][1], name
