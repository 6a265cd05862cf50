"""A 16-bit PNG encoder: Pillow has no 16-bit RGB mode, so opir writes these PNGs itself."""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np

from opir_engine.image_io.metadata import EXIF_HEADER


def encode_png16(fp: BinaryIO, samples: np.ndarray, exif: bytes | None, icc: bytes | None) -> None:
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
        chunk(b"eXIf", exif[len(EXIF_HEADER) :])
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
