"""Reading image files: bit depth and channel layout from the file, never from pixel values.

`read_image` decodes for the engine: float (3, H, W) in [0, 1] at the file's full precision,
plus alpha and what is needed to write the result back alike. `read_rgb8` decodes for training
and synthesis: uint8 (3, H, W) RGB, optionally shrunk. Both open, check and decode the file the
same way and raise the same errors.

Pillow 13 has no 16-bit RGB mode: it decodes 48-bit RGB and 64-bit RGBA PNG/TIFF as 8-bit "RGB"
/ "RGBA" (the high bytes) and 16-bit gray+alpha PNG as 8-bit "RGBA". `read_image` recovers the
low bytes with a second decode.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from opir_engine.image_io.errors import (
    ImageIOError,
    ImageTooLargeError,
    UnreadableImageError,
    UnsupportedImageError,
)
from opir_engine.image_io.formats import READ_FORMAT_ALIASES, SUPPORTED_FORMATS, Channels
from opir_engine.image_io.metadata import (
    apply_orientation,
    estimate_jpeg_quality,
    read_exif,
    read_orientation,
)
from opir_engine.image_io.sizing import working_size

DEFAULT_MAX_PIXELS = 200_000_000

# Raw decoder modes of 16-bit RGB(A) data that Pillow unpacks to 8 bits (the high byte), mapped
# to the raw mode with the opposite byte order, which unpacks the low byte instead.
_SWAP_END = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}
_RGB16_RAWMODES = frozenset(f"{bands};16{end}" for bands in ("RGB", "RGBA") for end in "BLN")
# 16-bit gray+alpha PNG opens as "RGBA"; the 8-bit "RGBA" raw mode has the same 4 bytes per pixel
# and hands them over unchanged: (L high, L low, A high, A low).
_LA16_RAWMODE = "LA;16B"

# Image.MAX_IMAGE_PIXELS is a Pillow global; it is lifted only while Image.open reads a header,
# under this lock, so that `max_pixels` (checked right after) is the one limit that applies.
_PIXEL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image file, upright, with what is needed to write the result back alike.

    Attributes:
        rgb: float32 (3, H, W) in [0, 1]; gray files are repeated over the 3 channels.
        alpha: float32 (1, H, W) in [0, 1], or None; the engine copies it through unchanged.
        bit_depth: 8 or 16, bits per sample in the file.
        channels: "gray" or "rgb", the colour layout of the file.
        mode: Pillow's mode for the opened file (e.g. "RGB", "I;16", "P", "CMYK").
        format: one of `SUPPORTED_FORMATS`.
        exif: EXIF block (starting b"Exif\\x00\\x00") with Orientation reset to 1, or None.
        icc_profile: ICC profile bytes, or None (also None for CMYK files, converted to RGB).
        jpeg_quality: quality 1-100 estimated from a JPEG's quantization tables, else None.
        source_size: (width, height) after orientation, i.e. (W, H) of `rgb`.
        path: the file read; None for an image described from memory (the engine's
            `inference/photo.py`), which has no file.
    """

    rgb: torch.Tensor = field(repr=False)
    alpha: torch.Tensor | None = field(repr=False)
    bit_depth: int
    channels: Channels
    mode: str
    format: str
    exif: bytes | None = field(repr=False)
    icc_profile: bytes | None = field(repr=False)
    jpeg_quality: int | None
    source_size: tuple[int, int]
    path: Path | None


def read_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode an image file to an upright float RGB tensor (3, H, W) plus alpha and metadata.

    The file is fully decoded here, so truncation and corruption raise here, not later. It
    relies on Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`, which opir never
    changes. 16-bit samples are scaled by 1/65535 without passing through 8 bits. Palette images
    become RGB (RGBA with transparency), CMYK uses Pillow's CMYK->RGB conversion (an embedded
    CMYK profile is neither applied nor kept), bilevel becomes gray. Multi-frame files give
    their first frame.

    Args:
        path: file to read.
        max_pixels: refuse images with more pixels than this (None: no limit).

    Raises:
        UnreadableImageError, ImageTooLargeError, UnsupportedImageError.
    """
    path = Path(path)
    with _opened(path, max_pixels) as (im, fp):
        return _decode(path, im, fp)


def read_rgb8(
    path: str | os.PathLike[str],
    max_side: int | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """uint8 (3, H, W) RGB of an image file, upright, its long side at most `max_side`.

    The 8-bit RGB that training and synthesis see: Pillow's conversion of the upright image to
    "RGB" (gray repeated, palette looked up, alpha dropped without compositing, 16-bit samples
    as Pillow reduces them), shrunk when longer than `max_side` to `working_size` with Pillow's
    area (BOX) filter, so that thin streaks fade as in a photo taken at that size. Opening,
    limits and errors are `read_image`'s.

    Raises:
        UnreadableImageError, ImageTooLargeError, UnsupportedImageError.
    """
    path = Path(path)
    with _opened(path, max_pixels) as (im, _):
        _load(path, im)
        try:
            upright = ImageOps.exif_transpose(im).convert("RGB")
        except ValueError as exc:
            raise UnsupportedImageError(path, f"cannot convert mode {im.mode} to RGB") from exc
    height, width = working_size(upright.height, upright.width, max_side)
    if (height, width) != (upright.height, upright.width):
        upright = upright.resize((width, height), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(upright).copy()).permute(2, 0, 1).contiguous()


@contextlib.contextmanager
def _opened(path: Path, max_pixels: int | None) -> Iterator[tuple[Image.Image, BinaryIO]]:
    """The opened image (header read, limits checked) and its file; any read failure in the
    block, here or in the caller's decoding, becomes an `ImageIOError` naming `path`."""
    _check_readable(path)
    try:
        with open(path, "rb") as fp:
            im = _open_limited(path, fp, max_pixels)
            with im:
                yield im, fp
    except ImageIOError:
        raise
    except PermissionError:
        raise UnreadableImageError(path, "permission denied") from None
    except OSError as exc:  # I/O error while reading (e.g. a failing disk or network share)
        raise UnreadableImageError(path, f"cannot read file ({exc.strerror or exc})") from exc


def _check_readable(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except PermissionError:
        raise UnreadableImageError(path, "permission denied") from None
    if path.is_dir():
        raise UnreadableImageError(path, "is a directory, not an image file")
    if st.st_size == 0:
        raise UnreadableImageError(path, "empty file (0 bytes)")


def _open_limited(path: Path, fp: BinaryIO, max_pixels: int | None) -> Image.Image:
    """Open (header only) with opir's pixel limit in place of Pillow's global one."""
    try:
        with _PIXEL_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        raise UnreadableImageError(path, _describe_unidentified(fp)) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, str(exc)) from None
    except (SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise UnreadableImageError(path, f"corrupt image header ({exc})") from None
    fmt = READ_FORMAT_ALIASES.get(im.format or "", im.format)
    if fmt not in SUPPORTED_FORMATS:
        im.close()
        raise UnsupportedImageError(
            path, f"unsupported format {im.format} (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ImageTooLargeError(
            path,
            f"{w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels",
        )
    return im


def _describe_unidentified(fp: BinaryIO) -> str:
    fp.seek(0)
    head = fp.read(16)
    known = {
        b"\x89PNG": "PNG",
        b"\xff\xd8\xff": "JPEG",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"BM": "BMP",
    }
    for magic, fmt in known.items():
        if head.startswith(magic):
            return f"cannot decode {fmt} data (corrupt, or a variant Pillow cannot read)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "cannot decode WEBP data (corrupt, or a variant Pillow cannot read)"
    return "not an image (cannot identify format)"


def _decode(path: Path, im: Image.Image, fp: BinaryIO) -> DecodedImage:
    fmt = READ_FORMAT_ALIASES.get(im.format or "", im.format or "")
    mode = im.mode
    rawmode = _tile_rawmode(im)  # known only until the image is loaded
    if fmt == "TIFF":
        _check_tiff_layout(path, im, rawmode)
    # Load before touching metadata: getexif() loads a PNG by itself, and a decoding error
    # there must not be swallowed (a second load() would then return garbage silently).
    _load(path, im)
    orientation = read_orientation(im)
    exif = read_exif(im, fmt)
    icc = im.info.get("icc_profile") or None
    quantization = getattr(im, "quantization", None) if fmt == "JPEG" else None
    jpeg_quality = estimate_jpeg_quality(quantization)

    if rawmode in _RGB16_RAWMODES or rawmode == _LA16_RAWMODE:
        samples, bit_depth = _load_high_precision(path, im, fp, rawmode), 16
        channels: Channels = "gray" if rawmode == _LA16_RAWMODE else "rgb"
    else:
        samples, bit_depth, channels = _samples_8_or_16(path, im, rawmode)
        if mode == "CMYK":
            icc = None  # a CMYK profile does not describe the RGB we decoded

    rgb, alpha = _to_tensors(samples, bit_depth)
    rgb, alpha = apply_orientation(rgb, orientation), apply_orientation(alpha, orientation)
    return DecodedImage(
        rgb=rgb,
        alpha=alpha,
        bit_depth=bit_depth,
        channels=channels,
        mode=mode,
        format=fmt,
        exif=exif,
        icc_profile=icc,
        jpeg_quality=jpeg_quality,
        source_size=(rgb.shape[2], rgb.shape[1]),
        path=path,
    )


def _tile_rawmode(im: Image.Image) -> str | None:
    """The raw decoder mode of the first tile: how the file stores samples (before loading)."""
    if not im.tile:
        return None
    args = im.tile[0].args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _check_tiff_layout(path: Path, im: Image.Image, rawmode: str | None) -> None:
    # Pillow misreads some 16-bit TIFF layouts (e.g. planar RGB) as 8-bit garbage; the file's
    # BitsPerSample tag tells them apart from the layouts handled here.
    tag = getattr(im, "tag_v2", {}).get(258, (8,))
    bits = max(tag) if isinstance(tag, tuple) else int(tag)
    if bits <= 8 or im.mode.startswith("I;16") or rawmode in _RGB16_RAWMODES:
        return
    if bits == 16:
        raise UnsupportedImageError(path, "16-bit TIFF layout Pillow cannot decode (e.g. planar)")
    raise UnsupportedImageError(path, f"{bits}-bit TIFF samples are not supported")


def _load(path: Path, im: Image.Image) -> None:
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, str(exc)) from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise UnreadableImageError(path, "truncated file") from None
        raise UnreadableImageError(path, f"corrupt image data ({exc})") from None
    except (SyntaxError, ValueError, struct.error, zlib.error, IndexError) as exc:
        raise UnreadableImageError(path, f"corrupt image data ({exc})") from None


def _load_high_precision(path: Path, im: Image.Image, fp: BinaryIO, rawmode: str) -> np.ndarray:
    """Return uint16 (H, W, C) samples of a 16-bit RGB(A) or gray+alpha file Pillow loaded as 8-bit.

    The file is decoded a second time with a raw mode that unpacks the bytes Pillow's own raw
    mode drops; both decodes run Pillow's C decoders (unfiltering, decompression, interlace).
    """
    if rawmode == _LA16_RAWMODE:
        raw = _decode_with_rawmode(path, fp, "RGBA").astype(np.uint16)
        return np.stack([raw[..., 0] << 8 | raw[..., 1], raw[..., 2] << 8 | raw[..., 3]], -1)
    high = np.asarray(im).astype(np.uint16)
    low_mode = rawmode[:-1] + _SWAP_END[rawmode[-1]]
    low = _decode_with_rawmode(path, fp, low_mode).astype(np.uint16)
    return high << 8 | low


def _decode_with_rawmode(path: Path, fp: BinaryIO, rawmode: str) -> np.ndarray:
    fp.seek(0)
    with Image.open(fp) as again:
        again.tile = [
            t._replace(args=rawmode if isinstance(t.args, str) else (rawmode, *t.args[1:]))
            for t in again.tile
        ]
        _load(path, again)
        return np.asarray(again)


def _samples_8_or_16(
    path: Path, im: Image.Image, rawmode: str | None
) -> tuple[np.ndarray, int, Channels]:
    """Return (H, W, C) samples with C in {1, 2, 3, 4}, the bit depth, and the colour layout."""
    mode = im.mode
    if mode.startswith("I;16") or (mode == "I" and (rawmode or "").startswith("I;16")):
        return np.asarray(im)[..., None].astype(np.uint16), 16, "gray"
    if mode in ("I", "F"):
        raise UnsupportedImageError(path, f"32-bit samples (mode {mode}) are not supported")
    has_key = "transparency" in im.info  # palette or colour-key transparency
    if mode in ("1", "L", "LA", "La"):
        target = "LA" if mode in ("LA", "La") or (has_key and mode == "L") else "L"
        channels: Channels = "gray"
    else:
        rgba = mode in ("RGBA", "RGBa", "PA") or (has_key and mode in ("P", "RGB"))
        target = "RGBA" if rgba else "RGB"
        channels = "rgb"
    if mode != target:
        try:
            im = im.convert(target)
        except ValueError as exc:
            raise UnsupportedImageError(path, f"cannot convert mode {mode} to RGB") from exc
    samples = np.asarray(im)
    return (samples[..., None] if samples.ndim == 2 else samples), 8, channels


def _to_tensors(samples: np.ndarray, bit_depth: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split (H, W, C) integer samples into rgb (3, H, W) and alpha (1, H, W) or None."""
    x = torch.from_numpy(samples.astype(np.float32) / np.float32(2**bit_depth - 1))
    x = x.permute(2, 0, 1)
    n = x.shape[0]
    color = x[:1].repeat(3, 1, 1) if n in (1, 2) else x[:3].contiguous()
    alpha = x[n - 1 :].contiguous() if n in (2, 4) else None
    return color, alpha
