"""Image files in and out of opir: decode to tensors, write back atomically with metadata.

Data flows: files -> `read_image` -> `DecodedImage.rgb` (3, H, W) -> engine -> `write_image`.
Training and synthesis read the same files through `read_rgb8` (uint8 (3, H, W)) and find them
with `list_images`.

Reading takes bit depth and channel layout from the file (its Pillow mode and raw decoder mode),
never from pixel values, applies the EXIF orientation and keeps EXIF (orientation reset to 1) and
the ICC profile. Writing goes to a hidden temporary file beside the destination that is renamed
into place, so a failure or Ctrl-C never leaves a partial output.

The parts: `formats` (which files are images), `read`, `metadata` (EXIF, ICC, orientation,
JPEG quality), `write`, the encoders Pillow lacks (`png16`, `tiff`), `atomic` (atomic files),
`sizing` (the working size) and `errors`.
"""

from opir_engine.image_io.errors import (
    ImageIOError,
    ImageTooLargeError,
    ImageWriteError,
    UnreadableImageError,
    UnsupportedImageError,
)
from opir_engine.image_io.formats import (
    IMAGE_SUFFIXES,
    SUPPORTED_FORMATS,
    Channels,
    infer_format,
    is_image_path,
    list_images,
)
from opir_engine.image_io.read import DEFAULT_MAX_PIXELS, DecodedImage, read_image, read_rgb8
from opir_engine.image_io.sizing import working_size
from opir_engine.image_io.write import as_8bit, write_image, write_image_like

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "SUPPORTED_FORMATS",
    "Channels",
    "DecodedImage",
    "ImageIOError",
    "ImageTooLargeError",
    "ImageWriteError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "as_8bit",
    "infer_format",
    "is_image_path",
    "list_images",
    "read_image",
    "read_rgb8",
    "working_size",
    "write_image",
    "write_image_like",
]
