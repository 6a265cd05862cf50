"""Which files are images: the formats opir reads and writes, their extensions, folder listing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from opir_engine.image_io.errors import UnsupportedImageError

# Pillow's format names, which `DecodedImage.format` and `write_image(format=...)` use.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")

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
IMAGE_SUFFIXES: tuple[str, ...] = tuple(_EXTENSION_FORMATS)
"""Lower-case extensions of the image files opir reads, for inference, training and synthesis."""

_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
# Multi-picture JPEGs (some cameras and phones) are JPEGs whose first frame is the photo.
READ_FORMAT_ALIASES = {"MPO": "JPEG"}


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


def normalize_format(path: Path, format: str | None) -> str:
    """The Pillow format name to write `path` as: `format` (any case, JPG/TIF aliases) or, when
    None, the one its extension names."""
    if format is None:
        return infer_format(path)
    fmt = _FORMAT_ALIASES.get(format.upper(), format.upper())
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            path, f"unsupported output format {format} (use {', '.join(SUPPORTED_FORMATS)})"
        )
    return fmt


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """The image files in `folder` (and its subfolders when `recursive`), by extension, sorted by
    their path relative to `folder`. Hidden files (".name", e.g. a write in progress) are left
    out; a missing folder gives an empty list."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.glob("*")
    files = [
        p for p in candidates if is_image_path(p) and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())
