"""What machine a benchmark ran on, and the tag its result files carry (shared by bench/).

The record is the library's (opir_engine.profiling.machine.describe_machine), the same one
`opir profile` writes: CPU, cores, memory, versions, load, and the GPU where there is one.
"""

from __future__ import annotations

import re

from opir_engine.profiling.machine import describe_machine

__all__ = ["describe_machine", "machine_tag"]


def machine_tag(machine: dict) -> str:
    """`amd-epyc-2c` for a 2-core AMD EPYC; the GPU's name where there is one."""
    name = machine.get("gpu") or f"{machine['cpu']}-{machine['logical_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
