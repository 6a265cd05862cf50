"""The markdown model cards beside the weights: generated from the JSON cards, never apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opir_engine.model_card import main, render_card

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
CARDS = sorted(WEIGHTS.glob("*.json"))


def _card(name: str = "opir-small-allinone") -> dict:
    return json.loads((WEIGHTS / f"{name}.json").read_text())


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_committed_markdown_is_the_rendered_json(card: Path) -> None:
    """Regenerate with `python -m opir_engine.model_card weights/NAME.json` after a new card."""
    markdown = card.with_suffix(".md")
    assert markdown.exists(), f"{markdown.name} missing: render it from {card.name}"
    assert markdown.read_text(encoding="utf-8") == render_card(json.loads(card.read_text()))


def test_rendered_card_holds_the_measured_figures() -> None:
    card = _card()
    text = render_card(card)
    validation = card["validation"]
    # Each weather task's table row: its n, PSNR to 2 decimals and signed gain, as measured.
    for task in ("rain", "snow", "haze"):
        row = validation[task]
        line = next(line for line in text.splitlines() if line.startswith(f"| {task} | {row['n']}"))
        assert f"{row['psnr']:.2f} / {row['ssim']:.3f}" in line
        assert f"{row['gain']:+.2f}" in line
        assert f"{row['input_psnr']:.2f}" in line
    # Each source set's row follows its task's row, with its own figures.
    lines = text.splitlines()
    weather = ("rain", "snow", "haze")
    sets = [name for name in validation if "/" in name and name.split("/")[0] in weather]
    assert sets
    for name in sets:
        task, row = name.split("/")[0], validation[name]
        at = next(k for k, line in enumerate(lines) if line.startswith(f"| {name} | {row['n']} |"))
        assert f"{row['psnr']:.2f} / {row['ssim']:.3f}" in lines[at]
        assert any(line.startswith(f"| {task} | ") for line in lines[:at])
    assert f"{100 * validation['head_accuracy']:.1f}% right" in text
    clean = validation["clean"]
    assert f"{100 * clean['identical']:.1f}%" in text
    assert f"{clean['set_psnr']:.2f}" in text


def test_rendered_card_holds_config_recipe_steps_and_lineage() -> None:
    card = _card()
    text = render_card(card)
    assert text.startswith(f"# {card['name']}\n")
    assert f"| training steps | {card['steps']} |" in text
    assert f"{card['wall_time_hours']:.3f} h" in text
    assert f"| lr | `{card['recipe']['lr']}` |" in text
    assert f"| width | `{card['config']['width']}` |" in text
    for folder in card["data"]["clean"]:
        assert f"`{folder}`" in text
    assert "## Lineage" in text


def test_a_fine_tune_lists_its_parents() -> None:
    """A card made with --init names each stage it came from, newest first."""
    parent = {"weights": "runs/a/best.safetensors", "steps": 20, "wall_time_hours": 1.25}
    card = {"name": "tuned", "steps": 10, "wall_time_hours": 0.5,
            "init": {**parent, "recipe": {"config": "small"}, "init": None}}  # fmt: skip
    text = render_card(card)
    lineage = text.split("## Lineage")[1].strip().splitlines()
    assert lineage[0] == "1. this card: 10 steps, 0.500 h"
    assert lineage[1].startswith("1. from `runs/a/best.safetensors`: config `small`, 20 steps")


def test_main_writes_markdown_beside_the_json(tmp_path: Path) -> None:
    source = tmp_path / "m.json"
    source.write_text(json.dumps(_card()))
    main([str(source)])
    assert (tmp_path / "m.md").read_text(encoding="utf-8") == render_card(_card())


def test_rendering_needs_no_torch() -> None:
    code = "import sys, opir_engine.model_card; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
