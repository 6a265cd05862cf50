"""`opir models`: the shipped checkpoints and their cards' summary, listed without torch (the
cards are JSON beside the weights; `opir_engine.shipped`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from opir_engine.shipped import CheckpointError, list_shipped, read_card


def print_models() -> None:
    table = Table(title="shipped checkpoints")
    for column in ("name", "config", "params", "steps", "validation (PSNR in -> out)"):
        table.add_column(column)
    for name, path in list_shipped():
        try:
            card = read_card(path)
        except CheckpointError as e:  # one broken card must not hide the others
            table.add_row(name, "-", "-", "-", f"unreadable card: {e}")
            continue
        val = card.get("validation") or {}
        gains = ", ".join(
            f"{t} {val[t]['input_psnr']:.1f}->{val[t]['psnr']:.1f}"
            for t in ("rain", "snow", "haze")
            if isinstance(val.get(t), dict) and val[t].get("input_psnr") is not None
        )  # fmt: skip
        cfg = card.get("config", {})
        table.add_row(name, f"width {cfg.get('width')}", str(card.get("parameters", "?")),
                      str(card.get("steps", "?")), gains or "-")  # fmt: skip
    Console().print(table)
