"""Tests for opir_engine.image_io on real photos and on files generated from them in tmp_path."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data
from PIL import Image, ImageCms, ImageOps

from opir_engine.image_io import (
    SUPPORTED_FORMATS,
    DecodedImage,
    ImageIOError,
    ImageTooLargeError,
    ImageWriteError,
    UnreadableImageError,
    UnsupportedImageError,
    as_8bit,
    infer_format,
    is_image_path,
    list_images,
    read_image,
    read_rgb8,
    write_image,
    write_image_like,
)

DATA = SHARED_DATA
ORIENTATION_DIR = DATA / "clean" / "EXIF_orientation"
CAMERA_DIR = DATA / "clean" / "EXIF_camera"
PHOTO_PNG = DATA / "clean" / "CBSD68" / "101085.png"
PHOTO_JPG = DATA / "clean" / "BSDS500_test" / "100007.jpg"
GPS_JPG = CAMERA_DIR / "DSCN0010.jpg"  # NIKON, GPS IFD, orientation 1
ROTATED_GPS_JPG = CAMERA_DIR / "canon_hdr_NO.jpg"  # Canon, GPS IFD, orientation 6

pytestmark = needs_shared_data


# ----------------------------------------------------------------------------------------------
# helpers


def _photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An RGB crop of a real photo."""
    with Image.open(PHOTO_PNG) as im:
        return im.convert("RGB").crop((100, 80, 100 + size[0], 80 + size[1]))


def _levels(x: torch.Tensor, depth: int) -> np.ndarray:
    """Float (C, H, W) in [0, 1] -> integer levels (H, W, C)."""
    return np.round(x.numpy().transpose(1, 2, 0).astype(np.float64) * (2**depth - 1)).astype(
        np.int64
    )


def _as_tensor(samples: np.ndarray, depth: int) -> torch.Tensor:
    """Integer levels (H, W, C) -> float (C, H, W)."""
    return torch.from_numpy(samples.astype(np.float32) / (2**depth - 1)).permute(2, 0, 1)


def _photo16(size: tuple[int, int] = (96, 64), channels: int = 3) -> np.ndarray:
    """uint16 (H, W, C) from a real photo, with low bytes so no value is a multiple of 257."""
    base = np.asarray(_photo(size)).astype(np.uint32) * 257
    if channels == 1:
        base = base[..., :1]
    if channels in (2, 4):
        alpha = np.linspace(0, 65535, size[0] * size[1], dtype=np.uint32).reshape(*size[::-1], 1)
        base = np.concatenate([base[..., : channels - 1], alpha], axis=-1)
    low = (np.arange(base.size, dtype=np.uint32).reshape(base.shape) * 37) % 255 + 1
    out = (base + low) % 65536
    out[out % 257 == 0] += 1
    assert not np.any(out % 257 == 0)
    return out.astype(np.uint16)


def _png16_unfiltered(path: Path, samples: np.ndarray) -> None:
    """A 16-bit PNG with filter type 0 (written here, not by image_io) for the read path."""
    h, w, c = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _exif_of(path: Path) -> Image.Exif:
    with Image.open(path) as im:
        return im.getexif()


def _assert_one_line_error(exc: ImageIOError, path: Path, words: str) -> None:
    message = str(exc)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert words in message


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# ----------------------------------------------------------------------------------------------
# paths and formats


def test_is_image_path_and_infer_format_by_extension() -> None:
    for name in ["a.png", "b.JPG", "c.jpeg", "d.WebP", "e.tif", "f.TIFF", "g.bmp"]:
        assert is_image_path(name)
    for name in ["a.gif", "b.png.part", "c", "d.txt", ".png"]:
        assert not is_image_path(name)
    assert infer_format("x/Y.JPEG") == "JPEG"
    assert infer_format("x.tif") == "TIFF"
    assert infer_format("x.webp") == "WEBP"
    assert set(SUPPORTED_FORMATS) == {"PNG", "JPEG", "WEBP", "TIFF", "BMP"}
    with pytest.raises(UnsupportedImageError, match=r"^out\.gif: unsupported extension"):
        infer_format("out.gif")


# ----------------------------------------------------------------------------------------------
# orientation and EXIF


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_decodes_upright(orientation: int) -> None:
    path = ORIENTATION_DIR / f"landscape_{orientation}.jpg"
    upright = read_image(ORIENTATION_DIR / "landscape_1.jpg").rgb
    decoded = read_image(path)

    assert decoded.source_size == (600, 450)
    assert decoded.rgb.shape == upright.shape == (3, 450, 600)
    # Files 2-8 are separate, darker encodings of the scene (about 0.05 mean abs diff), so
    # compare structure: upright they correlate at 0.96 or more, any wrong flip at 0.45 or less.
    assert _correlation(decoded.rgb, upright) > 0.95
    for wrong in (decoded.rgb.flip(2), decoded.rgb.flip(1), decoded.rgb.flip(1, 2)):
        assert _correlation(wrong, upright) < 0.6
    with Image.open(path) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(_levels(decoded.rgb, 8), reference)

    exif = Image.Exif()
    exif.load(decoded.exif)
    assert exif[0x0112] == 1
    with Image.open(path) as im:
        original = im.info["exif"]
    # Only the orientation value changed: every other byte (maker notes too) is kept.
    assert len(decoded.exif) == len(original)
    assert sum(a != b for a, b in zip(decoded.exif, original, strict=True)) <= 1


def test_exif_rewritten_with_orientation_1_keeps_camera_tags(tmp_path: Path) -> None:
    source = read_image(ROTATED_GPS_JPG)
    with Image.open(ROTATED_GPS_JPG) as im:
        stored_size = im.size
        original = im.getexif()
    assert original[0x0112] == 6
    assert source.source_size == stored_size[::-1]

    out = tmp_path / "upright.jpg"
    write_image_like(out, source.rgb, source)
    written = _exif_of(out)
    assert written[0x0112] == 1
    assert written[0x010F] == original[0x010F]  # Make
    assert dict(written.get_ifd(0x8825)) == dict(original.get_ifd(0x8825))  # GPS
    with Image.open(out) as im:
        assert im.size == source.source_size  # a viewer applying orientation 1 sees it upright


@pytest.mark.parametrize(
    ("suffix", "bit_depth"),
    [(".jpg", 8), (".png", 8), (".webp", 8), (".tif", 8), (".png", 16), (".tif", 16)],
)
def test_exif_make_and_gps_survive_round_trip(tmp_path: Path, suffix: str, bit_depth: int) -> None:
    source = read_image(GPS_JPG)
    original = _exif_of(GPS_JPG)
    out = tmp_path / f"out{suffix}"
    write_image(out, source.rgb, bit_depth=bit_depth, exif=source.exif)

    again = read_image(out)
    assert again.exif is not None
    exif = Image.Exif()
    exif.load(again.exif)
    assert exif[0x010F] == original[0x010F] == "NIKON"  # Make
    assert exif[0x0110] == original[0x0110]  # Model
    gps = exif.get_ifd(0x8825)
    assert gps and dict(gps) == dict(original.get_ifd(0x8825))
    sub = exif.get_ifd(0x8769)
    assert sub[0x9003] == original.get_ifd(0x8769)[0x9003]  # DateTimeOriginal


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_every_camera_exif_survives_tiff(tmp_path: Path, bit_depth: int) -> None:
    # TIFF is the format whose EXIF opir writes itself (Pillow's libtiff writer fails on it).
    cameras = sorted(CAMERA_DIR.glob("*.jp*g"))
    assert len(cameras) == 37
    out = tmp_path / "out.tif"
    for path in cameras:
        source = read_image(path)
        if source.exif is None:
            continue
        write_image(out, source.rgb[:, :16, :16], bit_depth=bit_depth, exif=source.exif)
        before, after = Image.Exif(), Image.Exif()
        before.load(source.exif)
        after.load(read_image(out).exif)
        assert after.get(0x010F) == before.get(0x010F), path.name  # Make
        assert after.get(0x0132) == before.get(0x0132), path.name  # DateTime
        assert dict(after.get_ifd(0x8825)) == dict(before.get_ifd(0x8825)), path.name  # GPS
        assert after.get_ifd(0x8769).keys() == before.get_ifd(0x8769).keys(), path.name


def test_bmp_drops_exif_and_icc(tmp_path: Path) -> None:
    source = read_image(ORIENTATION_DIR / "landscape_2.jpg")
    out = tmp_path / "out.bmp"
    write_image_like(out, source.rgb, source)
    again = read_image(out)
    assert again.exif is None and again.icc_profile is None
    np.testing.assert_array_equal(_levels(again.rgb, 8), _levels(source.rgb, 8))


# ----------------------------------------------------------------------------------------------
# ICC profiles


@pytest.mark.parametrize(
    ("suffix", "bit_depth"),
    [(".jpg", 8), (".png", 8), (".webp", 8), (".tif", 8), (".png", 16), (".tif", 16)],
)
def test_icc_profile_survives(tmp_path: Path, suffix: str, bit_depth: int) -> None:
    source = read_image(ORIENTATION_DIR / "landscape_2.jpg")  # a camera file with a real profile
    with Image.open(ORIENTATION_DIR / "landscape_2.jpg") as im:
        assert source.icc_profile == im.info["icc_profile"]
    out = tmp_path / f"real{suffix}"
    write_image(out, source.rgb, bit_depth=bit_depth, icc_profile=source.icc_profile)
    assert read_image(out).icc_profile == source.icc_profile

    srgb = _srgb_profile()
    out = tmp_path / f"made{suffix}"
    write_image(out, source.rgb, bit_depth=bit_depth, icc_profile=srgb)
    assert read_image(out).icc_profile == srgb
    with Image.open(out) as im:
        ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))  # parses as a profile


def test_rgb_profile_is_not_put_on_gray_output(tmp_path: Path) -> None:
    out = tmp_path / "gray.png"
    write_image(
        out, _as_tensor(np.asarray(_photo()), 8), channels="gray", icc_profile=_srgb_profile()
    )
    again = read_image(out)
    assert again.channels == "gray" and again.icc_profile is None


# ----------------------------------------------------------------------------------------------
# pixel round trips


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_8bit_rgb_round_trip_is_exact(tmp_path: Path, suffix: str) -> None:
    samples = np.asarray(_photo())
    out = tmp_path / f"rgb{suffix}"
    write_image(out, _as_tensor(samples, 8))  # WebP with no quality is lossless
    again = read_image(out)
    assert again.bit_depth == 8 and again.channels == "rgb" and again.alpha is None
    np.testing.assert_array_equal(_levels(again.rgb, 8), samples)
    with Image.open(out) as im:  # Pillow reads the same pixels
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), samples)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".webp"])
def test_8bit_rgba_alpha_unchanged(tmp_path: Path, suffix: str) -> None:
    rgb = np.asarray(_photo())
    alpha = np.asarray(_photo().convert("L").rotate(90, expand=False))
    alpha = alpha.copy()
    alpha[:8] = 0  # fully transparent rows keep their colour too (WebP "exact")
    path = tmp_path / f"source{suffix}"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path, **_lossless(suffix))

    decoded = read_image(path)
    assert decoded.mode == "RGBA" and decoded.alpha is not None
    np.testing.assert_array_equal(_levels(decoded.alpha, 8)[..., 0], alpha)
    np.testing.assert_array_equal(_levels(decoded.rgb, 8), rgb)

    out = tmp_path / f"out{suffix}"
    write_image_like(out, decoded.rgb, decoded)
    again = read_image(out)
    np.testing.assert_array_equal(_levels(again.alpha, 8)[..., 0], alpha)
    np.testing.assert_array_equal(_levels(again.rgb, 8), rgb)


def _lossless(suffix: str) -> dict[str, object]:
    return {"lossless": True, "exact": True} if suffix == ".webp" else {}


@pytest.mark.parametrize("suffix", [".jpg", ".bmp"])
def test_alpha_dropped_where_format_has_none(tmp_path: Path, suffix: str) -> None:
    rgb = _as_tensor(np.asarray(_photo()), 8)
    out = tmp_path / f"out{suffix}"
    write_image(out, rgb, alpha=torch.zeros(1, *rgb.shape[1:]))
    again = read_image(out)
    assert again.alpha is None and again.mode == "RGB"


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".jpg"])
def test_gray_decodes_expanded_and_writes_back_gray(tmp_path: Path, suffix: str) -> None:
    gray = _photo().convert("L")
    path = tmp_path / f"gray{suffix}"
    gray.save(path)
    decoded = read_image(path)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert decoded.channels == "gray" and decoded.bit_depth == 8 and decoded.mode == "L"
    np.testing.assert_array_equal(_levels(decoded.rgb, 8), expected)

    out = tmp_path / f"out{suffix}"
    write_image_like(out, decoded.rgb, decoded)
    with Image.open(out) as im:
        assert im.mode == "L"
        if suffix != ".jpg":
            np.testing.assert_array_equal(np.asarray(im), np.asarray(gray))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_gray_alpha_la_round_trip(tmp_path: Path, suffix: str) -> None:
    gray = _photo().convert("L")
    alpha = Image.fromarray(np.asarray(gray)[::-1].copy())
    path = tmp_path / f"la{suffix}"
    Image.merge("LA", (gray, alpha)).save(path)
    decoded = read_image(path)
    assert decoded.channels == "gray" and decoded.mode == "LA"
    np.testing.assert_array_equal(_levels(decoded.rgb, 8)[..., 1], np.asarray(gray))
    np.testing.assert_array_equal(_levels(decoded.alpha, 8)[..., 0], np.asarray(alpha))

    out = tmp_path / f"out{suffix}"
    write_image_like(out, decoded.rgb, decoded)
    with Image.open(out) as im:
        assert im.mode == "LA"
        np.testing.assert_array_equal(np.asarray(im), np.dstack([gray, alpha]))


def test_webp_has_no_gray_and_stores_rgb(tmp_path: Path) -> None:
    gray = _as_tensor(np.asarray(_photo().convert("L"))[..., None], 8).repeat(3, 1, 1)
    out = tmp_path / "gray.webp"
    write_image(out, gray, channels="gray")
    again = read_image(out)
    assert again.channels == "rgb"
    np.testing.assert_array_equal(_levels(again.rgb, 8), _levels(gray, 8))


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_decodes_like_pillow(tmp_path: Path, transparent: bool) -> None:
    palette_image = _photo().quantize(64)
    path = tmp_path / "palette.png"
    palette_image.save(path, **({"transparency": 5} if transparent else {}))
    decoded = read_image(path)
    assert decoded.mode == "P" and decoded.bit_depth == 8 and decoded.channels == "rgb"
    with Image.open(path) as im:
        expected = im.convert("RGBA" if transparent else "RGB")
    np.testing.assert_array_equal(_levels(decoded.rgb, 8), np.asarray(expected)[..., :3])
    if transparent:
        alpha = _levels(decoded.alpha, 8)[..., 0]
        np.testing.assert_array_equal(alpha, np.asarray(expected)[..., 3])
        assert alpha.min() == 0 and alpha.max() == 255
    else:
        assert decoded.alpha is None


def test_cmyk_jpeg_decodes_like_pillow(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    _photo().convert("CMYK").save(path, quality=95)
    decoded = read_image(path)
    assert decoded.mode == "CMYK" and decoded.format == "JPEG" and decoded.channels == "rgb"
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(_levels(decoded.rgb, 8), expected)
    # Sensible colours: close to the photo it was made from.
    assert np.abs(expected.astype(int) - np.asarray(_photo()).astype(int)).mean() < 8
    assert decoded.icc_profile is None


# ----------------------------------------------------------------------------------------------
# 16-bit


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_round_trip_is_exact(tmp_path: Path, suffix: str, channels: int) -> None:
    samples = _photo16(channels=channels)
    color = samples[..., :1] if channels <= 2 else samples[..., :3]
    rgb = _as_tensor(color, 16).expand(3, -1, -1) if channels <= 2 else _as_tensor(color, 16)
    alpha = _as_tensor(samples[..., -1:], 16) if channels in (2, 4) else None
    layout = "gray" if channels <= 2 else "rgb"

    out = tmp_path / f"out{suffix}"
    write_image(out, rgb, alpha=alpha, bit_depth=16, channels=layout)
    again = read_image(out)
    assert again.bit_depth == 16
    np.testing.assert_array_equal(_levels(again.rgb, 16), _levels(rgb, 16))
    if alpha is None:
        assert again.alpha is None
    else:
        np.testing.assert_array_equal(_levels(again.alpha, 16), samples[..., -1:])
    # gray+alpha 16-bit TIFF is stored as RGBA, which Pillow can read back
    assert again.channels == ("rgb" if (channels == 2 and suffix == ".tif") else layout)

    # Pillow's own decoder agrees: all 16 bits for gray ("I;16"), else the high bytes.
    with Image.open(out) as im:
        view = np.asarray(im)
    if channels == 1:
        np.testing.assert_array_equal(view, samples[..., 0])
    elif channels == 2:  # opened as RGBA
        np.testing.assert_array_equal(view[..., [0, 3]], samples >> 8)
    else:
        np.testing.assert_array_equal(view, samples >> 8)


def test_16bit_every_level_round_trips(tmp_path: Path) -> None:
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    gray = _as_tensor(levels, 16).expand(3, -1, -1)
    for suffix in (".png", ".tif"):
        out = tmp_path / f"levels{suffix}"
        write_image(out, gray, bit_depth=16, channels="gray")
        again = read_image(out)
        np.testing.assert_array_equal(_levels(again.rgb, 16)[..., 0], levels[..., 0])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_from_another_encoder(tmp_path: Path, channels: int) -> None:
    samples = _photo16(channels=channels)
    path = tmp_path / "foreign.png"
    _png16_unfiltered(path, samples)
    decoded = read_image(path)
    assert decoded.bit_depth == 16 and decoded.format == "PNG"
    got = _levels(decoded.rgb, 16)
    if channels <= 2:
        assert decoded.channels == "gray"
        np.testing.assert_array_equal(got[..., 0], samples[..., 0])
    else:
        np.testing.assert_array_equal(got, samples[..., :3])
    if channels in (2, 4):
        np.testing.assert_array_equal(_levels(decoded.alpha, 16), samples[..., -1:])


@pytest.mark.parametrize(
    "options",
    [{}, {"compression": "zlib"}, {"byteorder": ">"}, {"compression": "zlib", "predictor": True}],
)
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_tiff_from_tifffile(tmp_path: Path, options: dict, channels: int) -> None:
    tifffile = pytest.importorskip("tifffile")
    samples = _photo16(channels=channels)
    path = tmp_path / "foreign.tif"
    extra = {"extrasamples": [2]} if channels == 4 else {}
    tifffile.imwrite(path, samples, photometric="rgb", **extra, **options)
    decoded = read_image(path)
    assert decoded.bit_depth == 16 and decoded.channels == "rgb"
    np.testing.assert_array_equal(_levels(decoded.rgb, 16), samples[..., :3])
    if channels == 4:
        np.testing.assert_array_equal(_levels(decoded.alpha, 16), samples[..., 3:])


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_tiff_written_is_read_by_tifffile(tmp_path: Path, bit_depth: int) -> None:
    tifffile = pytest.importorskip("tifffile")
    samples = _photo16(channels=4)
    if bit_depth == 8:
        samples = (samples >> 8).astype(np.uint8)
    rgb, alpha = _as_tensor(samples[..., :3], bit_depth), _as_tensor(samples[..., 3:], bit_depth)
    out = tmp_path / "out.tif"
    write_image(out, rgb, alpha=alpha, bit_depth=bit_depth, icc_profile=_srgb_profile())
    np.testing.assert_array_equal(tifffile.imread(out), samples)


def test_planar_16bit_tiff_is_refused_not_misread(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "planar.tif"
    tifffile.imwrite(
        path, _photo16().transpose(2, 0, 1), photometric="rgb", planarconfig="separate"
    )
    with pytest.raises(UnsupportedImageError) as info:
        read_image(path)
    _assert_one_line_error(info.value, path, "16-bit TIFF")


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp"])
def test_16bit_request_falls_back_to_8bit(tmp_path: Path, suffix: str) -> None:
    rgb = _as_tensor(_photo16(), 16)
    out = tmp_path / f"out{suffix}"
    write_image(out, rgb, bit_depth=16)
    again = read_image(out)
    assert again.bit_depth == 8
    if suffix != ".jpg":
        np.testing.assert_array_equal(_levels(again.rgb, 8), _levels(rgb, 8))


def test_orientation_turns_alpha_with_the_colours(tmp_path: Path) -> None:
    rgba = np.dstack([np.asarray(_photo()), np.asarray(_photo().convert("L"))])
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(rgba, "RGBA").save(path, exif=exif)
    decoded = read_image(path)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    assert decoded.source_size == (64, 96)
    np.testing.assert_array_equal(_levels(decoded.rgb, 8), expected[..., :3])
    np.testing.assert_array_equal(_levels(decoded.alpha, 8), expected[..., 3:])


def test_rounding_and_clamping(tmp_path: Path) -> None:
    k = torch.arange(0, 250, dtype=torch.float32)
    row = torch.cat([(k + 0.4) / 255, (k + 0.6) / 255, torch.tensor([-0.5, 1.7])])
    rgb = row.view(1, 1, -1).repeat(3, 2, 1)
    out = tmp_path / "round.png"
    write_image(out, rgb)
    with Image.open(out) as im:
        got = np.asarray(im)[0, :, 0].astype(int)
    expected = np.concatenate([np.arange(250), np.arange(1, 251), [0, 255]])
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------------------------
# bad files


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    cases = []
    missing = tmp_path / "missing.jpg"
    cases.append((missing, "file not found"))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases.append((empty, "empty file (0 bytes)"))
    folder = tmp_path / "x.png"
    folder.mkdir()
    cases.append((folder, "is a directory"))
    for path, words in cases:
        for reader in (read_image, read_rgb8):
            with pytest.raises(UnreadableImageError) as info:
                reader(path)
            _assert_one_line_error(info.value, path, words)


@pytest.mark.parametrize("source", [PHOTO_JPG, PHOTO_PNG, GPS_JPG], ids=["jpeg", "png", "camera"])
def test_truncated_file(tmp_path: Path, source: Path) -> None:
    data = source.read_bytes()
    path = tmp_path / f"cut{source.suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    _assert_one_line_error(info.value, path, "truncated file")


def test_random_bytes_are_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    _assert_one_line_error(info.value, path, "not an image (cannot identify format)")


def test_corrupt_png_data(tmp_path: Path) -> None:
    data = bytearray(PHOTO_PNG.read_bytes())
    start = data.index(b"IDAT") + 200
    data[start : start + 200] = bytes(200)  # zeros inside the compressed stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: ")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    _photo().save(path)
    path.chmod(0)
    try:
        with pytest.raises(UnreadableImageError) as info:
            read_image(path)
        _assert_one_line_error(info.value, path, "permission denied")
    finally:
        path.chmod(0o644)


def test_image_above_max_pixels(tmp_path: Path) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        read_image(PHOTO_PNG, max_pixels=100_000)  # 321 x 481 = 154,401 pixels
    _assert_one_line_error(info.value, PHOTO_PNG, "megapixels")
    assert read_image(PHOTO_PNG, max_pixels=154_401).source_size == (321, 481)
    assert read_image(PHOTO_PNG, max_pixels=None).source_size == (321, 481)


def test_pixel_limit_above_pillows_own(tmp_path: Path) -> None:
    # A 1-bit BMP header can claim a huge size cheaply; Pillow alone would refuse it as a bomb.
    path = tmp_path / "huge.bmp"
    Image.new("1", (20_000, 10_000)).save(path)  # 200 megapixels, 25 MB
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError) as info:
        read_image(path, max_pixels=150_000_000)
    _assert_one_line_error(info.value, path, "200.0 megapixels")
    assert before == Image.MAX_IMAGE_PIXELS  # Pillow's global limit is restored


def test_errors_pickle_for_worker_processes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is UnreadableImageError and str(again) == str(info.value)
    assert again.path == str(path) and again.reason == "empty file (0 bytes)"


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "anim.png"  # content decides, not the extension
    _photo().save(path, format="GIF")
    with pytest.raises(UnsupportedImageError) as info:
        read_image(path)
    _assert_one_line_error(info.value, path, "unsupported format GIF")


# ----------------------------------------------------------------------------------------------
# atomic writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _fail_after_writing(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    real_save = Image.Image.save

    def failing_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        real_save(self, fp, *args, **kwargs)  # the temporary file really gets the bytes
        raise error

    monkeypatch.setattr(Image.Image, "save", failing_save)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    rgb = _as_tensor(np.asarray(_photo()), 8)
    out = tmp_path / "out.jpg"
    _fail_after_writing(monkeypatch, error)
    expected = ImageWriteError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        write_image(out, rgb)
    if expected is ImageWriteError:
        _assert_one_line_error(info.value, out, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = _as_tensor(np.asarray(_photo()), 8)
    out = tmp_path / "out.png"
    write_image(out, rgb)
    before = out.read_bytes()
    _fail_after_writing(monkeypatch, OSError(5, "Input/output error"))
    with pytest.raises(ImageWriteError):
        write_image(out, rgb.flip(2))
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_rename_failure_after_full_16bit_encode(tmp_path: Path) -> None:
    out = tmp_path / "taken.png"
    out.mkdir()  # a folder in the way: the 16-bit file is fully written, then cannot replace it
    with pytest.raises(ImageWriteError) as info:
        write_image(out, _as_tensor(_photo16(), 16), bit_depth=16)
    _assert_one_line_error(info.value, out, "directory")
    assert out.is_dir() and list(out.iterdir()) == []
    assert _leftovers(tmp_path) == []


def test_missing_folder_is_a_write_error(tmp_path: Path) -> None:
    out = tmp_path / "nope" / "out.png"
    with pytest.raises(ImageWriteError) as info:
        write_image(out, torch.zeros(3, 4, 4))
    _assert_one_line_error(info.value, out, "folder does not exist")


def test_written_file_permissions_follow_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out.png"
    write_image(out, torch.zeros(3, 4, 4))
    if os.name == "posix":
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    rgb = torch.zeros(3, 4, 5)
    bad_calls = [
        {"rgb": torch.zeros(4, 4, 5)},
        {"rgb": torch.zeros(1, 3, 4, 5)},
        {"rgb": torch.full((3, 4, 5), float("nan"))},
        {"rgb": torch.zeros(3, 4, 5, dtype=torch.uint8)},
        {"alpha": torch.zeros(1, 5, 4)},
        {"bit_depth": 12},
        {"channels": "bgr"},
        {"quality": 0},
    ]
    for kwargs in bad_calls:
        with pytest.raises(ValueError):
            write_image(out, **{"rgb": rgb, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(UnsupportedImageError):
        write_image(tmp_path / "x.gif", rgb)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# JPEG quality


@pytest.mark.parametrize("quality", [50, 75, 90, 95])
def test_jpeg_quality_estimate(tmp_path: Path, quality: int) -> None:
    path = tmp_path / f"q{quality}.jpg"
    with Image.open(GPS_JPG) as im:
        im.save(path, quality=quality)
    estimate = read_image(path).jpeg_quality
    assert estimate is not None and abs(estimate - quality) <= 2


def test_jpeg_quality_only_for_jpeg_and_reused_when_writing_like(tmp_path: Path) -> None:
    assert read_image(PHOTO_PNG).jpeg_quality is None
    path = tmp_path / "q60.jpg"
    _photo().save(path, quality=60)
    source = read_image(path)
    out = tmp_path / "out.jpg"
    write_image_like(out, source.rgb, source)
    assert read_image(out).jpeg_quality == source.jpeg_quality == 60


def test_decoded_image_fields() -> None:
    decoded = read_image(GPS_JPG)
    assert isinstance(decoded, DecodedImage)
    assert decoded.rgb.dtype == torch.float32 and decoded.rgb.shape == (3, 480, 640)
    assert float(decoded.rgb.min()) >= 0.0 and float(decoded.rgb.max()) <= 1.0
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.bit_depth == 8
    assert decoded.path == GPS_JPG and decoded.source_size == (640, 480)
    assert decoded.exif is not None and decoded.exif.startswith(b"Exif\x00\x00")
    assert "tensor" not in repr(decoded) and "Exif" not in repr(decoded)  # short repr


# ----------------------------------------------------------------------------------------------
# one reader for inference, training and synthesis


def _pillow_rgb8(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """How training and synthesis read photos before `read_rgb8`, with Pillow alone: upright,
    converted to RGB, shrunk with the BOX filter to `size` (W, H); uint8 (3, H, W)."""
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    if size is not None:
        rgb = rgb.resize(size, Image.Resampling.BOX)
    return np.asarray(rgb).transpose(2, 0, 1)


def _rgb8_case(name: str, folder: Path) -> Path:
    """A file of the kind `name` from a real photo: camera JPEGs as they are, the rest made here."""
    if name == "jpeg_orientation_6":
        return ORIENTATION_DIR / "landscape_6.jpg"
    if name == "camera_jpeg_orientation_6":
        return ROTATED_GPS_JPG
    path = folder / f"{name}.png"
    if name.startswith("png16"):
        _png16_unfiltered(path, _photo16(channels={"gray": 1, "rgb": 3, "rgba": 4}[name[6:]]))
    elif name == "gray_jpeg":
        path = path.with_suffix(".jpg")
        _photo().convert("L").save(path, quality=90)
    elif name == "gray_png":
        _photo().convert("L").save(path)
    elif name.startswith("palette"):
        _photo().quantize(64).save(path, **({"transparency": 5} if "transparent" in name else {}))
    elif name == "rgba_png":
        rgba = np.dstack([np.asarray(_photo()), np.arange(64 * 96, dtype=np.uint8).reshape(64, 96)])
        Image.fromarray(rgba, "RGBA").save(path)
    return path


RGB8_CASES = [
    "jpeg_orientation_6",
    "camera_jpeg_orientation_6",
    "png16_gray",
    "png16_rgb",
    "png16_rgba",
    "gray_jpeg",
    "gray_png",
    "palette",
    "palette_transparent",
    "rgba_png",
]


@pytest.mark.parametrize("name", RGB8_CASES)
def test_read_rgb8_gives_pillows_8bit_rgb(tmp_path: Path, name: str) -> None:
    path = _rgb8_case(name, tmp_path)
    rgb = read_rgb8(path)
    assert rgb.dtype == torch.uint8 and rgb.is_contiguous()
    np.testing.assert_array_equal(rgb.numpy(), _pillow_rgb8(path))


@pytest.mark.parametrize(
    ("path", "max_side", "size"),
    [
        # stored 450x600 with orientation 6: upright 600 wide, 450 high
        (ORIENTATION_DIR / "landscape_6.jpg", 100, (100, 75)),
        (ORIENTATION_DIR / "landscape_6.jpg", 599, (599, 449)),  # 449.25 rounds down
        # stored 2048x1536 with orientation 6: upright 1536 wide, 2048 high
        (ROTATED_GPS_JPG, 512, (384, 512)),
        (PHOTO_PNG, 300, (200, 300)),  # 321x481: 321 * 300 / 481 = 200.2
    ],
)
def test_read_rgb8_shrinks_the_long_side_with_the_box_filter(
    path: Path, max_side: int, size: tuple[int, int]
) -> None:
    rgb = read_rgb8(path, max_side)
    assert rgb.shape == (3, size[1], size[0])
    np.testing.assert_array_equal(rgb.numpy(), _pillow_rgb8(path, size))


def test_read_rgb8_keeps_images_within_max_side() -> None:
    full = _pillow_rgb8(ORIENTATION_DIR / "landscape_6.jpg")
    for max_side in (None, 600, 10_000):
        np.testing.assert_array_equal(
            read_rgb8(ORIENTATION_DIR / "landscape_6.jpg", max_side), full
        )


def test_training_and_synthesis_read_through_read_rgb8(tmp_path: Path) -> None:
    from opir_engine.datasets import load_rgb
    from opir_engine.synthesis import read_clean_image

    path = _rgb8_case("png16_rgba", tmp_path)
    np.testing.assert_array_equal(load_rgb(path).numpy(), _pillow_rgb8(path))
    np.testing.assert_array_equal(load_rgb(ROTATED_GPS_JPG, 512), read_rgb8(ROTATED_GPS_JPG, 512))
    np.testing.assert_array_equal(read_clean_image(path), _pillow_rgb8(path).transpose(1, 2, 0))


def test_list_images_by_extension_sorted_by_relative_path(tmp_path: Path) -> None:
    for name in ["a.png", "B.JPG", "c.txt", ".hidden.png", "sub/d.tif", "sub-e.webp", "f.png.part"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["B.JPG", "a.png", "sub-e.webp"]
    # relative paths compare as text: "sub-e" comes before "sub/d" ('-' < '/')
    recursive = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert recursive == ["B.JPG", "a.png", "sub-e.webp", "sub/d.tif"]
    assert list_images(tmp_path / "missing") == []


def test_as_8bit_is_what_an_8bit_png_holds(tmp_path: Path) -> None:
    """Scores are taken on `as_8bit` of an output: it must equal the saved file read back,
    rounding halves included."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 17, 23, generator=g)
    rgb[0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 254.5 / 255])
    write_image(tmp_path / "x.png", rgb)
    back = read_image(tmp_path / "x.png").rgb
    assert torch.equal(as_8bit(rgb), back)
