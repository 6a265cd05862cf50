"""Devices and precisions: the one rule every part (inference, training, profiling) uses to turn
a name such as "auto", "cpu", "cuda:1" or "bf16" into a torch device or dtype."""

from __future__ import annotations

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
