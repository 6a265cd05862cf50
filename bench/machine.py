"""What machine a benchmark ran on, and the tag its result files carry (shared by bench/)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def describe_machine() -> dict:
    """CPU model, cores, memory, GPU, torch version and threads, load average now."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def machine_tag(machine: dict) -> str:
    """`amd-epyc-2c` for a 2-core AMD EPYC; the GPU's name where there is one."""
    name = machine.get("gpu") or f"{machine['cpu']}-{machine['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
