"""The shipped checkpoints and the cards beside any checkpoint, read without torch: what `opir
models` lists and how a name becomes a path. Loading and saving the weights themselves is
`weights.py`'s (which re-exports all of this)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from opir_weights import DEFAULT

DEFAULT_WEIGHTS = DEFAULT  # the shipped checkpoint used when none is named


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, or does not match its config."""


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_card(path: Path) -> dict[str, Any]:
    """The card beside `path`, or one built from the safetensors metadata if it is absent."""
    path = Path(path)
    if card_path(path).is_file():
        try:
            return json.loads(card_path(path).read_text())
        except ValueError as e:
            raise CheckpointError(f"{card_path(path)}: card is not valid JSON ({e})") from e
    from safetensors import safe_open  # only for a checkpoint without its card

    try:
        with safe_open(str(path), framework="numpy") as f:  # the header alone: no tensor read
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if "config" not in meta:
        raise CheckpointError(f"{path}: no model card beside it and no config in its metadata")
    return {"config": json.loads(meta["config"])}


def resolve_weights(name_or_path: str | Path) -> Path:
    """A shipped checkpoint's name (see `list_shipped`) or a path to a .safetensors file."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists() or len(path.parts) > 1:
        return path
    shipped = resources.files("opir_weights") / f"{name_or_path}.safetensors"
    if not shipped.is_file():
        names = ", ".join(n for n, _ in list_shipped()) or "none"
        raise CheckpointError(
            f"{name_or_path}: no shipped checkpoint of that name (shipped: {names})"
        )
    return Path(str(shipped))


def list_shipped() -> list[tuple[str, Path]]:
    """(name, path) of every checkpoint in the installed `opir_weights` package."""
    folder = resources.files("opir_weights")
    return sorted(
        (entry.name.removesuffix(".safetensors"), Path(str(entry)))
        for entry in folder.iterdir()
        if entry.name.endswith(".safetensors")
    )
