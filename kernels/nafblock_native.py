"""When the NAFBlock's element-wise work (`layer_norm`, `gate`) runs its native CPU kernels
(`nafblock_cpu.c`) rather than its PyTorch reference: on CPU fp32 dense channels-last maps
(how the KPN runs on the CPU), eagerly, where the kernels built, unless the op's backend is
"reference" or `native_nafblock(False)` says otherwise (what the benchmarks compare)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from . import native
from .op import current_backend

_native_on: ContextVar[bool] = ContextVar("opir_native_nafblock", default=True)


@contextlib.contextmanager
def native_nafblock(enabled: bool) -> Iterator[None]:
    """Let the NAFBlock's norm and gate use their native kernels (the default) or not, in this
    thread, while the block runs; the op's backend is left as it is."""
    token = _native_on.set(enabled)
    try:
        yield
    finally:
        _native_on.reset(token)


def native_supports(*maps: Tensor) -> bool:
    """Whether the native kernels take these maps: CPU fp32, dense channels-last, one shape."""
    return (
        all(
            t.device.type == "cpu"
            and t.dtype == torch.float32
            and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last)
            for t in maps
        )
        and native.available()
    )


def use_native(*maps: Tensor, params: tuple[Tensor, ...] = ()) -> bool:
    """Whether this call runs the native kernels (`maps` as in `native_supports`, `params`
    fp32)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace the ContextVar reads
        and current_backend() in ("auto", "native")
        and _native_on.get()
        and all(t.dtype == torch.float32 for t in params)
        and native_supports(*maps)
    )
