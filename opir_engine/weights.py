"""Checkpoints: safetensors weights (never pickle) with a JSON model card beside them.

`name.safetensors` holds the tensors; `name.json` holds the card: config, classes, training
recipe and data, steps, wall time and the validation metrics measured. The config is also
stored in the safetensors metadata, so a weights file alone still says what it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opir_engine.model import OPIR, OPIRConfig
from opir_engine.shipped import (  # noqa: F401  (the checkpoint API is one import for callers)
    DEFAULT_WEIGHTS,
    CheckpointError,
    card_path,
    list_shipped,
    read_card,
    resolve_weights,
)


def save_checkpoint(path: Path, model: OPIR, card: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and its card (.json) atomically."""
    path = Path(path)
    card = {**card, "config": model.config.to_dict()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.part")
    save_file(tensors, str(tmp), metadata={"format": "pt", "config": json.dumps(card["config"])})
    os.replace(tmp, path)
    tmp_card = card_path(path).with_name(f".{card_path(path).name}.part")
    tmp_card.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp_card, card_path(path))


def load_checkpoint(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[OPIR, dict[str, Any]]:
    """Build the model on the meta device, then load the tensors in place (`assign=True`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    card = read_card(path)
    try:
        config = OPIRConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the card's config is invalid ({e})") from e
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            # clone: the tensors sit at the file's offsets, not 64-byte aligned, and CPU
            # kernels take other (slower, last-bit different) paths on unaligned weights
            state = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights, truncated or corrupt ({e})") from e
    with torch.device("meta"):
        model = OPIR(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[key].shape)}"
            )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval(), card
