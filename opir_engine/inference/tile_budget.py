"""Tile only when memory needs it: the tile side from free memory and the model's bytes per pixel.

`pick_tile` is the pure rule; `free_bytes` reads what the device has free and
`measure_bytes_per_pixel` the memory one forward takes per input pixel (its peak of live
tensors at two sizes: the slope of the line through them), so an ordinary photo goes through in
one piece and a photo too large for the device in the largest tiles that fit.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opir_engine.devices import kept_free_bytes

# Share of the free memory a forward may take: the rest is left to the blending buffers, the
# allocator's fragmentation and whatever else runs on the machine.
HEADROOM = 0.5
MIN_TILE = 128  # below this a tile is mostly overlap


def pick_tile(
    free: int,
    bytes_per_pixel: float,
    height: int,
    width: int,
    multiple: int,
    *,
    fixed: int = 0,
    headroom: float = HEADROOM,
) -> int | None:
    """The tile side for a `height` x `width` image, or None when it fits in one piece.

    It fits when `fixed + bytes_per_pixel * pixels` (pixels of the image padded to `multiple`)
    is at most `headroom * free`; otherwise the tile is the largest multiple of `multiple` whose
    square fits, and at least MIN_TILE (rounded up to `multiple`) whatever the memory says.
    """
    if free < 0 or bytes_per_pixel <= 0 or height < 1 or width < 1 or multiple < 1:
        raise ValueError(
            f"need free >= 0, bytes per pixel > 0, a positive size and multiple; got free {free}, "
            f"{bytes_per_pixel} bytes per pixel, {height}x{width}, multiple {multiple}"
        )
    budget = headroom * free - fixed
    padded = -(-height // multiple) * multiple * (-(-width // multiple) * multiple)
    if padded * bytes_per_pixel <= budget:
        return None
    side = int(math.sqrt(max(budget, 0) / bytes_per_pixel)) // multiple * multiple
    return max(side, -(-MIN_TILE // multiple) * multiple)


def free_bytes(device: torch.device) -> int:
    """Memory the device has free now: CUDA's free memory, or the CPU's MemAvailable plus what
    this process's allocator holds free for reuse (`kept_free_bytes`)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + kept_free_bytes()
    # Not Linux: the physical memory, so no photo is tiled for want of knowing
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _PeakTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create and that stay alive (any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return  # a view of a storage already counted
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def peak_bytes(forward: Callable[[int], object], side: int) -> int:
    """Peak bytes of tensors alive during `forward(side)` (what it allocates, not its inputs)."""
    tracker = _PeakTracker()
    with torch.inference_mode(), tracker:
        forward(side)
    return tracker.peak


def measure_bytes_per_pixel(
    forward: Callable[[int], object], small: int = 128, large: int = 256
) -> tuple[float, int]:
    """(bytes per pixel, fixed bytes) of `forward(side)`, which runs the model on a side x side
    input: the line through the peaks at two sides (activations grow with the area; the fixed
    part is what does not)."""
    low, high = peak_bytes(forward, small), peak_bytes(forward, large)
    slope = (high - low) / (large**2 - small**2)
    return slope, max(0, int(low - slope * small**2))
