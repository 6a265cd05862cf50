"""A TIFF encoder (8 and 16 bits, deflate, with EXIF and ICC).

Written here rather than by Pillow, which has no 16-bit RGB mode and whose libtiff writer fails
on EXIF sub-IFDs (the GPS and Exif blocks).
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np
from PIL import Image, TiffImagePlugin

# TIFF tags `encode_tiff` sets itself and never copies from EXIF.
_TIFF_LAYOUT_TAGS = frozenset(
    {254, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325}
    | {338, 339, 513, 514, 530, 531, 532, 34675}
)


def encode_tiff(fp: BinaryIO, samples: np.ndarray, exif: bytes | None, icc: bytes | None) -> None:
    """Write uint8/uint16 (H, W, C) samples as a little-endian, deflate-compressed TIFF."""
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
