"""Ship a run's checkpoint as `weights/NAME.safetensors` with a measured model card.

    python scripts/ship_weights.py runs/small-allinone opir-small-allinone \
        --split splits/validation.json --data-root ../shared/data \
        [--checkpoint runs/small-allinone/best-classifier.safetensors]

--checkpoint defaults to the run's best.safetensors; pass the output of `opir
train-classifier` to ship the run's weights with their trained `--task auto` classifier.
--haze-sides 384,256:0.9 writes `haze_sides` into the card, so the engine chooses a hazy photo's
working side by the least dark channel (docs/design.md) and the card is measured that way; a
side's `:P` is the least probability of haze at which it is tried (0 when left out).
--out writes the checkpoint elsewhere (to compare a candidate with the shipped card before
replacing it). The script ends by printing the README's table rows from the new card.

The card's `validation` table is measured here, through the engine, a row per task and per
source set under it (`opir eval --weights ... --split ... --per-set` prints the same numbers),
on the held-out split; the training card of the run (config, recipe, data, steps, wall time,
machine) is kept, and the run's validation history (from log.jsonl) is summarised as the
training curve.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from opir_engine.cli.reproduce import train_command
from opir_engine.evaluation.scoring import (
    evaluate_clean_under_weather,
    evaluate_engine,
    evaluate_head,
    photo_items,
    rows_to_card,
    validation_items,
)
from opir_engine.inference.engine import OPIREngine
from opir_engine.inference.working_scale import card_haze_sides
from opir_engine.training.recipe import DataSpec, Recipe, lineage
from opir_engine.weights import load_checkpoint, save_checkpoint

PAPER_TABLE_1 = {
    "note": "The paper's own all-in-one results (Table 1, full-size OPIR, trained on 13k+ pairs, "
    "tested on Test100 / Snow100K / SOTS-Outdoor): NOT measured by opir, for reference only.",
    "rain": {"psnr": 31.96, "ssim": 0.914},
    "snow": {"psnr": 34.14, "ssim": 0.959},
    "haze": {"psnr": 35.96, "ssim": 0.984},
}


def training_curve(run_dir: Path) -> list[dict]:
    curve = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "validation" in entry:
            v = entry["validation"]
            curve.append({"step": entry["step"], "mean_gain_db": round(v["mean_gain"], 3),
                          "head_accuracy": round(v["head_accuracy"], 3)})  # fmt: skip
    return curve


def classifier_command(recipe: dict) -> str:
    """The `opir train-classifier` step, with the options its recipe used."""
    options = "".join(
        f" --{flag} {recipe[key]}"
        for flag, key in (("views", "views_per_class"), ("steps", "steps"), ("width", "width"))
        if key in recipe
    )
    return (
        f"then opir train-classifier RUN/best.safetensors --out RUN/best-classifier.safetensors"
        f"{options} with the same --data, --clean, --split and --data-root, plus --photos "
        "snow=DATA/snow/real_snow_samples/real (the classifier reads the image alone: "
        "train-classifier --from copies a trained one onto other weights)"
    )


def _run_dirs(stages: list[dict]) -> list[str]:
    """Where each stage's run went: the folder of the next stage's init weights when those are
    a run's best or last checkpoint, else a placeholder; the last stage is RUN."""
    dirs = []
    for k, later in enumerate(stages[1:], start=1):
        init = Path(later["init_weights"] or "")
        dirs.append(str(init.parent) if init.name in ("best.safetensors", "last.safetensors")
                    else f"RUN{k}")  # fmt: skip
    return [*dirs, "RUN"]


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def readme_rows(validation: dict) -> list[str]:
    """The README's table of the shipped model, from a card's `validation` entry."""
    lines = []
    for task, label in (("rain", "rain (real pairs)"), ("snow", "snow (synthetic)"),
                        ("haze", "haze (real pairs)")):  # fmt: skip
        r = validation[task]
        lines.append(
            f"| {label} | {r['n']} | {_f(r['input_psnr'], 2)} / {_f(r['input_ssim'], 3)} | "
            f"{_f(r['psnr'], 2)} / {_f(r['ssim'], 3)} | {r['gain']:+.2f} dB | {r['baseline']} | "
            f"{_f(r['baseline_psnr'], 2)} / {_f(r['baseline_ssim'], 3)} | "
            f"{100 * r['head_accuracy']:.0f}% |"
        )
    c = validation["clean"]
    lines.append(
        f"| clean photos | {c['n']} | - | {100 * c['identical']:.0f}% returned unchanged; the "
        f"rest {_f(c['psnr'], 2)} / {_f(c['ssim'], 3)}; all {c['n']} as one set "
        f"{_f(c.get('set_psnr'), 2)} dB | | | | {100 * c['head_accuracy']:.0f}% |"
    )
    if "snow_photos" in validation:
        p = validation["snow_photos"]
        lines.append(f"| snow ({p['n']} real photos, no ground truth) | {p['n']} | | | | | | "
                     f"{100 * p['head_accuracy']:.0f}% |")  # fmt: skip
    lines.append(f"all four classes: {100 * validation['head_accuracy']:.1f}% right")
    return lines


def relative_folders(data: dict) -> dict:
    """A card's `data` with absolute folders written relative to here, as `data_root` is, so
    that the reproduce commands name them under DATA on any machine."""

    def relative(value: object) -> object:
        if isinstance(value, str) and Path(value).is_absolute():
            return os.path.relpath(value)
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        return value

    return {k: (v if k == "data_root" else relative(v)) for k, v in data.items()}


def training_stages(card: dict) -> list[dict]:
    """`lineage(card)` with every stage's folders written relative to here, so that each
    reproduce line names them under DATA (a parent stage started with absolute folders recorded
    them so: /work/main/../shared/data/rain)."""
    return [{**stage, "data": relative_folders(stage["data"] or {})} for stage in lineage(card)]


def parse_haze_sides(text: str) -> tuple[tuple[int, float], ...]:
    """`384,256:0.9` as ((384, 0.0), (256, 0.9)), checked as the engine checks a card."""
    try:
        listed = [
            [int(side), float(least or 0)]
            for side, _, least in (entry.partition(":") for entry in text.split(","))
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SIDE[:P],... such as 384,256:0.9"
        ) from None
    try:
        return card_haze_sides(listed)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: weights/NAME")
    parser.add_argument("--note", action="append", default=[], help="a line for the card")
    parser.add_argument(
        "--haze-sides", default=None, type=parse_haze_sides,
        help="e.g. 384,256:0.9: the card asks the engine to restore a hazy photo at full size and "
        "these sides (256 only when the haze probability is at least 0.9) and keep the one with "
        "the least veil (docs/design.md); measured with it",
    )  # fmt: skip
    args = parser.parse_args()

    source = args.checkpoint or args.run_dir / "best.safetensors"
    model, card = load_checkpoint(source)
    # A run started with --init names its origin in run.json (cards written by an older opir
    # mid-run may lack it): each stage's recipe, data, steps and hours go into the card.
    run_info = json.loads((args.run_dir / "run.json").read_text())
    card["init"] = card.get("init") or run_info.get("init")
    card["data"] = relative_folders(card.get("data") or {})
    stages = training_stages(card)
    if args.haze_sides:
        card["haze_sides"] = [list(entry) for entry in args.haze_sides]
    engine = OPIREngine(model, card, torch.device("cpu"), torch.float32, compile=False)
    items = validation_items(args.split, args.data_root)
    rows = evaluate_engine(engine, items, per_set=True)
    rows += evaluate_clean_under_weather(engine, items)
    rows += evaluate_head(engine, photo_items(args.split, args.data_root))
    card = {
        **card,
        "name": args.name,
        "parameters": sum(p.numel() for p in model.parameters()),  # the classifier may differ
        "validation": rows_to_card(rows, y_channel=False),
        "validation_protocol": (
            f"held-out split {args.split.as_posix()}; engine with --task auto (tile 512, overlap "
            "32); outputs rounded to 8 bits; PSNR/SSIM on RGB; snow pairs synthesized from "
            "held-out clean photos (no real snow pairs exist in the data); snow_photos: real "
            "snowy photos without ground truth, classifier accuracy only (not in head_accuracy)"
        ),
        "training_curve": training_curve(args.run_dir),
        "paper_reference": PAPER_TABLE_1,
        **({"notes": args.note} if args.note else {}),
        "training_total": {
            "steps": sum(stage["steps"] or 0 for stage in stages),
            "wall_time_hours": round(sum(stage["wall_time_hours"] or 0 for stage in stages), 3),
        },
        "reproduce": [
            train_command(
                Recipe.from_dict(stage["recipe"]),
                DataSpec(**stage["data"]),
                stage["init_weights"],
                out,
                changes=stage["recipe_changes"],
            )
            for stage, out in zip(stages, _run_dirs(stages), strict=True)
        ]
        + [classifier_command(card.get("classifier_training", {}).get("recipe", {}))],
    }
    out = args.out or Path(__file__).resolve().parents[1] / "weights" / f"{args.name}.safetensors"
    save_checkpoint(out, model, card)
    for row in rows:
        print(row)
    print(f"wrote {out}")
    print("\n".join(readme_rows(card["validation"])))


if __name__ == "__main__":
    main()
