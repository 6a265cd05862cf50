"""Tests for opir_engine.inference.engine: loading checkpoints, inputs, padding, tiling, task
choice, compile.

The weights are a tiny OPIR with a fixed seed, its parameters moved away from the identity init
so that outputs differ from inputs; real photos come from the shared data folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opir_engine.image_io import read_image
from opir_engine.inference.engine import EngineError, OPIREngine, RestoreResult, to_tensor
from opir_engine.model import CLASSES, OPIRConfig
from opir_engine.weights import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, busy cores


@pytest.fixture(scope="session")
def engine(weights: Path) -> OPIREngine:
    return OPIREngine.from_pretrained(weights, device="cpu", compile=False)


@pytest.fixture(scope="module")
def abbey(shared_data: Path) -> Path:
    """A 1024x800 SunHays80 photo."""
    return shared_data / "clean" / "SunHays80" / "abbey_sun_asztnlqhlrvirneh.jpg"


@pytest.fixture(scope="module")
def urban(shared_data: Path) -> Path:
    """An Urban100 photo: straight edges and fine texture."""
    return shared_data / "clean" / "Urban100_subset" / "img_047.png"


def _photo(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A real photo resized (area) to size = (H, W): (3, H, W) float in [0, 1]."""
    rgb = read_image(path).rgb
    return F.interpolate(rgb[None], size=size, mode="area")[0]


# ----------------------------------------------------------------------------------------------
# loading


def test_from_pretrained_loads_a_path_with_its_card(engine: OPIREngine) -> None:
    assert engine.name == "test-tiny"
    assert engine.model.config == OPIRConfig.from_name("tiny")
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert not engine.compiled and not engine.buckets
    assert engine.flops_per_pixel > engine.classify_flops_per_pixel > 0


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(CheckpointError, match=r"nowhere\.safetensors: checkpoint not found"):
        OPIREngine.from_pretrained(path, device="cpu", compile=False)


def test_truncated_checkpoint_names_the_file(weights: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    data = weights.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.json").write_bytes(weights.with_suffix(".json").read_bytes())
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: cannot read weights, truncated"):
        OPIREngine.from_pretrained(cut, device="cpu", compile=False)


def test_mismatched_checkpoint_names_the_file(weights: Path, tmp_path: Path) -> None:
    """Tiny weights under a card that says "small": the shapes disagree."""
    other = tmp_path / "other.safetensors"
    other.write_bytes(weights.read_bytes())
    small = OPIRConfig.from_name("small").to_dict()
    (tmp_path / "other.json").write_text(json.dumps({"name": "other", "config": small}))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: .*(shape|do not match)"):
        OPIREngine.from_pretrained(other, device="cpu", compile=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tile": 130}, "tile must be a multiple of 4"),
        ({"tile": 64, "tile_overlap": 32}, "larger than twice the overlap"),
        ({"tiles_per_batch": 0}, "tiles per batch must be at least 1"),
        ({"precision": "fp8"}, "precision must be"),
        ({"device": "nonsense"}, "unknown device"),
    ],
)
def test_bad_engine_options_raise_engine_error(weights: Path, options: dict, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        OPIREngine.from_pretrained(weights, **{"device": "cpu", "compile": False, **options})


# ----------------------------------------------------------------------------------------------
# inputs and results


def test_restore_accepts_pil_numpy_and_tensors_alike(engine: OPIREngine, urban: Path) -> None:
    with Image.open(urban) as im:
        pil = im.convert("RGB").resize((56, 40), Image.Resampling.BOX)
    u8 = np.array(pil)
    inputs = {
        "pil": pil,
        "uint8": u8,
        "uint16": u8.astype(np.uint16) * 257,  # the same levels in 16 bits
        "float tensor": torch.from_numpy(u8).permute(2, 0, 1).float() / 255,
        "uint8 tensor": torch.from_numpy(u8.copy()).permute(2, 0, 1),
    }
    results = {name: engine.restore(x, task="haze") for name, x in inputs.items()}
    reference = results["pil"]
    for name, result in results.items():
        assert torch.equal(result.image, reference.image), name
    assert isinstance(reference, RestoreResult)
    assert reference.image.shape == (3, 40, 56) and reference.image.dtype == torch.float32
    assert float(reference.image.min()) >= 0 and float(reference.image.max()) <= 1
    assert reference.uncertainty is not None and reference.uncertainty.shape == (1, 40, 56)
    assert reference.task == "haze" and reference.confidence == 1.0
    assert set(reference.probabilities) == set(CLASSES)
    assert sum(reference.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(reference.timings) == {"classify", "restore", "total"}
    assert reference.flops > engine.flops_per_pixel * 40 * 56  # padded pixels plus the head
    # A 16-bit gray photo keeps its 16-bit levels (no 8-bit rounding on the way).
    gray16 = (np.asarray(pil.convert("L")).astype(np.uint16) * 257 + 77).astype(np.uint16)
    expected = torch.from_numpy(gray16.astype(np.float32) / 65535).expand(3, -1, -1)
    assert torch.equal(to_tensor(Image.fromarray(gray16)), expected)
    assert torch.equal(to_tensor(gray16), expected)


def test_to_tensor_rejects_other_shapes() -> None:
    with pytest.raises(EngineError, match="expected an"):
        to_tensor(np.zeros((4, 5, 2), dtype=np.uint8))
    with pytest.raises(EngineError, match="expected a"):
        to_tensor(torch.zeros(1, 3, 4, 5))


@pytest.mark.parametrize(("height", "width"), [(33, 47), (1, 5), (47, 33)])
def test_odd_sizes_come_back_at_the_input_size(
    engine: OPIREngine, urban: Path, height: int, width: int
) -> None:
    """Reflect padding to the U-Net's multiple (4 for tiny) and the crop back."""
    x = _photo(urban, (height, width))
    result = engine.restore(x, task="rain")
    assert result.image.shape == (3, height, width)
    assert result.uncertainty is not None and result.uncertainty.shape == (1, height, width)
    assert float((result.image - x).abs().mean()) > 1e-3  # it did restore, not copy


def test_tiled_matches_untiled_on_a_real_photo(weights: Path, abbey: Path) -> None:
    """A SunHays80 photo at 200x256 through 128-pixel tiles (overlap 32) against one pass.

    The tiny model's receptive field (two U-Net levels and two stages, each with dilated
    operator taps, about 50 pixels, plus channel attention that averages over the whole
    input) is larger than the blend margin, so tiling cannot be exact. Measured with these
    weights: max |tiled - untiled| = 6.9e-5, mean 7.8e-6 (Urban100 img_047: 3.9e-5, 4.0e-6).
    Bound asserted: max < 5e-4 (an eighth of an 8-bit level), mean < 5e-5.
    """
    x = _photo(abbey, (200, 256))
    untiled = OPIREngine.from_pretrained(weights, device="cpu", compile=False, tile=512)
    tiled = OPIREngine.from_pretrained(
        weights, device="cpu", compile=False, tile=128, tile_overlap=32
    )
    a = untiled.restore(x, task="snow")
    b = tiled.restore(x, task="snow")
    assert b.flops > a.flops  # the overlaps are computed twice
    difference = (a.image - b.image).abs()
    assert float(difference.max()) < 5e-4
    assert float(difference.mean()) < 5e-5
    assert float((a.image - x).abs().mean()) > 0.01  # both restored, far from the input


# ----------------------------------------------------------------------------------------------
# task choice


class _CountingEngine(OPIREngine):
    """An engine that counts its classifications (the product engine keeps no such state)."""

    classifications = 0

    def _classify_image(self, image: torch.Tensor) -> tuple[dict[str, float], int]:
        type(self).classifications += 1
        return super()._classify_image(image)


def test_auto_decides_once_per_image_and_every_tile_uses_it(weights: Path, abbey: Path) -> None:
    # pooling "global": no shared-means pass (nor its memory probe) among the forwards counted
    engine = _CountingEngine.from_pretrained(
        weights, device="cpu", compile=False, tile=64, tile_overlap=16, pooling="global"
    )
    seen: list[torch.Tensor] = []

    def record_weights(module: torch.nn.Module, args: tuple) -> None:
        seen.append(args[1].clone())  # forward(image, task_weights)

    handle = engine.model.register_forward_pre_hook(record_weights)
    try:
        x = _photo(abbey, (100, 150))
        result = engine.restore(x, task="auto")
    finally:
        handle.remove()
    assert _CountingEngine.classifications == 1
    assert len(seen) == 2 * 3  # 100x150 in 64-pixel tiles overlapping by 16
    expected = torch.tensor([[result.probabilities[c] for c in CLASSES]])
    for w in seen:
        assert torch.allclose(w, expected, atol=1e-6)
    assert result.task in ("rain", "snow", "haze")  # the likeliest weather class
    assert result.confidence == pytest.approx(result.probabilities[result.task])


def test_clean_head_passes_the_image_through_unchanged(weights: Path, urban: Path) -> None:
    engine = OPIREngine.from_pretrained(weights, device="cpu", compile=False)
    with torch.no_grad():
        engine.model.head.fc2.bias.copy_(torch.tensor([20.0, -20.0, -20.0, -20.0]))
    x = _photo(urban, (48, 64))
    result = engine.restore(x, task="auto")
    assert result.task == "clean" and result.confidence > 0.99
    assert torch.equal(result.image, x)
    assert result.uncertainty is None
    # A given task still restores.
    assert not torch.equal(engine.restore(x, task="rain").image, x)


def test_clean_below_the_threshold_is_restored_as_the_likeliest_weather(
    weights: Path, urban: Path
) -> None:
    """Clean is the likeliest class (p ~ 0.6) but under clean_threshold: the photo is restored,
    reported as the likeliest weather (snow here) with that class's probability."""
    engine = OPIREngine.from_pretrained(weights, device="cpu", compile=False)
    with torch.no_grad():
        engine.model.head.fc2.bias.copy_(torch.tensor([20.0, 18.0, 19.0, 17.0]))
    x = _photo(urban, (48, 64))
    result = engine.restore(x, task="auto")
    probs = result.probabilities
    assert max(probs, key=probs.__getitem__) == "clean" and probs["clean"] < 0.9
    assert result.task == "snow" and result.confidence == pytest.approx(probs["snow"])
    assert not torch.equal(result.image, x) and result.uncertainty is not None
    # The same photo passes through once the threshold is under its clean probability.
    engine.model.config = dataclasses.replace(engine.model.config, clean_threshold=0.5)
    again = engine.restore(x, task="auto")
    assert again.task == "clean" and torch.equal(again.image, x)


def test_given_task_uses_its_one_hot_embedding(engine: OPIREngine, urban: Path) -> None:
    """A 128x160 image needs no padding, so the engine's result is the model's own output."""
    x = _photo(urban, (128, 160))
    results = {task: engine.restore(x, task=task) for task in ("rain", "snow", "haze")}
    for task, result in results.items():
        one_hot = F.one_hot(torch.tensor([CLASSES.index(task)]), len(CLASSES)).float()
        with torch.inference_mode():
            out = engine.model(x[None], one_hot)
        assert result.task == task and result.confidence == 1.0
        assert torch.allclose(result.image, out.restored[0].clamp(0, 1), atol=1e-6)
        assert torch.allclose(result.uncertainty, out.uncertainty[0], atol=1e-6)
    assert float((results["rain"].image - results["haze"].image).abs().max()) > 1e-3


def test_bf16_precision_restores_as_fp32_does_on_the_cpu(
    engine: OPIREngine, weights: Path, urban: Path
) -> None:
    """`precision="bf16"` puts the whole model in bfloat16 (the NAFBlock's gate then runs its
    native kernels on bf16 maps beside bf16 weights): a real photo comes back within bf16
    rounding of the fp32 result, in fp32, for a given task and for auto."""
    half = OPIREngine.from_pretrained(weights, device="cpu", precision="bf16", compile=False)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    x = _photo(urban, (128, 160))
    for task in ("rain", "auto"):
        got, want = half.restore(x, task=task), engine.restore(x, task=task)
        assert got.image.dtype == torch.float32 and got.task == want.task
        error = float((got.image - want.image).square().mean())
        assert 10 * math.log10(1 / error) > 40, task  # dB against the fp32 output


# ----------------------------------------------------------------------------------------------
# compile


@pytest.mark.slow
def test_compiled_engine_matches_eager_and_reuses_its_graphs(
    weights: Path, abbey: Path, urban: Path
) -> None:
    """compile=True on CPU (one compile: about a minute on 2 loaded cores).

    Two photos of different sizes (120x168 and 100x150) fall in the same shape bucket (a side
    up to tile / 2 is padded to tile / 2, up to tile to tile), so the second one runs the
    graphs the first compiled. Two wide photos (200x600 and 180x700) are tiled: their tiles
    have one shape, and (being copied out dense) one set of strides whatever the photo's
    width, so the second reuses the first's graph too. Compiled and eager (with the same
    buckets) agree to 1e-4.
    """
    from torch._dynamo.utils import counters

    options = {"device": "cpu", "tile": 256, "tile_overlap": 32}
    compiled = OPIREngine.from_pretrained(weights, compile=True, **options)
    eager = OPIREngine.from_pretrained(weights, compile=False, buckets=True, **options)
    photos = [
        _photo(abbey, (120, 168)),
        _photo(urban, (100, 150)),
        _photo(abbey, (200, 600)),
        _photo(abbey, (180, 700)),
    ]
    results = []
    for i, x in enumerate(photos):
        graphs = counters["stats"]["unique_graphs"]
        results.append(compiled.restore(x, task="rain"))
        if i % 2:  # the second of each pair: nothing recompiled
            assert counters["stats"]["unique_graphs"] == graphs
    for result, x in zip(results, photos, strict=True):
        reference = eager.restore(x, task="rain")
        assert result.image.shape == x.shape
        assert result.task == reference.task
        assert float((result.image - reference.image).abs().max()) < 1e-4
        assert float((result.uncertainty - reference.uncertainty).abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------
# Out of memory on CUDA: smaller tiles instead of failing
# ---------------------------------------------------------------------------------------------


class _SmallGPUEngine(OPIREngine):
    """Raises CUDA's out-of-memory error for tiles over `fits` pixels, as a small GPU would.

    CUDA itself cannot run on this machine: while a tile does not fit, the engine's device reads
    cuda (so the retry path runs, when `on_cuda`); each attempt that fits runs the real
    pipeline on the CPU.
    """

    fits = 256
    on_cuda = True
    error: Callable[[str], Exception] = torch.OutOfMemoryError

    def _process(self, rgb: torch.Tensor, weights: torch.Tensor, tile: int):  # type: ignore[no-untyped-def]
        self.attempts.append(tile)
        if tile > self.fits:
            self.device = torch.device("cuda" if self.on_cuda else "cpu")
            raise self.error(f"CUDA out of memory (a {tile}-pixel tile)")
        self.device = torch.device("cpu")
        return super()._process(rgb, weights, tile)


def _small_gpu(weights: Path, tile: int, on_cuda: bool = True) -> _SmallGPUEngine:
    model = OPIREngine.from_pretrained(weights, device="cpu", compile=False).model
    engine = _SmallGPUEngine(model, {"name": "t"}, torch.device("cpu"), torch.float32, False,
                             tile=tile, tile_overlap=32)  # fmt: skip
    engine.attempts, engine.on_cuda = [], on_cuda
    return engine


def test_cuda_out_of_memory_retries_with_half_tiles(weights: Path) -> None:
    photo = torch.rand(3, 600, 500, generator=torch.Generator().manual_seed(0))
    engine = _small_gpu(weights, tile=1024)
    result = engine.restore(photo, task="rain")
    assert engine.attempts == [1024, 512, 256]
    # the same as an engine that tiles at 256 from the start
    direct = _small_gpu(weights, tile=256).restore(photo, task="rain")
    assert torch.equal(result.image, direct.image)


def test_out_of_memory_below_the_smallest_tile_or_off_cuda_is_raised(weights: Path) -> None:
    photo = torch.rand(3, 300, 300, generator=torch.Generator().manual_seed(1))
    engine = _small_gpu(weights, tile=1024)
    engine.fits = 64  # nothing from 1024 down to the floor (128) fits
    with pytest.raises(torch.OutOfMemoryError):
        engine.restore(photo, task="rain")
    assert engine.attempts == [1024, 512, 256, 128]
    cpu = _small_gpu(weights, tile=1024, on_cuda=False)  # a CPU error is not CUDA's to retry
    with pytest.raises(torch.OutOfMemoryError):
        cpu.restore(photo, task="rain")
    assert cpu.attempts == [1024]


def test_cudnn_out_of_memory_is_retried_and_other_errors_are_not(weights: Path) -> None:
    """cuDNN reports running out of memory as a plain RuntimeError: retried like torch's own;
    any other RuntimeError is raised at once."""
    photo = torch.rand(3, 300, 280, generator=torch.Generator().manual_seed(2))
    engine = _small_gpu(weights, tile=512)
    engine.error = lambda _: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
    result = engine.restore(photo, task="rain")
    assert engine.attempts == [512, 256]
    assert torch.equal(result.image, _small_gpu(weights, tile=256).restore(photo, "rain").image)
    broken = _small_gpu(weights, tile=512)
    broken.error = lambda _: RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        broken.restore(photo, task="rain")
    assert broken.attempts == [512]


def test_padding_to_a_shape_bucket_barely_changes_the_restored_photo(shared_data: Path) -> None:
    """The compiled engine pads a photo up to a shape bucket: this held-out real-rain webcam
    frame (355x681, rain and mist) from 355 to 512 rows, where the stride alone needs 368. The
    model's global means read only the photo (the validity mask), so the shipped weights
    restore it as with the stride's padding, but for the convolutions' reach across the
    border. In 512-px tiles the two agree at 71 dB. In one piece, whose 681 columns the bucket
    pads to 1024, the border cells of the coarse levels carry the padding into those means: the
    weights shipped on 2026-12-07 agree at 37.3 dB there (a shift of about 3 levels, the
    bucketed output 0.5 dB lower against the target; the weights before them 42.8 dB). Before
    the mask they agreed at about 30 dB."""
    shipped = Path(__file__).resolve().parents[1] / "weights" / "opir-small-allinone.safetensors"
    x = read_image(shared_data / "rain" / "GT-RAIN-webcam" / "input" / "s003_r009.png").rgb
    agree = {}
    for tile in (None, 512):
        outs = []
        for buckets in (False, True):
            eng = OPIREngine.from_pretrained(
                shipped, device="cpu", compile=False, buckets=buckets, tile=tile
            )
            side = eng._tile_for(355, 681)  # one piece: a bucket of 1024, of which 512 is half
            assert eng._padded_side(355, side) == (512 if buckets else 368)
            outs.append(eng.restore(x, task="haze").image)
        agree[tile] = -10 * np.log10(float(((outs[0] - outs[1]) ** 2).mean()))
    assert agree[512] > 60 and agree[None] > 36, agree
