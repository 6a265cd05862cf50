"""Image files in and out of opir: decode to float tensors, write back atomically with metadata.

Data flows: files -> `read_image` -> `DecodedImage.rgb` (3, H, W) -> engine -> `write_image`.

Reading takes bit depth and channel layout from the file (its Pillow mode and raw decoder mode),
never from pixel values, applies the EXIF orientation and keeps EXIF (orientation reset to 1) and
the ICC profile. Writing goes to a hidden temporary file beside the destination that is renamed
into place, so a failure or Ctrl-C never leaves a partial output.

Pillow 13 has no 16-bit RGB mode: it decodes 48-bit RGB and 64-bit RGBA PNG/TIFF as 8-bit "RGB"
/ "RGBA" (the high bytes) and 16-bit gray+alpha PNG as 8-bit "RGBA". `read_image` recovers the low
bytes with a second decode, and `write_image` encodes 16-bit PNG and all TIFF itself (zlib).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "Channels",
    "DecodedImage",
    "ImageIOError",
    "ImageTooLargeError",
    "ImageWriteError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "infer_format",
    "is_image_path",
    "read_image",
    "write_image",
    "write_image_like",
]

# Pillow's format names, which `DecodedImage.format` and `write_image(format=...)` use.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
DEFAULT_MAX_PIXELS = 200_000_000

Channels = Literal["gray", "rgb"]

_EXTENSION_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
# Multi-picture JPEGs (some cameras and phones) are JPEGs whose first frame is the photo.
_READ_FORMAT_ALIASES = {"MPO": "JPEG"}
_ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
_SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_METADATA_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})
_GRAY_FORMATS = frozenset({"PNG", "JPEG", "TIFF", "BMP"})  # WebP has no gray layout
_DEFAULT_JPEG_QUALITY = 95

_EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112

# Raw decoder modes of 16-bit RGB(A) data that Pillow unpacks to 8 bits (the high byte), mapped
# to the raw mode with the opposite byte order, which unpacks the low byte instead.
_SWAP_END = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}
_RGB16_RAWMODES = frozenset(f"{bands};16{end}" for bands in ("RGB", "RGBA") for end in "BLN")
# 16-bit gray+alpha PNG opens as "RGBA"; the 8-bit "RGBA" raw mode has the same 4 bytes per pixel
# and hands them over unchanged: (L high, L low, A high, A low).
_LA16_RAWMODE = "LA;16B"

# EXIF IFD0 tags describing the photo (not the pixel layout); the only ones taken from TIFF input,
# whose IFD0 also holds strip offsets, compression and the like.
_EXIF_DESCRIPTIVE_TAGS = frozenset(
    {270, 271, 272, 274, 282, 283, 296, 305, 306, 315, 33432, 0x8769, 0x8825}
)
# TIFF tags `_encode_tiff` sets itself and never copies from EXIF.
_TIFF_LAYOUT_TAGS = frozenset(
    {254, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325}
    | {338, 339, 513, 514, 530, 531, 532, 34675}
)

# ITU-T T.81 Annex K tables in natural (row-major) order, which libjpeg scales by quality.
_IJG_LUMINANCE = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.int64,
)  # fmt: skip
_IJG_CHROMINANCE = np.array(
    [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
     24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99]
    + [99] * 32,
    dtype=np.int64,
)  # fmt: skip

# Image.MAX_IMAGE_PIXELS is a Pillow global; it is lifted only while Image.open reads a header,
# under this lock, so that `max_pixels` (checked right after) is the one limit that applies.
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageIOError(Exception):
    """Base of opir's image file errors; `str()` is one line: "{path}: {reason}"."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())  # one line whatever Pillow said
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type[ImageIOError], tuple[str, str]]:
        # Rebuild from (path, reason) so errors pickle across worker processes.
        return type(self), (self.path, self.reason)


class UnreadableImageError(ImageIOError):
    """Missing, unreadable, empty, truncated or corrupt file, or not an image."""


class ImageTooLargeError(ImageIOError):
    """More pixels than the `max_pixels` limit (a possible decompression bomb)."""


class UnsupportedImageError(ImageIOError):
    """A real image that opir does not handle (format, sample type or layout)."""


class ImageWriteError(ImageIOError):
    """The output file could not be written; nothing was left at the destination."""


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
        path: the file read.
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
    path: Path


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """Return True when the file extension is one opir reads and writes (case-insensitive)."""
    return Path(path).suffix.lower() in _EXTENSION_FORMATS


def infer_format(path: str | os.PathLike[str]) -> str:
    """Return the Pillow format name ("PNG", "JPEG", ...) for the extension of `path`."""
    fmt = _EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UnsupportedImageError(
            path, f"unsupported extension '{Path(path).suffix}' (use .png .jpg .webp .tif .bmp)"
        )
    return fmt


# ----------------------------------------------------------------------------------------------
# Reading


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
    _check_readable(path)
    try:
        with open(path, "rb") as fp:
            im = _open_limited(path, fp, max_pixels)
            with im:
                return _decode(path, im, fp)
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
    fmt = _READ_FORMAT_ALIASES.get(im.format or "", im.format)
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
    fmt = _READ_FORMAT_ALIASES.get(im.format or "", im.format or "")
    mode = im.mode
    rawmode = _tile_rawmode(im)  # known only until the image is loaded
    if fmt == "TIFF":
        _check_tiff_layout(path, im, rawmode)
    # Load before touching metadata: getexif() loads a PNG by itself, and a decoding error
    # there must not be swallowed (a second load() would then return garbage silently).
    _load(path, im)
    orientation = _read_orientation(im)
    exif = _read_exif(im, fmt)
    icc = im.info.get("icc_profile") or None
    quantization = getattr(im, "quantization", None) if fmt == "JPEG" else None
    jpeg_quality = _estimate_jpeg_quality(quantization)

    if rawmode in _RGB16_RAWMODES or rawmode == _LA16_RAWMODE:
        samples, bit_depth = _load_high_precision(path, im, fp, rawmode), 16
        channels: Channels = "gray" if rawmode == _LA16_RAWMODE else "rgb"
    else:
        samples, bit_depth, channels = _samples_8_or_16(path, im, rawmode)
        if mode == "CMYK":
            icc = None  # a CMYK profile does not describe the RGB we decoded

    rgb, alpha = _to_tensors(samples, bit_depth)
    rgb, alpha = _apply_orientation(rgb, orientation), _apply_orientation(alpha, orientation)
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


def _read_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not stop decoding the pixels
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(x: torch.Tensor | None, orientation: int) -> torch.Tensor | None:
    """Turn stored (C, H, W) pixels upright as the EXIF Orientation says (as exif_transpose)."""
    if x is None or orientation == 1:
        return x
    h_axis, w_axis = 1, 2
    ops = {
        2: lambda t: t.flip(w_axis),
        3: lambda t: t.flip(h_axis, w_axis),
        4: lambda t: t.flip(h_axis),
        5: lambda t: t.transpose(h_axis, w_axis),
        6: lambda t: torch.rot90(t, -1, (h_axis, w_axis)),
        7: lambda t: torch.rot90(t, 1, (h_axis, w_axis)).flip(w_axis),
        8: lambda t: torch.rot90(t, 1, (h_axis, w_axis)),
    }
    return ops[orientation](x).contiguous()


def _read_exif(im: Image.Image, fmt: str) -> bytes | None:
    """EXIF block with the Orientation reset to 1, as the pixels are stored upright."""
    raw = im.info.get("exif")
    if fmt == "TIFF" and not raw:
        return _descriptive_exif_of_tiff(im)
    if not raw:
        return None
    block = raw if raw.startswith(_EXIF_HEADER) else _EXIF_HEADER + raw
    try:
        return _reset_orientation_in_place(block)
    except (struct.error, ValueError, IndexError):
        return _reset_orientation_with_pillow(block)


def _reset_orientation_in_place(block: bytes) -> bytes:
    """Overwrite the IFD0 Orientation value with 1; every other byte (MakerNotes too) is kept."""
    tiff = bytearray(block[len(_EXIF_HEADER) :])
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        raise ValueError("bad TIFF byte order")
    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd0)
    for i in range(count):
        entry = ifd0 + 2 + 12 * i
        tag, typ, n = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _ORIENTATION_TAG and n == 1 and typ in (3, 4):
            struct.pack_into(order + ("H" if typ == 3 else "I"), tiff, entry + 8, 1)
    return _EXIF_HEADER + bytes(tiff)


def _reset_orientation_with_pillow(block: bytes) -> bytes | None:
    try:
        exif = Image.Exif()
        exif.load(block)
        if _ORIENTATION_TAG in exif:
            exif[_ORIENTATION_TAG] = 1
        return exif.tobytes()
    except Exception:  # EXIF too damaged to rewrite: drop it rather than fail the image
        return None


def _descriptive_exif_of_tiff(im: Image.Image) -> bytes | None:
    source = im.getexif()
    exif = Image.Exif()
    for tag in source:
        if tag in (0x8769, 0x8825):
            exif[tag] = source.get_ifd(tag)
        elif tag in _EXIF_DESCRIPTIVE_TAGS:
            exif[tag] = source[tag]
    if not exif:
        return None
    if _ORIENTATION_TAG in exif:
        exif[_ORIENTATION_TAG] = 1
    try:
        return exif.tobytes()
    except Exception:  # unusual tag values Pillow cannot serialise: drop EXIF, keep the image
        return None


def _estimate_jpeg_quality(tables: dict[int, Sequence[int]] | None) -> int | None:
    """Estimate the IJG quality (1-100) that best reproduces the quantization tables.

    libjpeg scales the Annex K tables by s = 5000/q (q < 50) or 200 - 2q and rounds
    (t * s + 50) // 100 into [1, 255]; the quality whose tables differ least wins. Cameras
    with their own tables get the nearest IJG quality.
    """
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    actual = [np.asarray(tables[0], dtype=np.int64)]
    references = [_IJG_LUMINANCE]
    if 1 in tables and len(tables[1]) == 64:
        actual.append(np.asarray(tables[1], dtype=np.int64))
        references.append(_IJG_CHROMINANCE)
    best_quality, best_error = 0, None
    for quality in range(1, 101):
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        error = sum(
            int(np.abs(np.clip((ref * scale + 50) // 100, 1, 255) - act).sum())
            for ref, act in zip(references, actual, strict=True)
        )
        if best_error is None or error < best_error:
            best_quality, best_error = quality, error
    return best_quality


# ----------------------------------------------------------------------------------------------
# Writing


def write_image(
    path: str | os.PathLike[str],
    rgb: torch.Tensor,
    *,
    alpha: torch.Tensor | None = None,
    bit_depth: int = 8,
    channels: Channels = "rgb",
    format: str | None = None,
    exif: bytes | None = None,
    icc_profile: bytes | None = None,
    quality: int | None = None,
) -> None:
    """Write a float RGB tensor (3, H, W) to an image file, atomically.

    Values are clamped to [0, 1] and stored as round(x * 255) or round(x * 65535). What the
    format cannot hold is left out, never an error:
      - 16-bit is kept in PNG and TIFF; JPEG, WebP and BMP get 8-bit.
      - alpha (1, H, W) is kept in PNG, WebP and TIFF; JPEG and BMP drop it.
      - channels="gray" stores luma (0.299 R + 0.587 G + 0.114 B) in PNG, JPEG, TIFF and BMP;
        WebP has no gray layout and stores RGB. 16-bit gray+alpha TIFF is stored as RGBA,
        a layout Pillow can read back.
      - EXIF and the ICC profile are kept in PNG, JPEG, WebP and TIFF; BMP drops them. A profile
        for the other colour layout (gray vs RGB) is dropped, as it would misdescribe the pixels.
    quality (1-100) applies to JPEG (default 95) and WebP (default: lossless, RGB under
    transparent pixels kept exactly).

    The file is written to a hidden ".<name>.<random>.part" file in the destination folder,
    flushed to disk and renamed over `path`; on any failure (or Ctrl-C) the temporary file is
    removed and an existing file at `path` is left as it was.

    Raises:
        ValueError: bad arguments (shapes, NaN values, bit depth, channels, quality).
        UnsupportedImageError: an output format opir does not write.
        ImageWriteError: the file could not be written (permissions, disk, encoder).
    """
    path = Path(path)
    fmt = _normalize_format(path, format)
    _validate_write_args(rgb, alpha, bit_depth, channels, quality)

    depth = bit_depth if fmt in _SIXTEEN_BIT_FORMATS else 8
    gray = channels == "gray" and fmt in _GRAY_FORMATS
    keep_alpha = alpha is not None and fmt in _ALPHA_FORMATS
    if gray and keep_alpha and depth == 16 and fmt == "TIFF":
        gray = False
    samples = _to_samples(rgb, alpha if keep_alpha else None, gray, depth)
    if fmt not in _METADATA_FORMATS:
        exif = icc_profile = None
    icc_profile = _matching_icc(icc_profile, gray)
    if exif is not None and not exif.startswith(_EXIF_HEADER):
        exif = _EXIF_HEADER + exif

    def encode(fp: BinaryIO) -> None:
        if depth == 16 and fmt == "PNG":
            _encode_png16(fp, samples, exif, icc_profile)
        elif fmt == "TIFF":
            _encode_tiff(fp, samples, exif, icc_profile)
        else:
            _encode_with_pillow(path, fp, samples, fmt, exif, icc_profile, quality)

    _write_atomically(path, encode)


def write_image_like(
    path: str | os.PathLike[str],
    rgb: torch.Tensor,
    source: DecodedImage,
    *,
    format: str | None = None,
    quality: int | None = None,
) -> None:
    """Write `rgb` (3, H, W) like `source`: its alpha, bit depth, gray/RGB layout, EXIF and ICC.

    A JPEG written from a JPEG source reuses the source's estimated quality unless `quality`
    is given. `rgb` must have the source's size, as the alpha is copied from it.
    """
    fmt = _normalize_format(Path(path), format)
    if quality is None and fmt == "JPEG":
        quality = source.jpeg_quality
    write_image(
        path,
        rgb,
        alpha=source.alpha,
        bit_depth=source.bit_depth,
        channels=source.channels,
        format=fmt,
        exif=source.exif,
        icc_profile=source.icc_profile,
        quality=quality,
    )


def _normalize_format(path: Path, format: str | None) -> str:
    if format is None:
        return infer_format(path)
    fmt = _FORMAT_ALIASES.get(format.upper(), format.upper())
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            path, f"unsupported output format {format} (use {', '.join(SUPPORTED_FORMATS)})"
        )
    return fmt


def _validate_write_args(
    rgb: torch.Tensor,
    alpha: torch.Tensor | None,
    bit_depth: int,
    channels: str,
    quality: int | None,
) -> None:
    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.shape[1] == 0 or rgb.shape[2] == 0:
        raise ValueError(f"rgb must have shape (3, H, W), got {tuple(rgb.shape)}")
    if alpha is not None and tuple(alpha.shape) != (1, *rgb.shape[1:]):
        raise ValueError(f"alpha must have shape (1, H, W) = {(1, *rgb.shape[1:])}")
    for name, t in (("rgb", rgb), ("alpha", alpha)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0, 1], got {t.dtype}")
        if t is not None and bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN values")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if channels not in ("gray", "rgb"):
        raise ValueError(f"channels must be 'gray' or 'rgb', got {channels!r}")
    if quality is not None and not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}")


def _to_samples(
    rgb: torch.Tensor, alpha: torch.Tensor | None, gray: bool, depth: int
) -> np.ndarray:
    """Quantize (3, H, W) [+ (1, H, W) alpha] floats to uint8/uint16 samples (H, W, C)."""
    planes = rgb.detach().to("cpu", torch.float32)
    if gray:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        planes = (planes * weights).sum(0, keepdim=True)
    if alpha is not None:
        planes = torch.cat([planes, alpha.detach().to("cpu", torch.float32)])
    top = 2**depth - 1
    levels = torch.round(planes.clamp(0.0, 1.0) * top).to(torch.int32)
    samples = levels.permute(1, 2, 0).numpy().astype(np.uint16 if depth == 16 else np.uint8)
    return np.ascontiguousarray(samples)


def _matching_icc(icc: bytes | None, gray: bool) -> bytes | None:
    # Bytes 16..20 of an ICC header name the colour space the profile describes.
    if not icc or len(icc) < 20:
        return None
    space = icc[16:20]
    if (space == b"GRAY") != gray or space not in (b"GRAY", b"RGB "):
        return None
    return icc


def _encode_with_pillow(
    path: Path,
    fp: BinaryIO,
    samples: np.ndarray,
    fmt: str,
    exif: bytes | None,
    icc: bytes | None,
    quality: int | None,
) -> None:
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[samples.shape[2]]
    im = Image.fromarray(samples[..., 0] if mode == "L" else samples, mode)
    options: dict[str, object] = {}
    if exif:
        options["exif"] = exif
    if icc:
        options["icc_profile"] = icc
    if fmt == "JPEG":
        options["quality"] = quality if quality is not None else _DEFAULT_JPEG_QUALITY
    elif fmt == "WEBP":
        lossless = {"lossless": True, "exact": True}
        options.update(lossless if quality is None else {"quality": quality})
    try:
        im.save(fp, format=fmt, **options)
    except (ValueError, KeyError, RuntimeError) as exc:  # e.g. JPEG EXIF over 64 KiB
        raise ImageWriteError(path, f"encoder failed ({exc})") from exc


def _encode_png16(fp: BinaryIO, samples: np.ndarray, exif: bytes | None, icc: bytes | None) -> None:
    """Write uint16 (H, W, C) samples as a 16-bit PNG, Paeth-filtered, with iCCP and eXIf."""
    h, w, c = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]

    def chunk(kind: bytes, data: bytes) -> None:
        fp.write(struct.pack(">I", len(data)) + kind + data)
        fp.write(struct.pack(">I", zlib.crc32(kind + data)))

    fp.write(b"\x89PNG\r\n\x1a\n")
    chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
    if icc:
        chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc))
    if exif:
        chunk(b"eXIf", exif[len(_EXIF_HEADER) :])
    rows = samples.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    compressor = zlib.compressobj(6)
    previous = np.zeros(w * c * 2, dtype=np.uint8)
    step = max(1, (1 << 22) // rows.shape[1])  # rows per block: bounded memory for big images
    for start in range(0, h, step):
        block = rows[start : start + step]
        up = np.concatenate([previous[None], block[:-1]])
        filtered = _paeth_filter(block, up, bytes_per_pixel=c * 2)
        data = np.concatenate([np.full((len(block), 1), 4, np.uint8), filtered], axis=1)
        compressed = compressor.compress(data.tobytes())
        if compressed:
            chunk(b"IDAT", compressed)
        previous = block[-1]
    chunk(b"IDAT", compressor.flush())
    chunk(b"IEND", b"")


def _paeth_filter(rows: np.ndarray, up: np.ndarray, bytes_per_pixel: int) -> np.ndarray:
    """PNG filter type 4 for uint8 scanlines (N, L) given the scanlines above them (N, L)."""
    a = np.zeros_like(rows, dtype=np.int16)
    a[:, bytes_per_pixel:] = rows[:, :-bytes_per_pixel]
    b = up.astype(np.int16)
    c = np.zeros_like(a)
    c[:, bytes_per_pixel:] = up[:, :-bytes_per_pixel]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return (rows.astype(np.int16) - predictor).astype(np.uint8)  # wraps modulo 256


def _encode_tiff(fp: BinaryIO, samples: np.ndarray, exif: bytes | None, icc: bytes | None) -> None:
    """Write uint8/uint16 (H, W, C) samples as a little-endian, deflate-compressed TIFF.

    Written here rather than by Pillow, which has no 16-bit RGB mode and whose libtiff writer
    fails on EXIF sub-IFDs (the GPS and Exif blocks).
    """
    h, w, c = samples.shape
    # Horizontal differencing (TIFF Predictor 2) per channel makes photos compress far better.
    diff = samples.copy()
    diff[:, 1:] = samples[:, 1:] - samples[:, :-1]  # unsigned arithmetic wraps as TIFF expects
    rows = diff.astype(diff.dtype.newbyteorder("<")).reshape(h, w * c)
    rows_per_strip = max(1, (1 << 18) // rows[0].nbytes)
    strips = [
        zlib.compress(rows[start : start + rows_per_strip].tobytes(), 6)
        for start in range(0, h, rows_per_strip)
    ]

    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    for tag, value in _exif_tags_for_tiff(exif).items():
        ifd[tag] = value
    ifd[256] = w  # ImageWidth
    ifd[257] = h  # ImageLength
    ifd[258] = (8 * samples.itemsize,) * c  # BitsPerSample
    ifd[259] = 8  # Compression: Adobe deflate
    ifd[262] = 1 if c <= 2 else 2  # PhotometricInterpretation: BlackIsZero / RGB
    ifd[277] = c  # SamplesPerPixel
    ifd[278] = rows_per_strip
    ifd[284] = 1  # PlanarConfiguration: chunky
    ifd[317] = 2  # Predictor: horizontal differencing
    ifd[339] = (1,) * c  # SampleFormat: unsigned integer
    if c in (2, 4):
        ifd[338] = 2  # ExtraSamples: unassociated alpha
    if icc:
        ifd[34675] = icc
    # StripOffsets are relative here: the IFD writer moves them past its own data, where the
    # strips follow.
    offsets, position = [], 0
    for strip in strips:
        offsets.append(position)
        position += len(strip)
    ifd.tagtype[273] = ifd.tagtype[279] = 4  # LONG
    ifd[273] = tuple(offsets)
    ifd[279] = tuple(len(strip) for strip in strips)
    fp.write(b"II*\x00" + struct.pack("<I", 8))
    fp.write(ifd.tobytes(8))
    for strip in strips:
        fp.write(strip)


def _exif_tags_for_tiff(block: bytes | None) -> dict[int, object]:
    """EXIF IFD0 tags and the Exif and GPS sub-IFDs (as dicts) to merge into a TIFF IFD."""
    if not block:
        return {}
    exif = Image.Exif()
    tags: dict[int, object] = {}
    try:
        exif.load(block)
        for tag in exif:
            if tag in _TIFF_LAYOUT_TAGS:
                continue
            if tag in (0x8769, 0x8825):
                sub = dict(exif.get_ifd(tag))
                if 0xA005 in sub:  # Interoperability sub-IFD: a dict, not its stale offset
                    sub[0xA005] = dict(exif.get_ifd(0xA005))
                tags[tag] = sub
            else:
                tags[tag] = exif[tag]
    except Exception:  # unreadable EXIF is dropped rather than failing the write
        return {}
    return tags


def _write_atomically(path: Path, encode: Callable[[BinaryIO], None]) -> None:
    """Run `encode(fp)` into a temporary file beside `path`, then rename it over `path`."""
    try:
        with _atomic_file(path) as fp:
            encode(fp)
    except ImageIOError:
        raise
    except FileNotFoundError:
        raise ImageWriteError(path, "folder does not exist") from None
    except IsADirectoryError:
        raise ImageWriteError(path, "destination is a directory") from None
    except PermissionError:
        raise ImageWriteError(path, "permission denied") from None
    except OSError as exc:
        raise ImageWriteError(path, f"cannot write file ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    # Shortened name keeps the temporary file under the file system's 255-byte name limit.
    temporary = path.with_name(f".{path.name[:100]}.{secrets.token_hex(4)}.part")
    # os.open with 0o666 lets the umask decide permissions, as for a plainly created file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as fp:
            yield fp
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
