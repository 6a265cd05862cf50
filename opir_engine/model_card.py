"""The model card as markdown, rendered from the JSON card shipped beside the weights.

    python -m opir_engine.model_card weights/opir-small-allinone.json

writes `weights/opir-small-allinone.md` next to it. The JSON card is the record (written by
`scripts/ship_weights.py`, read by the engine); the markdown is only its readable form, so it
is generated, never edited, and `tests/test_model_card.py` checks the two agree.

Standard library only: rendering a card needs neither torch nor the model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# The weather tasks, in the order the card's tables list them; "clean" and "snow_photos" rows
# measure something else (pass-through, classification only) and get tables of their own.
_WEATHER = ("rain", "snow", "haze")


def _num(value: Any, digits: int = 2, sign: bool = False) -> str:
    """A measured figure as text; "-" where the card has none (null)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pct(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _code(value: Any) -> str:
    """A value in backticks, lists and dicts as compact JSON."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return f"`{text}`"


def _settings(values: dict[str, Any]) -> list[str]:
    return _table(("setting", "value"), ((key, _code(value)) for key, value in values.items()))


def _data(data: dict[str, Any]) -> list[str]:
    rows = [
        (f"{task} pairs", ", ".join(f"`{folder}`" for folder in folders))
        for task, folders in data.get("paired", {}).items()
    ]
    rows += [
        (f"{task} photos (no ground truth)", ", ".join(f"`{folder}`" for folder in folders))
        for task, folders in data.get("photos", {}).items()
    ]
    if data.get("clean"):
        rows.append(("clean photos", ", ".join(f"`{folder}`" for folder in data["clean"])))
    for key in ("split", "data_root"):
        if data.get(key):
            rows.append((key, f"`{data[key]}`"))
    return _table(("data", "folders"), rows)


def _validation(validation: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    weather = [task for task in _WEATHER if task in validation]
    if weather:
        header = ("task", "n", "input PSNR / SSIM", "PSNR / SSIM", "gain (dB)", "set PSNR",
                  "baseline", "baseline PSNR / SSIM", "class right")  # fmt: skip
        # each task's row, then its source sets' rows (`task/set`, from `--per-set`)
        names = [name for task in weather for name in validation
                 if name == task or name.startswith(f"{task}/")]  # fmt: skip
        rows = [
            (
                name,
                str(r["n"]),
                f"{_num(r['input_psnr'])} / {_num(r['input_ssim'], 3)}",
                f"{_num(r['psnr'])} / {_num(r['ssim'], 3)}",
                _num(r.get("gain"), sign=True),
                _num(r.get("set_psnr")),
                str(r.get("baseline", "-")),
                f"{_num(r.get('baseline_psnr'))} / {_num(r.get('baseline_ssim'), 3)}",
                _pct(r.get("head_accuracy")),
            )
            for name, r in ((name, validation[name]) for name in names)
        ]
        lines += _table(header, rows)
    if "clean" in validation:
        note = "Clean photos: those `--task auto` calls clean come back unchanged"
        if "clean_under_weather" in validation:
            note += ("; `clean_under_weather` restores each under a weather's task instead, "
                     "what a wrong call costs")  # fmt: skip
        lines += ["", note + "."]
        header = ("set", "n", "returned unchanged", "PSNR / SSIM of the rest", "lowest PSNR",
                  "set PSNR", "class right")  # fmt: skip
        rows = [
            (
                name,
                str(r["n"]),
                _pct(r.get("identical")),
                f"{_num(r['psnr'])} / {_num(r['ssim'], 4)}",
                _num(r.get("min_psnr")),
                _num(r.get("set_psnr")),
                _pct(r.get("head_accuracy")),
            )
            for name, r in validation.items()
            if name == "clean" or name.startswith("clean_under_weather")
        ]
        lines += ["", *_table(header, rows)]
    photo_sets = [k for k, v in validation.items() if isinstance(v, dict) and k.endswith("_photos")]
    if photo_sets:
        lines += ["", "Real degraded photos without ground truth: the classifier's accuracy only."]
        rows = [(k, str(validation[k]["n"]), _pct(validation[k].get("head_accuracy")))
                for k in photo_sets]  # fmt: skip
        lines += ["", *_table(("set", "n", "class right"), rows)]
    if validation.get("head_accuracy") is not None:
        channel = validation.get("channel", "RGB")
        lines += ["", f"All classes together: {_pct(validation['head_accuracy'])} right "
                      f"(PSNR/SSIM on {channel})."]  # fmt: skip
    return lines


def _classifier(report: dict[str, Any]) -> list[str]:
    lines = [f"Trained by `opir train-classifier` from `{report.get('source', '-')}`"
             + (f", copied from `{report['transplanted_from']}`"
                if report.get("transplanted_from") else "")
             + f"; {report.get('parameters', '-')} parameters, "
             f"{_num(report.get('train_seconds'), 0)} s of training."]  # fmt: skip
    if report.get("recipe"):
        lines += ["", *_settings(report["recipe"])]
    if report.get("data"):
        lines += ["", *_data(report["data"])]
    if report.get("views"):
        kinds = sorted({kind for counts in report["views"].values() for kind in counts})
        rows = [(cls, *(str(counts.get(kind, 0)) for kind in kinds))
                for cls, counts in report["views"].items()]  # fmt: skip
        lines += ["", "Training views per class:", "", *_table(("class", *kinds), rows)]
    held = report.get("held_out")
    if held:
        lines += ["", f"Held-out views: {held.get('views')}, accuracy "
                      f"{_pct(held.get('accuracy'))} (loss {_num(held.get('loss'), 4)}) at step "
                      f"{held.get('step')}."]  # fmt: skip
    threshold = report.get("clean_threshold")
    if threshold:
        lines += ["", f"`clean_threshold` {_num(threshold.get('value'))}, chosen on "
                      f"{threshold.get('chosen_on', '-')}: {threshold.get('rule', '-')} "
                      f"(standard error {_num(threshold.get('standard_error'), 4)})."]  # fmt: skip
        balanced = threshold.get("balanced_accuracy", {})
        if balanced:
            row = ("balanced accuracy", *(_num(v, 4) for v in balanced.values()))
            lines += ["", *_table(("threshold", *balanced), [row])]
    return lines


def _lineage(card: dict[str, Any]) -> list[str]:
    """Where the weights came from: the card's `init` chain, newest first."""
    lines = [f"1. this card: {card.get('steps', '-')} steps, "
             f"{_num(card.get('wall_time_hours'), 3)} h"]  # fmt: skip
    node = card.get("init")
    while node:
        recipe = node.get("recipe") or {}
        grown = " (grown into a deeper config)" if node.get("grown_from") else ""
        lines.append(f"1. from `{node.get('weights', '-')}`{grown}: config "
                     f"`{recipe.get('config', '-')}`, {node.get('steps', '-')} steps, "
                     f"{_num(node.get('wall_time_hours'), 3)} h")  # fmt: skip
        node = node.get("init")
    if not card.get("init"):
        lines.append("1. trained from scratch (no `init`)")
    return lines


def render_card(card: dict[str, Any]) -> str:
    """The markdown of a JSON model card (as `weights/*.json` hold them)."""
    name = card.get("name", "opir")
    out = [
        f"# {name}",
        "",
        f"<!-- Generated from {name}.json by `python -m opir_engine.model_card`: "
        "edit the JSON, not this file. -->",
        "",
    ]
    summary = [
        ("classes", ", ".join(card.get("classes", []))),
        ("parameters", str(card.get("parameters", "-"))),
        ("training steps", str(card.get("steps", "-"))),
        ("wall time", f"{_num(card.get('wall_time_hours'), 3)} h"),
        ("machine", str(card.get("machine", "-"))),
    ]
    total = card.get("training_total")
    if total:
        summary.append(("all stages", f"{total.get('steps')} steps, "
                                      f"{_num(total.get('wall_time_hours'), 3)} h"))  # fmt: skip
    out += _table(("", ""), summary)
    if card.get("notes"):
        out += ["", *(f"- {note}" for note in card["notes"])]
    if card.get("validation"):
        out += ["", "## Measured figures", ""]
        if card.get("validation_protocol"):
            out += [f"Protocol: {card['validation_protocol']}.", ""]
        out += _validation(card["validation"])
    if card.get("config"):
        out += ["", "## Config", "", *_settings(card["config"])]
    if card.get("recipe"):
        out += ["", "## Training recipe", "", *_settings(card["recipe"])]
    if card.get("data"):
        out += ["", "## Training data", "", *_data(card["data"])]
    if card.get("training_curve"):
        rows = [(str(p["step"]), _num(p.get("mean_gain_db"), 3), _pct(p.get("head_accuracy")))
                for p in card["training_curve"]]  # fmt: skip
        out += ["", "## Training curve (training validation)", ""]
        out += _table(("step", "mean gain (dB)", "class right"), rows)
    if card.get("classifier_training"):
        out += ["", "## Classifier", "", *_classifier(card["classifier_training"])]
    out += ["", "## Lineage", "", *_lineage(card)]
    if card.get("reproduce"):
        # A step is a command in code, or a sentence (such as "then ..." with its options).
        steps = (f"- `{s}`" if s.startswith("opir ") else f"- {s}" for s in card["reproduce"])
        out += ["", "## Reproduce", "", *steps]
    paper = card.get("paper_reference")
    if paper:
        out += ["", "## Paper reference (not measured here)", ""]
        if paper.get("note"):
            out += [paper["note"], ""]
        rows = [(task, _num(paper[task].get("psnr")), _num(paper[task].get("ssim"), 3))
                for task in _WEATHER if task in paper]  # fmt: skip
        out += _table(("task", "PSNR", "SSIM"), rows)
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Write CARD.md beside each CARD.json given."""
    parser = argparse.ArgumentParser(description="Render JSON model cards as markdown beside them.")
    parser.add_argument("cards", nargs="+", type=Path, help="JSON model cards")
    args = parser.parse_args(argv)
    for path in args.cards:
        target = path.with_suffix(".md")
        target.write_text(render_card(json.loads(path.read_text())), encoding="utf-8")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
