"""What a file says about its pixels besides their values: EXIF (and its orientation), the ICC
profile, and the JPEG quality its quantization tables imply.

Pixels are stored upright after reading, so the EXIF kept for writing has its Orientation reset
to 1; every other EXIF byte (maker notes too) is kept where possible.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112

# EXIF IFD0 tags describing the photo (not the pixel layout); the only ones taken from TIFF input,
# whose IFD0 also holds strip offsets, compression and the like.
_EXIF_DESCRIPTIVE_TAGS = frozenset(
    {270, 271, 272, 274, 282, 283, 296, 305, 306, 315, 33432, 0x8769, 0x8825}
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


def read_orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1-8) of an opened image; 1 when absent, invalid or unreadable."""
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not stop decoding the pixels
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(x: torch.Tensor | None, orientation: int) -> torch.Tensor | None:
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


def read_exif(im: Image.Image, fmt: str) -> bytes | None:
    """EXIF block with the Orientation reset to 1, as the pixels are stored upright."""
    raw = im.info.get("exif")
    if fmt == "TIFF" and not raw:
        return _descriptive_exif_of_tiff(im)
    if not raw:
        return None
    block = raw if raw.startswith(EXIF_HEADER) else EXIF_HEADER + raw
    try:
        return _reset_orientation_in_place(block)
    except (struct.error, ValueError, IndexError):
        return _reset_orientation_with_pillow(block)


def _reset_orientation_in_place(block: bytes) -> bytes:
    """Overwrite the IFD0 Orientation value with 1; every other byte (MakerNotes too) is kept."""
    tiff = bytearray(block[len(EXIF_HEADER) :])
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
    return EXIF_HEADER + bytes(tiff)


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


def matching_icc(icc: bytes | None, gray: bool) -> bytes | None:
    """`icc` when it describes the layout written (gray or RGB), else None: a profile for the
    other layout would misdescribe the pixels."""
    # Bytes 16..20 of an ICC header name the colour space the profile describes.
    if not icc or len(icc) < 20:
        return None
    space = icc[16:20]
    if (space == b"GRAY") != gray or space not in (b"GRAY", b"RGB "):
        return None
    return icc


def estimate_jpeg_quality(tables: dict[int, Sequence[int]] | None) -> int | None:
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
