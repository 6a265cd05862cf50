"""Writing image files: float (3, H, W) back to a file like the one it came from, atomically.

What the format cannot hold (16 bits, alpha, gray, metadata) is left out, never an error.
Pillow encodes 8-bit PNG, JPEG, WebP and BMP; 16-bit PNG (`png16`) and all TIFF (`tiff`) are
encoded here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from opir_engine.image_io.atomic import write_atomically
from opir_engine.image_io.errors import ImageWriteError
from opir_engine.image_io.formats import Channels, normalize_format
from opir_engine.image_io.metadata import EXIF_HEADER, matching_icc
from opir_engine.image_io.png16 import encode_png16
from opir_engine.image_io.read import DecodedImage
from opir_engine.image_io.tiff import encode_tiff

_ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
_SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_METADATA_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})
_GRAY_FORMATS = frozenset({"PNG", "JPEG", "TIFF", "BMP"})  # WebP has no gray layout
_DEFAULT_JPEG_QUALITY = 95


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
    fmt = normalize_format(path, format)
    _validate_write_args(rgb, alpha, bit_depth, channels, quality)

    depth = bit_depth if fmt in _SIXTEEN_BIT_FORMATS else 8
    gray = channels == "gray" and fmt in _GRAY_FORMATS
    keep_alpha = alpha is not None and fmt in _ALPHA_FORMATS
    if gray and keep_alpha and depth == 16 and fmt == "TIFF":
        gray = False
    samples = _to_samples(rgb, alpha if keep_alpha else None, gray, depth)
    if fmt not in _METADATA_FORMATS:
        exif = icc_profile = None
    icc_profile = matching_icc(icc_profile, gray)
    if exif is not None and not exif.startswith(EXIF_HEADER):
        exif = EXIF_HEADER + exif

    def encode(fp: BinaryIO) -> None:
        if depth == 16 and fmt == "PNG":
            encode_png16(fp, samples, exif, icc_profile)
        elif fmt == "TIFF":
            encode_tiff(fp, samples, exif, icc_profile)
        else:
            _encode_with_pillow(path, fp, samples, fmt, exif, icc_profile, quality)

    write_atomically(path, encode)


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
    fmt = normalize_format(Path(path), format)
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


def as_8bit(image: torch.Tensor) -> torch.Tensor:
    """round(x * 255) / 255: the values an 8-bit file of `image` (already in [0, 1]) holds, as
    floats. Scores are taken on these, as a user gets the saved file, not the model's floats."""
    return (image * 255).round() / 255


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
