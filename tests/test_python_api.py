"""The Python API as the README shows it: `OPIREngine.restore` on a path, a PIL image or an
array, and `RestoreResult.to_pil` / `save`, which write what `opir restore` writes.

Inputs are crops of the project's samples (and of a rotated camera JPEG from the shared data)
written in tmp_path; the weights are conftest's tiny seeded OPIR, except for the README example,
which runs the shipped weights on a sample as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opir_engine.image_io import ImageWriteError, UnreadableImageError, read_image, write_image
from opir_engine.inference.engine import OPIREngine

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
TILES = {"tile": 128, "tile_overlap": 16}  # as the CLI tests run: small tiles, quick
SIZE = (96, 72)  # (W, H) of the generated inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, busy cores


@pytest.fixture(scope="module")
def engine(weights: Path) -> OPIREngine:
    return OPIREngine.from_pretrained(weights, device="cpu", compile=False, **TILES)


def _crop(name: str, size: tuple[int, int] = SIZE) -> Image.Image:
    """A sample photo's top-left region, downscaled (area) to size = (W, H), as RGB."""
    with Image.open(SAMPLES / name) as im:
        w, h = im.size
        return im.convert("RGB").resize(size, Image.Resampling.BOX, box=(0, 0, w // 2, h // 2))


def _alpha(size: tuple[int, int] = SIZE) -> Image.Image:
    """An 8-bit alpha with a gradient and a fully transparent hole."""
    w, h = size
    ramp = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    ramp[h // 3 : h // 2, w // 3 : w // 2] = 0
    return Image.fromarray(ramp, "L")


def _rgba_png(folder: Path) -> Path:
    path = folder / "rgba.png"
    rgba = _crop("chelsea_rain.jpg")
    rgba.putalpha(_alpha())
    rgba.save(path)
    return path


def _rgb16_png(folder: Path) -> Path:
    """A 16-bit RGB PNG whose levels fall between the 8-bit ones (a photo resized in float)."""
    path = folder / "rgb16.png"
    rgb = read_image(SAMPLES / "rocket_haze.jpg").rgb
    small = torch.nn.functional.interpolate(rgb[None], size=SIZE[::-1], mode="area")[0]
    write_image(path, small, bit_depth=16)
    return path


def _levels(path: Path) -> np.ndarray:
    """Every sample of a file as Pillow holds it (for PNGs of up to 8 bits, or gray 16-bit)."""
    with Image.open(path) as im:
        return np.asarray(im)


# ----------------------------------------------------------------------------------------------
# a path in, the file `opir restore` writes out


@pytest.mark.slow  # a subprocess that imports torch: about 15 s on the busy 2-core machine
def test_a_path_saves_the_file_opir_restore_writes(
    engine: OPIREngine, weights: Path, shared_data: Path, tmp_path: Path
) -> None:
    """A camera JPEG stored on its side (EXIF orientation 6) with an ICC profile: the real CLI
    and `restore(path).save(...)` write the same bytes (upright, EXIF and ICC kept, the input's
    JPEG quality reused)."""
    source = tmp_path / "in" / "rotated.jpg"
    source.parent.mkdir()
    with Image.open(shared_data / "clean" / "EXIF_orientation" / "landscape_6.jpg") as im:
        small = im.resize((72, 96), Image.Resampling.BOX)
        small.save(source, exif=im.info["exif"], icc_profile=im.info["icc_profile"], quality=90)
    by_cli = tmp_path / "cli" / "rotated.jpg"
    command = [sys.executable, "-m", "opir_engine", "restore", str(source), str(by_cli),
               "--weights", str(weights), "--device", "cpu", "--no-compile", "--task", "rain",
               "--tile", "128", "--tile-overlap", "16", "--quiet"]  # fmt: skip
    # One thread, as this process runs (`one_thread`): the same sums in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr

    result = engine.restore(source, task="rain")
    written = result.save(tmp_path / "rotated.jpg")
    assert written == tmp_path / "rotated.jpg"
    assert written.read_bytes() == by_cli.read_bytes()
    assert tuple(result.image.shape) == (3, 72, 96)  # upright: stored 72 wide and 96 high
    again = read_image(written)
    assert again.icc_profile is not None and again.exif is not None


def test_a_path_restores_as_its_decoded_pixels_do(engine: OPIREngine, tmp_path: Path) -> None:
    """`restore(path)` and the batch runner's `restore(read_image(path).rgb)` give the same
    image: `result.image` is what it was, a str works as a Path does."""
    path = tmp_path / "photo.png"
    _crop("chelsea_rain.jpg").save(path)
    by_path = engine.restore(str(path), task="rain")
    by_pixels = engine.restore(read_image(path).rgb, task="rain")
    assert torch.equal(by_path.image, by_pixels.image)
    assert by_path.image.dtype == torch.float32 and tuple(by_path.image.shape) == (3, 72, 96)
    assert by_path.source is not None and by_path.source.path == path


# ----------------------------------------------------------------------------------------------
# alpha and bit depth


def test_rgba_png_keeps_its_alpha_exactly(engine: OPIREngine, tmp_path: Path) -> None:
    source = _rgba_png(tmp_path)
    result = engine.restore(source, task="rain")
    out = result.save(tmp_path / "out.png")
    with Image.open(out) as im:
        assert im.mode == "RGBA"
        assert np.array_equal(np.asarray(im)[..., 3], np.asarray(_alpha()))
    pil = result.to_pil()
    assert pil.mode == "RGBA" and np.array_equal(np.asarray(pil), _levels(out))


def test_a_pil_rgba_image_keeps_its_alpha(engine: OPIREngine, tmp_path: Path) -> None:
    """An RGBA image given in memory: the same pixels and alpha as its file gives."""
    source = _rgba_png(tmp_path)
    with Image.open(source) as im:
        result = engine.restore(im, task="rain")
    by_path = engine.restore(source, task="rain")
    assert torch.equal(result.image, by_path.image)
    assert result.alpha is not None and torch.equal(result.alpha, by_path.alpha)
    out = result.save(tmp_path / "out.webp")  # WebP holds alpha (lossless by default)
    with Image.open(out) as im:
        assert im.mode == "RGBA"
        assert np.array_equal(np.asarray(im)[..., 3], np.asarray(_alpha()))


def test_16_bit_png_stays_16_bit_through_save(engine: OPIREngine, tmp_path: Path) -> None:
    source = _rgb16_png(tmp_path)
    result = engine.restore(source, task="haze")
    out = result.save(tmp_path / "out.png")
    with open(out, "rb") as f:
        header = f.read(26)
    assert (header[24], header[25]) == (16, 2)  # IHDR: 16 bits per sample, RGB
    again = read_image(out)
    assert again.bit_depth == 16
    levels = np.round(again.rgb.numpy() * 65535).astype(np.int64)
    inside = levels[(levels > 0) & (levels < 65535)]  # the haze restore clips some to white
    assert (inside % 257 != 0).mean() > 0.99  # not 8-bit levels widened
    assert np.abs(again.rgb.numpy() - result.image.numpy()).max() <= 0.5 / 65535 + 1e-7
    pil = result.to_pil()  # Pillow has no 16-bit colour mode
    assert pil.mode == "RGB"


def test_a_16_bit_gray_pil_image_saves_16_bit_gray(engine: OPIREngine, tmp_path: Path) -> None:
    rgb = read_image(SAMPLES / "coffee_clean.jpg").rgb.mean(0)
    small = torch.nn.functional.interpolate(rgb[None, None], size=SIZE[::-1], mode="area")[0, 0]
    gray16 = Image.fromarray(np.round(small.numpy() * 65535).astype(np.uint16))
    assert gray16.mode == "I;16"
    result = engine.restore(gray16, task="haze")
    out = result.save(tmp_path / "out.png")
    again = read_image(out)
    assert (again.bit_depth, again.channels) == (16, "gray")
    assert result.to_pil().mode == "RGB"


def test_to_pil_is_8_bit_rgb_rounded_from_the_image(engine: OPIREngine) -> None:
    with Image.open(SAMPLES / "chelsea_rain.jpg") as im:
        small = im.resize(SIZE, Image.Resampling.BOX)
    result = engine.restore(small, task="rain")
    pil = result.to_pil()
    assert (pil.mode, pil.size) == ("RGB", SIZE)
    expected = torch.round(result.image * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(pil), expected)


# ----------------------------------------------------------------------------------------------
# errors


def test_a_missing_path_raises_naming_the_file(engine: OPIREngine, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(UnreadableImageError, match=re.escape(f"{missing}: file not found")):
        engine.restore(missing)


def test_save_never_overwrites_the_input(engine: OPIREngine, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    _crop("chelsea_rain.jpg").save(source)
    before = source.read_bytes()
    result = engine.restore(source, task="rain")
    for overwrite in (False, True):
        with pytest.raises(ImageWriteError, match="is the input image"):
            result.save(source, overwrite=overwrite)
        with pytest.raises(ImageWriteError, match="is the input image"):
            result.save(tmp_path / "." / "photo.png", overwrite=overwrite)
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # no temporary file left


def test_save_replaces_another_file_only_when_asked(engine: OPIREngine, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    _crop("chelsea_rain.jpg").save(source)
    result = engine.restore(source, task="rain")
    out = tmp_path / "out.png"
    out.write_bytes(b"earlier")
    with pytest.raises(ImageWriteError, match=re.escape(f"{out}: already exists")):
        result.save(out)
    assert out.read_bytes() == b"earlier"
    result.save(out, overwrite=True)
    assert np.array_equal(_levels(out), np.asarray(result.to_pil()))


# ----------------------------------------------------------------------------------------------
# the README example


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Python API" code, as written there, with the shipped weights, run in a
    folder holding a copy of samples/."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "chelsea_rain.jpg").write_bytes(
        (SAMPLES / "chelsea_rain.jpg").read_bytes()
    )
    monkeypatch.chdir(tmp_path)
    # --- README example: begin
    from opir_engine.inference.engine import OPIREngine

    engine = OPIREngine.from_pretrained("opir-small-allinone", device="cpu", compile=False)
    result = engine.restore("samples/chelsea_rain.jpg")  # a path, a PIL image, an array
    print(result.task, round(result.confidence, 2))  # rain 1.0
    result.save("chelsea_restored.jpg")  # what `opir restore` writes: EXIF, ICC, alpha, 16-bit
    preview = result.to_pil()  # 8-bit PIL image, "RGBA" when the input had alpha
    # --- README example: end
    assert result.task == "rain"
    assert Path("chelsea_restored.jpg").is_file()
    with Image.open("chelsea_restored.jpg") as im, Image.open("samples/chelsea_rain.jpg") as src:
        assert im.size == src.size == preview.size
