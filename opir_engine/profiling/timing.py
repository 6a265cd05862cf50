"""The timing and memory harness: each call timed after the device has finished it, calls
interleaved round by round, and the peak memory of one call.

CUDA: events and a synchronise; CPU: `perf_counter`, CPU ops being synchronous. Interleaving
the functions being compared (rather than timing one, then the other) makes a change in machine
load hit all of them alike, so their ratios hold on a busy machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, measured after the device has finished it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_interleaved(
    fns: Sequence[Callable[[], object]], runs: int, warmup: int, device: torch.device
) -> list[list[float]]:
    """Per function, `runs` times in seconds; each round calls every function once in turn."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, series in zip(fns, times, strict=True):
            series.append(_time_once(fn, device))
    return times


def percentile_ms(times: Sequence[float], q: float) -> float:
    """The q-th percentile of `times` (seconds), in milliseconds."""
    return float(np.percentile(np.asarray(times) * 1e3, q))


def _read_status_kb(key: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM); None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next forward must fault them in
    again and shows in the peak; otherwise the warm-up's freed buffers hide its memory."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(name).malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_peak_memory(
    fn: Callable[[], object], device: torch.device
) -> tuple[float | None, float | None, str]:
    """(peak MB, growth MB over the memory held before the call, what was measured).

    CUDA: the caching allocator's peak, reset before the call. CPU (Linux): the kernel's
    peak resident set (VmHWM, reset through /proc/self/clear_refs) after trimming the heap,
    minus the resident set before the call; elsewhere (None, None).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2**20, (peak - before) / 2**20, "CUDA allocator peak"
    _trim_heap()
    before = _read_status_kb("VmRSS")
    if before is None or not _reset_peak_rss():
        return None, None, "unavailable (needs Linux /proc)"
    fn()
    peak = _read_status_kb("VmHWM") or before
    return peak / 1024, (peak - before) / 1024, "CPU peak RSS (VmHWM)"
