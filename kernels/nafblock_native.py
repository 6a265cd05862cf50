"""When the NAFBlock's element-wise work (`layer_norm`, `gate`) runs its native CPU kernels
(`nafblock_cpu.c`) rather than its PyTorch reference: on CPU dense channels-last maps, fp32 or
bf16 (how the KPN runs on the CPU, in fp32 or under bf16 autocast) with fp32 parameters,
eagerly, where the kernels built, unless the op's backend is "reference" or
`native_nafblock(False)` says otherwise (what the benchmarks compare)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from . import native
from .op import current_backend

MAP_DTYPES = (torch.float32, torch.bfloat16)

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
    """Whether the native kernels take these maps: CPU fp32 or bf16, dense channels-last."""
    return (
        all(
            t.device.type == "cpu"
            and t.dtype in MAP_DTYPES
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


def autocast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is on for `device`'s type here: the norm's output then goes
    straight to a bf16 convolution."""
    kind = device.type
    return (
        torch.amp.is_autocast_available(kind)
        and torch.is_autocast_enabled(kind)
        and torch.get_autocast_dtype(kind) == torch.bfloat16
    )


def half_bits(*maps: Tensor | None) -> int:
    """The kernels' `half` argument: bit i set where map i is bf16 (None: an absent map)."""
    return sum(1 << i for i, t in enumerate(maps) if t is not None and t.dtype == torch.bfloat16)
