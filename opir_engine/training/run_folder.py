"""What a run directory holds besides the model's checkpoints: files written atomically, the
optimizer's state as safetensors plus JSON, and the machine a run trained on.

State is always saved as CPU tensors: a run resumes on another kind of device, and its files
load anywhere.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `path`, then rename it over `path`: a run stopped
    mid-write keeps the previous file whole."""
    tmp = path.with_name(f".{path.name}.part")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def save_model_state(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp)))


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """The state tensors to `path`; returns the rest (the param groups), to be kept as JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.contiguous().cpu()  # loads on any device (load_state_dict moves it)
        for idx, entries in state["state"].items()
        for name, value in entries.items()
    }
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
    return {"param_groups": state["param_groups"]}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, path: Path, meta: dict[str, Any]
) -> None:
    """Restore what `save_optimizer_state` wrote to `path` and returned as `meta`."""
    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    # JSON turned the betas tuple into a list; restore it so the state matches a straight run
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def machine_description(device: torch.device | None = None) -> str:
    """The CPU, its cores and torch's version, and the GPU when `device` is a CUDA one."""
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        machine += f", {device} ({torch.cuda.get_device_name(device)})"
    return machine
