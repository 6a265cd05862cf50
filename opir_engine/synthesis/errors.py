"""The errors of `opir_engine.synthesis`: one type per failure, all under `SynthesisError`.

An unreadable clean photo raises `image_io.UnreadableImageError` (an `ImageIOError`), the one
error for image files opir cannot read, whoever reads them.
"""

from __future__ import annotations


class SynthesisError(Exception):
    """Base class of every error raised by `opir_engine.synthesis` itself."""


class UnknownKindError(SynthesisError, ValueError):
    """A degradation kind other than rain, snow, haze or mixed."""


class InvalidImageError(SynthesisError, ValueError):
    """A tensor that is not a float (3, H, W) or (B, 3, H, W) image, or a bad depth map."""


class InvalidParamsError(SynthesisError, ValueError):
    """A parameter dict that does not describe a `RainParams`, `SnowParams` or `HazeParams`."""


class InvalidSeedError(SynthesisError, ValueError):
    """A seed that is not a non-negative integer."""


class NoCleanImagesError(SynthesisError):
    """A clean folder with no image files in it."""


class SourceChangedError(SynthesisError):
    """A pair record whose source image is missing or no longer has the recorded bytes."""
