"""Large photos at full size against the working side (opir_engine/working_scale.py).

    python bench/working_scale.py                       # shipped weights, this machine
    python bench/working_scale.py --factor 3 --sides 512,768,1024 --every 3

The shipped model learned weather on photos at most 512 px long. This measures what a user with
larger photos gets, for each working side and at full size (side 0), with the task given (so
the head's choice does not blur the comparison):

- held-out pairs enlarged: every `--every`-th rain, haze and synthetic-snow pair of the
  validation split, input and target enlarged `--factor` times (bicubic, then rounded to 8 bits),
  so that the weather is `--factor` times larger than the model saw it. Enlarged photos carry
  less fine detail than real large ones, which flatters the working side a little (the detail
  it cannot restore is smaller);
- the real large pairs of the data (long side over 1000 px; Rain13K and GT-RAIN). These were in
  the training set, seen shrunk to 512 px: they show real large rain, not held-out quality.

PSNR (RGB, 8-bit outputs) and seconds per image; results go beside this script:
results/working_scale-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

from opir_engine.datasets import find_paired_sets
from opir_engine.evaluation.metrics import psnr
from opir_engine.evaluation.scoring import validation_items
from opir_engine.evaluation.weather_left import weather_left
from opir_engine.image_io import read_image
from opir_engine.inference.engine import OPIREngine
from opir_engine.inference.streaks import streak_energy

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _enlarge(x: torch.Tensor, factor: float) -> torch.Tensor:
    size = (round(x.shape[-2] * factor), round(x.shape[-1] * factor))
    out = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False)[0]
    return _quantize(out)


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str, torch.Tensor, torch.Tensor]]:
    """(kind, task, name, degraded, target)."""
    items = validation_items(args.split, args.data_root)
    weather = [it for it in items if it[0] in ("rain", "haze", "snow")]
    kind = f"held-out x{args.factor:g}"
    cases = [
        (kind, task, name, _enlarge(d, args.factor), _enlarge(t, args.factor))
        for task, name, d, t in weather[args.start :: args.every]
    ]
    for task in ("rain", "haze"):
        for pair in find_paired_sets(args.data_root / task, task):
            image = read_image(pair.input).rgb
            if max(image.shape[-2:]) > 1000:
                name = str(pair.input.relative_to(args.data_root))
                target = read_image(pair.target).rgb
                cases.append(("real large (training)", task, name, image, target))
    return cases


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="opir-small-allinone")
    parser.add_argument("--split", type=Path, default=ROOT / "splits" / "validation-v2.json")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--every", type=int, default=3, help="every N-th held-out pair")
    parser.add_argument("--start", type=int, default=0, help="the first of them")
    parser.add_argument("--name", default="", help="appended to the results' file names")
    parser.add_argument(
        "--sides", default="512,768,1024,1536,0,auto", help="0: full size; auto: chosen per photo"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = [s if s == "auto" else int(s) for s in args.sides.split(",")]
    engines = {
        s: OPIREngine.from_pretrained(args.weights, compile=False, work_side=s or None)
        for s in sides
    }
    machine = describe_machine()
    rows = []
    for kind, task, name, degraded, target in _cases(args):
        row = {"kind": kind, "task": task, "name": name, "size": list(degraded.shape[-2:])}
        row["input_psnr"] = psnr(degraded, target)
        input_lines = streak_energy(degraded)  # once per photo, for every side
        for side, engine in engines.items():
            t0 = time.perf_counter()
            result = engine.restore(degraded, task=task)
            seconds = time.perf_counter() - t0
            output = _quantize(result.image)
            row[f"psnr_{side}"] = psnr(output, target)
            row[f"seconds_{side}"] = seconds
            # what each candidate rule for choosing the side per photo would read: weather left
            # (needs the target), and three figures a user's photo has (no target)
            row[f"left_{side}"] = weather_left(degraded, output, target)
            row[f"lines_{side}"] = streak_energy(output) / max(input_lines, 1e-12)
            row[f"uncertainty_{side}"] = float(result.uncertainty.mean())
            row[f"change_{side}"] = float((output - degraded).abs().mean())
            row[f"work_size_{side}"] = result.work_size
        rows.append(row)
        gains = " ".join(f"{s}:{row[f'psnr_{s}'] - row['input_psnr']:+.2f}" for s in sides)
        print(f"{kind:22s} {task:5s} {row['size']} {gains}", flush=True)

    lines = [
        "# Working side: large photos restored shrunk, the correction carried back",
        "",
        *(f"- {k}: {v}" for k, v in machine.items()),
        f"- weights: {args.weights}; factor {args.factor:g}, every {args.every}-th held-out pair",
        "",
        "Mean PSNR gain over the input (dB), weather left (evaluation/weather_left.py: the "
        "streak amplitude left, output against input; rain and snow) and seconds per image, per "
        "working side (full: full size; auto: chosen per photo, the side it chose per image "
        "below), task given.",
        "",
        "| cases | task | n | " + " | ".join(f"side {s or 'full'}" for s in sides) + " |",
        "|---|---|---|" + "---|" * len(sides),
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["task"]), []).append(row)
    for (kind, task), group in groups.items():
        cells = []
        for s in sides:
            gain = statistics.mean(r[f"psnr_{s}"] - r["input_psnr"] for r in group)
            secs = statistics.mean(r[f"seconds_{s}"] for r in group)
            left = [r[f"left_{s}"] for r in group if r[f"left_{s}"] is not None]
            left_cell = f"{statistics.mean(left):.0%} left, " if task != "haze" and left else ""
            cells.append(f"{gain:+.2f} dB, {left_cell}{secs:.1f} s")
        lines.append(f"| {kind} | {task} | {len(group)} | " + " | ".join(cells) + " |")
    names = [str(s or "full") for s in sides]
    lines += ["", "Per image, PSNR:", "", "| name | size | input | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(sides)]  # fmt: skip
    for r in rows:
        cells = [f"{r[f'psnr_{s}']:.2f}" for s in sides]
        if "auto" in sides and r["work_size_auto"]:
            cells[sides.index("auto")] += f" (at {max(r['work_size_auto'])})"
        lines.append(f"| {r['name']} | {r['size'][1]}x{r['size'][0]} | {r['input_psnr']:.2f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = machine_tag(machine) + (f"-{args.name}" if args.name else "")
    (RESULTS / f"working_scale-{tag}.md").write_text(text)
    settings = vars(args) | {"split": str(args.split), "data_root": str(args.data_root)}
    record = {"machine": machine, "args": settings, "rows": rows}
    (RESULTS / f"working_scale-{tag}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
