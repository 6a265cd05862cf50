"""Two checkpoints side by side on chosen held-out images: input | A | B | target crops, each
output's PSNR and task in the row's label, through the engine with `--task auto` (what a user
of each would get). For judging a candidate by pictures, rows that lose and rows that gain.

    python scripts/compare_sheet.py weights/opir-small-allinone.safetensors CANDIDATE \\
        --split splits/validation-v4.json --data-root ../shared/data \\
        --item rain/GT-RAIN-webcam/input/s003_r009.png --item haze/Dense-Haze/input/55.png \\
        --pair samples/rocket_haze.jpg samples/clean/rocket_haze.png --out sheet.jpg

--item takes a split item's name: a pair's input path (`rain/GT-RAIN-webcam/input/...`), or
TASK=NAME for the rows drawn on clean photos (`haze=synthetic:clean/BSDS500_test/97010.jpg`);
--pair takes any input and its clean target.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from opir_engine.evaluation.contact_sheet import write_contact_sheet
from opir_engine.evaluation.metrics import psnr
from opir_engine.evaluation.scoring import source_set, validation_items
from opir_engine.image_io import as_8bit, read_image
from opir_engine.inference.engine import OPIREngine


def chosen_items(
    split: Path, data_root: Path, names: list[tuple[str, str]]
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, degraded, target) of each (task, name) of the split, in the order given."""
    items = {(task, name): (x, y) for task, name, x, y in validation_items(split, data_root)}
    missing = [f"{task} {name}" for task, name in names if (task, name) not in items]
    if missing:
        raise SystemExit(f"not in {split}: {', '.join(missing)}")
    return [(f"{task}/{source_set(name)} {Path(name).stem}", *items[task, name])
            for task, name in names]  # fmt: skip


def _task_and_name(item: str) -> tuple[str, str]:
    """`rain/GT-RAIN-webcam/input/x.png` -> (rain, that path); `haze=synthetic:clean/...` ->
    (haze, synthetic:clean/...)."""
    if "=" in item:
        task, name = item.split("=", 1)
        return task, name
    return item.split("/", 1)[0], item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="weights of the first column (the reference)")
    parser.add_argument("b", type=Path, help="weights of the second column (the candidate)")
    parser.add_argument("--split", type=Path)
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--item", action="append", default=[],
                        help="a split item's name, or TASK=NAME for a synthetic row")  # fmt: skip
    parser.add_argument("--pair", nargs=2, action="append", default=[], type=Path,
                        metavar=("INPUT", "TARGET"))  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.item and not (args.split and args.data_root):
        parser.error("--item needs --split and --data-root")
    if not (args.item or args.pair):
        parser.error("nothing to compare: give --item or --pair")

    names = [_task_and_name(i) for i in args.item]
    rows = chosen_items(args.split, args.data_root, names) if names else []
    rows += [(x.stem, read_image(x).rgb, read_image(y).rgb) for x, y in args.pair]
    engines = [OPIREngine.from_pretrained(w, device="cpu", compile=False) for w in (args.a, args.b)]
    sheet = []
    for label, degraded, target in rows:
        outputs, notes = [], []
        for engine in engines:
            result = engine.restore(degraded)
            restored = as_8bit(result.image)  # what a saved 8-bit file holds
            outputs.append(restored)
            notes.append(f"{psnr(restored, target):.2f} dB ({result.task})")
        line = f"{label}: input {psnr(degraded, target):.2f}, A {notes[0]}, B {notes[1]}"
        print(line)
        sheet.append((line, degraded, *outputs, target))
    panels = ("input", f"A {args.a.stem}", f"B {args.b.stem}", "target")
    print(f"wrote {write_contact_sheet(args.out, sheet, panels)}")


if __name__ == "__main__":
    main()
