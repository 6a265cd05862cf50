"""What machine a measurement ran on: CPU, cores, memory, versions, GPU and its peak bandwidth.

`describe_machine` is the one record every figure carries (`opir profile`'s JSON and the
scripts in bench/), so that a number can always be traced to the hardware that produced it.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from opir_engine.devices import pick_device

# Peak DRAM bandwidth (GB/s) by device-name fragment, used when the driver does not report it.
_PEAK_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("T4", 320.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    """Total memory of the machine (Linux /proc/meminfo), else None."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    return round(int(total.group(1)) / 2**20, 1) if total else None


def peak_bandwidth_gbs(device: torch.device) -> tuple[float | None, str]:
    """(peak DRAM GB/s of the GPU, where the figure comes from); (None, "none") off CUDA."""
    if device.type != "cuda":
        return None, "none"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "driver (2 x clock x bus width)"
    name = torch.cuda.get_device_name(device)
    for fragment, gbs in _PEAK_BANDWIDTH_GBS:
        if fragment in name:
            return gbs, f"datasheet ({fragment})"
    return None, "unknown device"


def describe_machine(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, memory, torch and Python versions, the load right now, and the GPU
    (name, memory, peak bandwidth) when `device` is a CUDA device.

    `device` None describes the device "auto" picks: the GPU where there is one.
    """
    device = pick_device("auto") if device is None else device
    machine: dict[str, Any] = {
        "cpu": cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        machine["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        peak, source = peak_bandwidth_gbs(device)
        machine["gpu_peak_bandwidth_gbs"] = peak
        machine["gpu_peak_bandwidth_source"] = source
    return machine
