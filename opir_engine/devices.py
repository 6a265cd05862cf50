"""Devices and precisions: the one rule every part (inference, training, profiling) uses to turn
a name such as "auto", "cpu", "cuda:1" or "bf16" into a torch device or dtype; and how the CPU's
memory is handed out (`keep_freed_memory`)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import torch

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide, or a name that is neither."""


def pick_device(device: str) -> torch.device:
    """ "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """ "auto" (bf16 or fp16 on CUDA, fp32 on CPU), "fp32", "fp16" or "bf16"."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in _PRECISIONS:
        raise DeviceError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    return _PRECISIONS[precision]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_kept: bool | None = None
_kept_lock = threading.Lock()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory PyTorch frees for the next tensor, instead of handing
    it back to the system; True where that is now in force (idempotent; once per process).

    A forward of the shipped model at 512x512 allocates and frees hundreds of MB of maps. By
    default glibc serves each map of 32 MB or more with a fresh mmap and trims the heap top when
    freed, so every forward faults all that memory in again, 4 KiB at a time, each page zeroed
    by the kernel: 78,000-143,000 page faults per forward here. With no mmap (the heap serves
    everything, falling back to mmap only when it cannot grow) and no trimming, a freed map is
    reused as is (bench/allocator.py measures it). What jemalloc or tcmalloc would do, without
    LD_PRELOAD. The cost: the process keeps its peak heap until it exits, which is the shape of
    `opir restore` and `opir train`. The engine and the trainer call this on the CPU;
    OPIR_KEEP_FREED_MEMORY=0 turns it off. Not glibc (macOS, musl): nothing changes, False.
    """
    global _kept
    with _kept_lock:
        if _kept is None:
            _kept = False
            if os.environ.get("OPIR_KEEP_FREED_MEMORY", "1") != "0" and sys.platform == "linux":
                try:
                    libc = ctypes.CDLL(None)
                    mallopt = libc.mallopt
                    libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
                except (OSError, AttributeError):
                    return False
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                # mallopt returns 1 on success
                _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
                    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                )
        return _kept


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


def kept_free_bytes() -> int:
    """Bytes this process's malloc holds free for reuse (glibc's `mallinfo2`), where
    `keep_freed_memory` is in force; else 0. The system's MemAvailable no longer counts them, yet
    the next tensor gets them first: the engine's tile budget adds them back, so whether a photo
    is tiled does not depend on the photos before it."""
    if not _kept:
        return 0
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return 0
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return int(mallinfo2().fordblks)
