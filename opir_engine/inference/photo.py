"""The engine's inputs and outputs as photos: what an input was (alpha, bit depth, layout,
metadata) and the restored image back as a PIL image or a file written as `opir restore` writes.

A path is decoded by `image_io.read_image`, the function `opir restore` reads with, and saved by
`image_io.write_image_like`, the one it writes with: `RestoreResult.save` writes the same file.
An image given in memory is described here in the same terms (a `DecodedImage` without a path).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opir_engine.image_io import (
    SUPPORTED_FORMATS,
    DecodedImage,
    ImageWriteError,
    read_image,
    write_image_like,
)
from opir_engine.image_io.metadata import estimate_jpeg_quality

InMemory = Image.Image | np.ndarray | torch.Tensor
ImageInput = str | os.PathLike[str] | InMemory | DecodedImage
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N"})


def decode_input(
    image: ImageInput, rgb_of: Callable[[InMemory], torch.Tensor], max_pixels: int | None
) -> DecodedImage:
    """`image` as a `DecodedImage`: a path is read by `read_image` (as `opir restore` reads it,
    `max_pixels` its limit); an image in memory is described by `describe_in_memory`, its
    colour planes made by `rgb_of` (the engine's `to_tensor`)."""
    if isinstance(image, DecodedImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, max_pixels=max_pixels)
    return describe_in_memory(image, rgb_of)


def describe_in_memory(image: InMemory, rgb_of: Callable[[InMemory], torch.Tensor]) -> DecodedImage:
    """What an image in memory holds, in `read_image`'s terms, its pixels taken as given.

    PIL: alpha of RGBA, LA, PA and of palette/colour-key transparency; 16 bits for "I;16";
    gray for 1, L, LA and I;16; its ICC profile, EXIF (as it is: no orientation is applied to
    the pixels) and, for a JPEG, its estimated quality. Arrays: alpha of (H, W, 4); 16 bits for
    uint16; gray for (H, W) and (H, W, 1). Tensors (3, H, W): no alpha; 16 bits for uint16.
    Float samples are written at 8 bits.
    """
    rgb = rgb_of(image)
    alpha, bit_depth, gray = None, 8, False
    exif = icc = quality = None
    mode, fmt, path = "RGB", "PNG", None
    if isinstance(image, Image.Image):
        mode = image.mode
        gray = mode in _GRAY_MODES
        bit_depth = 16 if mode.startswith("I;16") else 8
        if mode in _ALPHA_MODES or ("transparency" in image.info and mode in ("P", "L", "RGB")):
            band = image.convert("LA" if gray else "RGBA").getchannel("A")
            alpha = torch.from_numpy(np.asarray(band, dtype=np.float32) / np.float32(255))[None]
        icc = image.info.get("icc_profile") or None
        exif = image.info.get("exif") or None
        if image.format == "JPEG":
            quality = estimate_jpeg_quality(getattr(image, "quantization", None))
        fmt = image.format if image.format in SUPPORTED_FORMATS else fmt
        path = Path(image.filename) if getattr(image, "filename", "") else None
    elif isinstance(image, np.ndarray):
        gray = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)
        bit_depth = 16 if image.dtype == np.uint16 else 8
        if image.ndim == 3 and image.shape[2] == 4:  # scaled as the colour planes are
            alpha = rgb_of(np.ascontiguousarray(image[..., 3]))[:1]
        mode = ("L" if gray else "RGB") + ("A" if alpha is not None else "")
    elif image.dtype == torch.uint16:
        bit_depth = 16
    return DecodedImage(
        rgb=rgb,
        alpha=alpha,
        bit_depth=bit_depth,
        channels="gray" if gray else "rgb",
        mode=mode,
        format=fmt,  # unused when writing: save() takes the format from the suffix
        exif=exif,
        icc_profile=icc,
        jpeg_quality=quality,
        source_size=(rgb.shape[2], rgb.shape[1]),
        path=path,
    )


def to_pil(rgb: torch.Tensor, source: DecodedImage | None) -> Image.Image:
    """(3, H, W) float -> 8-bit "RGB", or "RGBA" with the source's alpha.

    Pillow has no 16-bit colour mode, so 16-bit sources come back at 8 bits here (levels
    round(x * 255), as the 8-bit writers store them); `save` to PNG or TIFF keeps 16 bits.
    """
    planes = rgb.detach().to("cpu", torch.float32)
    alpha = source.alpha if source is not None else None
    if alpha is not None:
        planes = torch.cat([planes, alpha.to("cpu", torch.float32)])
    levels = torch.round(planes.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(levels.contiguous().numpy(), "RGBA" if alpha is not None else "RGB")


def save(
    rgb: torch.Tensor,
    source: DecodedImage,
    path: str | os.PathLike[str],
    quality: int | None,
    overwrite: bool,
) -> Path:
    """Write `rgb` to `path` as `opir restore` writes it for `source` (`write_image_like`).

    Raises ImageWriteError (naming `path`) for the input file itself, whatever `overwrite`
    says, and for an existing file unless `overwrite`; ImageIOError for failed writes.
    """
    path = Path(path)
    if source.path is not None and _same_file(path, source.path):
        raise ImageWriteError(path, "is the input image; inputs are never overwritten")
    if path.exists() and not overwrite:
        raise ImageWriteError(path, "already exists (overwrite=True replaces it)")
    write_image_like(path, rgb, source, quality=quality)
    return path


def _same_file(a: Path, b: Path) -> bool:
    # samefile sees hard links and case-insensitive names; resolve() covers a missing `a`.
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
