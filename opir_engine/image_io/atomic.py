"""Atomic file writes: a hidden temporary file beside the destination, renamed into place, so a
failure or Ctrl-C never leaves a partial output."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from opir_engine.image_io.errors import ImageIOError, ImageWriteError


def write_atomically(path: Path, encode: Callable[[BinaryIO], None]) -> None:
    """Run `encode(fp)` into a temporary file beside `path`, then rename it over `path`.

    Raises:
        ImageWriteError: the file could not be written; `path` is left as it was.
    """
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
