"""Tests for `opir restore` and `opir models`: a real subprocess and Typer's runner.

Every input folder is built in tmp_path from real photos of the shared data folder, downscaled
and converted with Pillow into each format and mode the command handles. The weights are a tiny
seeded OPIR moved away from its identity init; runs use --no-compile and small tiles.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps
from typer.testing import CliRunner

from opir_engine.cli.app import app
from opir_engine.image_io import read_image, write_image

OPIR_SCRIPT = Path(sys.executable).with_name("opir")
FAST = ["--no-compile", "--tile", "128", "--tile-overlap", "16"]
SIZE = (80, 60)  # (W, H) of most generated inputs

# In-process runs on one torch thread (the subprocesses keep theirs).
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, busy cores

needs_script = pytest.mark.skipif(
    not OPIR_SCRIPT.is_file(), reason=f"`opir` console script not installed at {OPIR_SCRIPT}"
)


# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def clean(shared_data: Path) -> Path:
    """The shared data's folder of clean photos."""
    return shared_data / "clean"


def _photo(path: Path, size: tuple[int, int] = SIZE) -> Image.Image:
    """A real photo as RGB, downscaled to size = (W, H)."""
    with Image.open(path) as im:
        return im.convert("RGB").resize(size, Image.Resampling.BOX)


def _levels16(path: Path, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A real photo downscaled in float: uint16 (H, W, 3) with levels between the 8-bit ones."""
    rgb = read_image(path).rgb
    small = F.interpolate(rgb[None], size=(size[1], size[0]), mode="area")[0]
    return np.round(small.permute(1, 2, 0).numpy() * 65535).astype(np.uint16)


def _as_tensor(levels: np.ndarray) -> torch.Tensor:
    """uint16 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(levels.astype(np.float32) / 65535).permute(2, 0, 1)


def _alpha(size: tuple[int, int] = SIZE) -> Image.Image:
    """An 8-bit alpha mask with a gradient and a fully transparent hole."""
    w, h = size
    ramp = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    ramp[h // 3 : h // 2, w // 3 : w // 2] = 0
    return Image.fromarray(ramp, "L")


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def build_corpus(folder: Path, clean: Path) -> None:
    """One file per format and mode, from different real photos."""
    folder.mkdir(parents=True, exist_ok=True)
    bsds = sorted((clean / "BSDS500_test").glob("*.jpg"))
    urban = sorted((clean / "Urban100_subset").glob("*.png"))
    _photo(urban[0]).save(folder / "rgb.png", icc_profile=_srgb_icc())
    write_image(folder / "rgb16.png", _as_tensor(_levels16(urban[1])), bit_depth=16)
    _photo(bsds[0]).convert("L").save(folder / "gray.png")
    gray16 = _levels16(bsds[1]).mean(axis=2).round().astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    la = _photo(bsds[2]).convert("L")
    Image.merge("LA", (la, _alpha())).save(folder / "gray_alpha.png")
    rgba = _photo(urban[2])
    rgba.putalpha(_alpha())
    rgba.save(folder / "rgba.png")
    _photo(urban[3]).quantize(64).save(folder / "palette.png")
    with Image.open(clean / "EXIF_camera" / "DSCN0010.jpg") as im:  # Nikon, GPS
        exif = im.info["exif"]
        im.convert("RGB").resize(SIZE, Image.Resampling.BOX).save(
            folder / "jpeg_camera.jpg", exif=exif, quality=90
        )
    _photo(bsds[3]).convert("CMYK").save(folder / "jpeg_cmyk.jpg", quality=90)
    with Image.open(clean / "EXIF_orientation" / "landscape_6.jpg") as im:  # stored 450x600
        im.resize((60, 80), Image.Resampling.BOX).save(
            folder / "jpeg_rotated.jpg", exif=im.info["exif"], icc_profile=im.info["icc_profile"]
        )
    _photo(urban[4]).save(folder / "rgb.webp", quality=90)
    _photo(bsds[4]).save(folder / "rgb.tiff")
    write_image(folder / "rgb16.tiff", _as_tensor(_levels16(bsds[5])), bit_depth=16)
    _photo(bsds[6]).save(folder / "rgb.bmp")


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _opir(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OPIR_SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def _invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args])


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR."""
    data = path.read_bytes()
    return data[24], data[25]


def _restored_differs(source: Path, output: Path) -> bool:
    a, b = read_image(source).rgb, read_image(output).rgb
    return a.shape == b.shape and float((a - b).abs().mean()) > 1e-3


# ----------------------------------------------------------------------------------------------
# formats and modes


@needs_script
def test_restore_every_format_and_mode_in_a_subprocess(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    src, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "report.json"
    build_corpus(src, clean)
    before = _hashes(src)
    run = _opir("restore", src, out, "--weights", weights, *FAST, "--report", report)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    names = sorted(before)
    assert sorted(p.name for p in out.iterdir()) == names

    # Summary: counts, latency percentiles, throughput, FLOPs, per-task counts.
    assert f"{len(names)} done, 0 skipped, 0 failed" in run.stdout
    for text in ("p50", "p95", "MP/s", "GFLOPs/image", "GFLOP/s", "clean", "rain", "snow", "haze"):
        assert text in run.stdout

    for name in names:
        assert _restored_differs(src / name, out / name), name
        with Image.open(src / name) as a, Image.open(out / name) as b:
            assert b.format == a.format, name
            assert b.size == ImageOps.exif_transpose(a).size, name
            b.load()  # decodes fully
    modes = {name: Image.open(out / name).mode for name in names}
    assert modes["rgb.png"] == "RGB" and modes["gray.png"] == "L"
    assert modes["gray16.png"].startswith("I;16") and modes["gray_alpha.png"] == "LA"
    assert modes["rgba.png"] == "RGBA" and modes["palette.png"] == "RGB"
    assert modes["jpeg_cmyk.jpg"] == "RGB" and modes["rgb.bmp"] == "RGB"
    assert modes["rgb.webp"] == "RGB" and modes["rgb.tiff"] == "RGB"

    # 16-bit in, 16-bit out, with levels that 8 bits cannot hold.
    assert _png_header(out / "rgb16.png") == (16, 2)
    assert _png_header(out / "gray16.png") == (16, 0)
    with Image.open(out / "rgb16.tiff") as im:
        assert im.tag_v2[258] == (16, 16, 16)
    for name in ("rgb16.png", "gray16.png", "rgb16.tiff"):
        decoded = read_image(out / name)
        levels = np.round(decoded.rgb.numpy() * 65535).astype(np.int64)
        assert decoded.bit_depth == 16 and (levels % 257 != 0).mean() > 0.5, name

    # Alpha copied through unchanged.
    for name in ("rgba.png", "gray_alpha.png"):
        with Image.open(src / name) as a, Image.open(out / name) as b:
            assert np.array_equal(np.array(a.getchannel("A")), np.array(b.getchannel("A")))

    # EXIF (orientation reset, camera tags and GPS kept) and ICC written back.
    with Image.open(src / "jpeg_camera.jpg") as a, Image.open(out / "jpeg_camera.jpg") as b:
        ea, eb = a.getexif(), b.getexif()
        assert (eb[271], eb[272]) == (ea[271], ea[272])  # Make, Model
        assert dict(eb.get_ifd(0x8825)) == dict(ea.get_ifd(0x8825))  # GPS
    with Image.open(src / "jpeg_rotated.jpg") as a, Image.open(out / "jpeg_rotated.jpg") as b:
        assert a.size == (60, 80) and a.getexif()[0x0112] == 6
        assert b.size == (80, 60) and b.getexif().get(0x0112, 1) == 1
        assert b.info["icc_profile"] == a.info["icc_profile"]
    with Image.open(src / "rgb.png") as a, Image.open(out / "rgb.png") as b:
        assert b.info["icc_profile"] == a.info["icc_profile"]

    # The JSON report: one entry per image, and the summary.
    data = json.loads(report.read_text())
    assert {Path(f["input"]).name for f in data["files"]} == set(names)
    for entry in data["files"]:
        assert entry["status"] == "done" and entry["error"] == ""
        assert entry["task"] in ("clean", "rain", "snow", "haze")
        assert 0 < entry["confidence"] <= 1 and entry["ms"] > 0 and entry["flops"] > 0
        with Image.open(entry["output"]) as im:
            assert (entry["width"], entry["height"]) == im.size
    summary = data["summary"]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (len(names), 0, 0)
    assert summary["ms_p50"] <= summary["ms_p95"] and summary["megapixels_per_s"] > 0
    assert summary["gflops_per_image"] > 0 and summary["achieved_gflops_per_s"] > 0
    assert sum(summary["per_task"].values()) == len(names)
    assert _hashes(src) == before

    # Skip-existing is the default: a second run (through Typer's runner) writes nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _invoke("restore", src, out, "--weights", weights, *FAST)
    assert again.exit_code == 0, again.output
    assert f"0 done, {len(names)} skipped, 0 failed" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_recursive_format_suffix_csv_uncertainty_dry_run_and_overwrite(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub" / "deeper").mkdir(parents=True)
    bsds = sorted((clean / "BSDS500_test").glob("*.jpg"))
    _photo(bsds[10]).save(src / "top.jpg")
    _photo(bsds[11]).save(src / "sub" / "a.png")
    _photo(bsds[12]).save(src / "sub" / "deeper" / "b.tiff")
    (src / "notes.txt").write_text("not an image")
    before = _hashes(src)
    expected = [Path("sub/a_r.png"), Path("sub/deeper/b_r.png"), Path("top_r.png")]
    args = ["restore", src, out, "--weights", weights, *FAST, "--recursive", "--format", "png"]
    args += ["--suffix", "_r", "--task", "rain"]

    dry = _invoke(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not out.exists()
    assert len(dry.stdout.splitlines()) == 3 and "(restore)" in dry.stdout

    report = tmp_path / "report.csv"
    result = _invoke(*args, "--save-uncertainty", "--report", report)
    assert result.exit_code == 0, result.output
    outputs = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    maps = [p.with_name(p.stem + ".uncertainty.png") for p in expected]
    assert outputs == sorted(expected + maps)
    for rel in expected:
        with (
            Image.open(out / rel) as im,
            Image.open(out / rel.with_name(rel.stem + ".uncertainty.png")) as um,
        ):
            assert im.format == "PNG" and im.size == SIZE
            assert um.mode == "L" and um.size == SIZE
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "input", "output", "status", "task", "confidence", "width", "height", "ms", "flops",
        "restored_at", "psnr_vs_input", "error",
    ]  # fmt: skip
    assert all(0 < float(r["psnr_vs_input"]) < math.inf for r in rows)  # restored: changed
    assert {r["restored_at"] for r in rows} == {"80x60"}  # under the working side: full size
    assert sorted(Path(r["output"]).relative_to(out) for r in rows) == sorted(expected)
    assert {r["status"] for r in rows} == {"done"} and {r["task"] for r in rows} == {"rain"}
    assert {(r["width"], r["height"]) for r in rows} == {("80", "60")}

    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in expected}
    skipped = _invoke(*args)
    assert skipped.exit_code == 0 and "0 done, 3 skipped" in skipped.stdout
    assert {rel: (out / rel).stat().st_mtime_ns for rel in expected} == mtimes
    redone = _invoke(*args, "--overwrite")
    assert redone.exit_code == 0 and "3 done, 0 skipped" in redone.stdout
    assert all((out / rel).stat().st_mtime_ns != mtimes[rel] for rel in expected)
    assert _hashes(src) == before


# ----------------------------------------------------------------------------------------------
# safety


def test_outputs_that_would_overwrite_inputs_are_refused(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _photo(sorted((clean / "CBSD68").glob("*.png"))[0]).save(src / "a.png")
    _photo(sorted((clean / "CBSD68").glob("*.png"))[1]).save(src / "sub" / "b.png")
    before = _hashes(src)
    cases = {
        "same folder": (["restore", src, src], "would overwrite an input"),
        "same file": (["restore", src / "a.png", src / "a.png"], "would overwrite an input"),
        "file into its folder": (["restore", src / "a.png", src], "would overwrite an input"),
        "inside, recursive": (["restore", src, src / "restored", "-r"], "inside the input folder"),
        "bad task": (["restore", src, tmp_path / "o", "--task", "fog"], "--task must be"),
        "bad quality": (["restore", src, tmp_path / "o", "--quality", "0"], "--quality must"),
        "bad report": (["restore", src, tmp_path / "o", "--report", "r.txt"], "--report must"),
    }
    for name, (args, message) in cases.items():
        result = _invoke(*args, "--weights", weights, *FAST)
        assert result.exit_code == 2, name
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], name
        assert result.stdout == "", name
    assert _hashes(src) == before
    assert not (src / "restored").exists() and not (tmp_path / "o").exists()

    missing = _invoke("restore", src, tmp_path / "o", "--weights", tmp_path / "none.safetensors")
    assert missing.exit_code == 2
    assert "none.safetensors: checkpoint not found" in missing.stderr


@pytest.mark.slow  # five CLI runs: about 20 s
@needs_script
def test_rerun_into_the_input_folder_skips_its_own_outputs(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    """`opir restore DIR DIR --suffix _r` twice: the second run skips instead of refusing,
    while a real input named like an output (no source beside it) is still restored."""
    src = tmp_path / "in"
    src.mkdir()
    bsds = sorted((clean / "BSDS500_test").glob("*.jpg"))
    _photo(bsds[20]).save(src / "a.jpg", quality=90)
    _photo(bsds[21]).save(src / "b.png")
    args = ["restore", src, src, "--suffix", "_r", "--weights", weights, *FAST]
    args += ["--save-uncertainty"]

    first = _opir(*args)
    assert first.returncode == 0, first.stderr
    assert "2 done, 0 skipped, 0 failed" in first.stdout
    made = ["a_r.jpg", "a_r.uncertainty.png", "b_r.png", "b_r.uncertainty.png"]
    assert sorted(p.name for p in src.iterdir()) == sorted(["a.jpg", "b.png", *made])
    before = _hashes(src)

    dry = _opir(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"{src / 'a.jpg'} -> {src / 'a_r.jpg'} (exists, skip)",
        f"{src / 'b.png'} -> {src / 'b_r.png'} (exists, skip)",
    ]
    again = _opir(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr == "" and "0 done, 2 skipped, 0 failed" in again.stdout
    assert _hashes(src) == before  # nothing written, no a_r_r.jpg

    # c_r.png has no c.png: a photo of the user's, restored like any input.
    _photo(bsds[22]).save(src / "c_r.png")
    third = _opir(*args)
    assert third.returncode == 0, third.stderr
    assert "1 done, 2 skipped, 0 failed" in third.stdout
    assert _restored_differs(src / "c_r.png", src / "c_r_r.png")
    assert {k: v for k, v in _hashes(src).items() if k in before} == before

    # Real collisions are still refused: without a suffix every output is its own input.
    refused = _opir("restore", src, src, "--weights", weights, *FAST)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "would overwrite an input" in refused.stderr


@pytest.mark.slow  # nine CLI runs: about 20 s
@needs_script
def test_a_folder_without_images_says_so_and_exits_2(clean: Path, tmp_path: Path) -> None:
    """Images only in subfolders (no -r), an empty folder, a folder of non-images: one line
    each, exit 2, with or without --dry-run; -r then finds the subfolders' images."""
    nested, empty, texts = tmp_path / "nested", tmp_path / "empty", tmp_path / "texts"
    for sub in ("2023", "2024"):
        (nested / sub).mkdir(parents=True)
    _photo(sorted((clean / "CBSD68").glob("*.png"))[9]).save(nested / "2024" / "a.png")
    empty.mkdir()
    texts.mkdir()
    (texts / "notes.txt").write_text("not an image")
    (texts / "sub").mkdir()
    out = tmp_path / "out"
    hint = "no images found; --recursive (-r) also reads its"
    cases = [  # one subprocess each (seconds apiece); --dry-run plans the same way
        (nested, [], f"{nested}: {hint} 2 subfolders"),
        (nested, ["--dry-run"], f"{nested}: {hint} 2 subfolders"),
        (empty, [], f"{empty}: no images found"),
        (texts, ["--dry-run"], f"{texts}: {hint} 1 subfolder"),
    ]
    for folder, extra, line in cases:
        run = _opir("restore", folder, out, "--weights", tmp_path / "w.safetensors", *extra)
        assert run.returncode == 2, (folder, extra, run.stderr)
        assert run.stderr.splitlines() == [f"error: {line}"], (folder, extra)
        assert run.stdout == "", (folder, extra)
    assert not out.exists()

    recursive = _opir("restore", nested, out, "-r", "--dry-run")
    assert recursive.returncode == 0, recursive.stderr
    assert recursive.stdout.splitlines() == [
        f"{nested / '2024/a.png'} -> {out / '2024/a.png'} (restore)"
    ]
    empty_recursive = _opir("restore", empty, out, "-r")
    assert empty_recursive.returncode == 2
    assert empty_recursive.stderr.splitlines() == [f"error: {empty}: no images found"]


@pytest.mark.slow  # CLI runs and a Ray start: about 20 s
@needs_script
def test_a_rerun_with_every_output_present_loads_no_model(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    """The rerun names a checkpoint that does not exist: it succeeds (all skipped) only because
    no model is loaded; with one output missing the same command needs it and fails."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    cbsd = sorted((clean / "CBSD68").glob("*.png"))
    _photo(cbsd[10]).save(src / "a.png")
    _photo(cbsd[11]).save(src / "b.jpg", quality=90)
    first = _opir("restore", src, out, "--weights", weights, *FAST)
    assert first.returncode == 0, first.stderr
    outputs = _hashes(out)
    assert sorted(outputs) == ["a.png", "b.jpg"]

    gone, report = tmp_path / "gone.safetensors", tmp_path / "report.json"
    for backend in ("local", "ray"):  # nor is Ray started
        rerun = _opir("restore", src, out, "--weights", gone, "--backend", backend,
                      "--report", report)  # fmt: skip
        assert rerun.returncode == 0, (backend, rerun.stderr)
        assert rerun.stderr == "" and "0 done, 2 skipped, 0 failed" in rerun.stdout, backend
        files = json.loads(report.read_text())["files"]
        assert [f["status"] for f in files] == ["skipped", "skipped"], backend
    assert _hashes(out) == outputs

    (out / "b.jpg").unlink()
    needed = _opir("restore", src, out, "--weights", gone)
    assert needed.returncode == 2
    assert needed.stderr.startswith(f"error: {gone}: checkpoint not found")
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    replaced = _opir("restore", src, out, "--weights", gone, "--overwrite")
    assert replaced.returncode == 2 and "checkpoint not found" in replaced.stderr


@needs_script
def test_bad_files_in_a_batch_get_one_line_each_and_exit_1(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    """Truncated JPEG and PNG, zero bytes, random bytes, an image over the pixel limit, and a
    folder named like an image, among good files: one `PATH: reason` line per bad file."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    cbsd = sorted((clean / "CBSD68").glob("*.png"))
    _photo(cbsd[2]).save(src / "a_good.png")
    _photo(cbsd[3]).save(src / "b_good.jpg", quality=90)
    jpeg, png = io.BytesIO(), io.BytesIO()
    _photo(cbsd[4], (160, 120)).save(jpeg, "JPEG", quality=90)
    _photo(cbsd[5], (160, 120)).save(png, "PNG")
    (src / "c_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "d_truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (src / "e_empty.png").write_bytes(b"")
    (src / "f_random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (src / "g_folder.png").mkdir()
    _photo(cbsd[6], (300, 200)).save(src / "h_huge.png")  # 60000 pixels, over the limit below
    _photo(cbsd[7]).save(src / "i_good.webp")
    _photo(cbsd[8]).save(src / "j_good.tiff")
    before = _hashes(src)

    run = _opir("restore", src, out, "--weights", weights, *FAST, "--max-pixels", "50000")
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    reasons = {
        "c_truncated.jpg": "truncated file",
        "d_truncated.png": "truncated file",
        "e_empty.png": "empty file",
        "f_random.jpg": "not an image",
        "h_huge.png": "over the limit",
    }
    assert len(lines) == len(reasons), run.stderr
    for name, reason in reasons.items():
        (line,) = [x for x in lines if x.startswith(f"{src / name}: ")]
        assert reason in line
    assert sorted(p.name for p in out.iterdir()) == [
        "a_good.png",
        "b_good.jpg",
        "i_good.webp",
        "j_good.tiff",
    ]
    assert "4 done, 0 skipped, 5 failed" in run.stdout
    assert _hashes(src) == before


@needs_script
@pytest.mark.slow
def test_interrupted_runs_resume_without_partial_or_repeated_outputs(
    weights: Path, clean: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT), then SIGKILL, then a full run: every output complete, none twice."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # 36 small files: a signal sent after the third output must still find work left, even
    # when the process gets through several files before it acts on the signal (seen once a
    # cold first run got through all 12 of an earlier version of this test).
    photos = sorted((clean / "BSDS500_val_extra").glob("*.jpg"))[:12]
    for i in range(36):
        _photo(photos[i % len(photos)], (96, 72)).save(src / f"{i:02d}.png")
    names = sorted(p.name for p in src.iterdir())
    before = _hashes(src)
    args = [str(OPIR_SCRIPT), "restore", str(src), str(out), "--weights", str(weights), *FAST]

    def run_until(count: int, sig: signal.Signals) -> subprocess.CompletedProcess[str]:
        # SIGINT back to its default in the child, as in a terminal: a job started in the
        # background by a non-interactive shell (how CI may run the suite) inherits it ignored,
        # and then Python never turns Ctrl-C into KeyboardInterrupt.
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and sum(p.suffix == ".png" for p in out.iterdir()) >= count:
                proc.send_signal(sig)
                break
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

    first = run_until(3, signal.SIGINT)
    assert first.returncode == 130, first.stderr
    assert "interrupted" in first.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".part")], sorted(out.iterdir())
    done_first = {p.name for p in out.iterdir()}
    assert 3 <= len(done_first) < len(names), (sorted(done_first), first.stderr)

    second = run_until(len(done_first) + 3, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL, (second.returncode, second.stderr)
    existing = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert done_first <= set(existing) and len(existing) < len(names), sorted(existing)
    # What a write cut by SIGKILL leaves: the writer's temporary file for a pending output.
    pending = sorted(set(names) - set(existing))[0]
    (out / f".{pending}.0badc0de.part").write_bytes(b"\x89PNG\r\n")

    report = tmp_path / "report.json"
    final = _opir("restore", src, out, "--weights", weights, *FAST, "--report", report)
    assert final.returncode == 0, final.stderr
    assert sorted(p.name for p in out.iterdir()) == names  # no .part left
    for name in names:
        decoded = read_image(out / name)  # every output decodes fully
        assert decoded.source_size == (96, 72)
    statuses = {
        Path(f["output"]).name: f["status"] for f in json.loads(report.read_text())["files"]
    }
    assert {n for n, s in statuses.items() if s == "skipped"} == set(existing)
    assert {n for n, s in statuses.items() if s == "done"} == set(names) - set(existing)
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in existing.items())
    assert _hashes(src) == before


# ----------------------------------------------------------------------------------------------
# opir models


def test_models_lists_the_shipped_checkpoints() -> None:
    from opir_engine.weights import list_shipped

    result = _invoke("models")
    assert result.exit_code == 0, result.output
    assert "shipped checkpoints" in result.stdout
    for name, _ in list_shipped():  # none shipped yet: an empty table
        assert name in result.stdout
