"""Does the op's native CPU kernel pay end to end? The engine restoring real photos on the CPU,
eagerly (as `opir restore` runs there), with the op on the native kernels and on the PyTorch
reference, interleaved in one process so that both see the same machine load.

    python bench/native_end_to_end.py                 # results in bench/results/
    python bench/native_end_to_end.py --reps 5 --threads 1

Per photo and backend: the median of `--reps` timed `engine.restore(photo, task="rain")` calls
(the task is forced so that every photo runs the restoration network; backends alternate which
goes first). The same run restores samples/ with `opir restore --format png` under
OPIR_KERNEL=native and OPIR_KERNEL=reference and counts the 8-bit values that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)
from PIL import Image

from opir_engine.inference.engine import OPIREngine
from opir_engine.weights import DEFAULT_WEIGHTS
from opir_kernels.inverse_operator import kernel_backend

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("native", "reference")


def _photos() -> dict[str, Image.Image]:
    """The samples as they are, and one resized to 1024x768 (the engine's default working side)."""
    photos = {p.name: Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))}
    photos["chelsea_rain.jpg@1024x768"] = photos["chelsea_rain.jpg"].resize(
        (1024, 768), Image.Resampling.BICUBIC
    )
    return photos


def time_engine(reps: int) -> list[dict]:
    engine = OPIREngine.from_pretrained(DEFAULT_WEIGHTS, compile=False)
    rows = []
    for name, photo in _photos().items():
        times: dict[str, list[float]] = {b: [] for b in BACKENDS}
        outputs: dict[str, torch.Tensor] = {}
        for rep in range(reps + 1):  # the first round warms up, untimed
            order = BACKENDS if rep % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                with kernel_backend(backend):
                    start = time.perf_counter()
                    result = engine.restore(photo, task="rain")
                    elapsed = time.perf_counter() - start
                if rep:
                    times[backend].append(elapsed)
                outputs[backend] = result.image
        medians = {b: statistics.median(t) for b, t in times.items()}
        diff = (outputs["native"].float() - outputs["reference"].float()).abs().max().item()
        row = {
            "photo": name,
            "size": "x".join(map(str, photo.size)),
            **{f"{b}_s": [round(t, 3) for t in times[b]] for b in BACKENDS},
            **{f"{b}_median_s": round(medians[b], 3) for b in BACKENDS},
            "native_speedup": round(medians["reference"] / medians["native"], 3),
            "max_abs_output_diff": diff,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def compare_restore_cli() -> list[dict]:
    """`opir restore samples/ OUT --format png` under each backend; 8-bit values that differ."""
    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            env = {**os.environ, "OPIR_KERNEL": backend}
            command = [sys.executable, "-c", "from opir_engine.cli.app import main; main()"]
            command += ["restore", str(SAMPLES), f"{tmp}/{backend}", "--format", "png"]
            subprocess.run(command, env=env, check=True, capture_output=True)
        rows = []
        for path in sorted(Path(tmp, "native").glob("*.png")):
            a = np.asarray(Image.open(path)).astype(np.int64)
            b = np.asarray(Image.open(Path(tmp, "reference", path.name))).astype(np.int64)
            rows.append(
                {
                    "file": path.name,
                    "identical": path.read_bytes()
                    == Path(tmp, "reference", path.name).read_bytes(),
                    "values_differing": int((a != b).sum()),
                    "values": int(a.size),
                    "max_level_diff": int(np.abs(a - b).max()),
                }
            )
    print(json.dumps(rows), flush=True)
    return rows


def write_markdown(path: Path, report: dict) -> None:
    lines = [
        "# The native CPU kernel end to end: engine on real photos, native vs reference",
        "",
        f"Machine: `{json.dumps(report['machine'])}`",
        "",
        f"torch threads: {report['threads']}; {report['reps']} timed runs per photo and backend, "
        'interleaved; `engine.restore(photo, task="rain")`, eager, fp32, default tile 512.',
        "",
        "| photo | size | native (median s) | reference (median s) | speed-up | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["engine"]:
        lines.append(
            f"| {r['photo']} | {r['size']} | {r['native_median_s']} | "
            f"{r['reference_median_s']} | {r['native_speedup']}x | "
            f"{r['max_abs_output_diff']:.2e} |"
        )
    lines += [
        "",
        "`opir restore samples/ OUT --format png`, OPIR_KERNEL=native against reference:",
        "",
        "| file | bit-identical | 8-bit values differing | max level difference |",
        "|---|---|---|---|",
    ]
    for r in report["restore_cli"]:
        lines.append(
            f"| {r['file']} | {r['identical']} | {r['values_differing']} of {r['values']} | "
            f"{r['max_level_diff']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-cli", action="store_true", help="only time the engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    report = {
        "machine": machine,
        "threads": args.threads,
        "reps": args.reps,
        "engine": time_engine(args.reps),
        "restore_cli": [] if args.skip_cli else compare_restore_cli(),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"native_end_to_end-{machine_tag(machine)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), report)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
