"""The errors of opir's image files: one type per failure, each one line "{path}: {reason}"."""

from __future__ import annotations

import os


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
