"""Benchmark the whole engine: latency per resolution, eager against compiled, and peak memory
with and without tiling.

    python bench/engine.py                  # all cases, results in bench/results/engine-<machine>.*
    python bench/engine.py --sizes 256x256 512x512 --runs 2

Weights: the shipped `opir-small-allinone` when it exists, else a seeded random `small` model
(the compute does not depend on the weights' values). Task "rain" (the head still runs, as in
`--task auto`), default precision of the device. Three ways per size:

- tiled: the photo at full size (no working side) in tiles of 512 with the engine's default
  overlap for its pooling (128 for the default "shared" means), eager and compiled;
- untiled: the photo at full size in one piece, eager (sizes over one tile);
- default: as `opir restore` runs it on this device: the working side "auto" (a photo longer
  than 1024 px restored at each side of 512-1536 below its own, the one leaving the fewest lines
  kept; inference/working_scale.py), tiles only when memory needs them (inference/tile_budget.py),
  eager on the CPU (sizes over 1024; below it, it is the untiled case).

Each case runs in a fresh subprocess, so compiled graphs, allocator state and the peak-memory
high-water mark belong to that case alone. Inside it:

- latency: `--runs` timed calls of `engine.restore` (`--runs-large` for sizes over 1 MP), the
  clock read after torch.cuda.synchronize on CUDA. Eager cases warm up on a 64x64 image first;
  compiled cases warm up on the image itself (every shape the case will use: its tiles, and the
  graph that takes the whole photo's shared means), and that first call, compile included, is
  reported on its own.
- peak memory: on CPU the process's peak resident set (`ru_maxrss`, which includes torch itself),
  and the growth over the resident set just before the first restore call; on CUDA
  `max_memory_allocated`. The growth holds one tile's activations plus buffers the size of the
  image, which no tiling removes: the float copy of the input, the blending sums and weights,
  and the output (the previous call's result is still held while the next call runs, as in a
  loop that keeps its last result), about 40 to 80 bytes per pixel.

Untiled runs are eager only (a compiled graph per full image size is what tiles avoid), and only
for sizes over one tile (smaller images are one tile either way). The untiled 4000x3000 run is
skipped when the growth measured untiled at 1920x1080, scaled by the pixel count, would not fit
in the memory available; the reason is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

SIZES = ("256x256", "512x512", "1920x1080", "4000x3000")  # W x H
TILE = 512
WORK_SIDE = 1024  # photos longer than this are shrunk under the engine's default ("auto")
RESULTS = Path(__file__).resolve().parent / "results"
LARGE = 1_000_000  # pixels: sizes above use --runs-large


# ---------------------------------------------------------------------------------------------
# One case (child process).
# ---------------------------------------------------------------------------------------------


def _build_engine(config: str, compiled: bool, tile: int | None, default: bool) -> Any:
    """The engine of a case: `default` as `opir restore` builds it, else at full size (no
    working side) with `tile`."""
    from opir_engine.devices import pick_device, pick_dtype
    from opir_engine.inference.engine import DEFAULT_WORK_SIDE, OPIREngine
    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import DEFAULT_WEIGHTS, CheckpointError

    work_side = DEFAULT_WORK_SIDE if default else None
    try:
        engine = OPIREngine.from_pretrained(
            DEFAULT_WEIGHTS, compile=compiled, tile=tile, work_side=work_side
        )
        return engine, "shipped"
    except CheckpointError:
        torch.manual_seed(0)
        model = OPIR(OPIRConfig.from_name(config))
        device = pick_device("auto")
        card = {"name": f"random-{config}"}
        dtype = pick_dtype("auto", device)
        engine = OPIREngine(model, card, device, dtype, compiled, tile, work_side=work_side)
        return engine, "random init"


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: dict) -> dict:
    """Time `engine.restore` on one image size; returns latencies and peak memory."""
    width, height = case["width"], case["height"]
    default = case.get("default", False)
    if default:
        tile = None
    else:
        tile = TILE if case["tiled"] else max(TILE, -(-max(width, height) // 16) * 16)
    engine, weights = _build_engine(case["config"], case["compiled"], tile, default)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=gen)
    first_s = None
    if case["compiled"]:
        # the image itself: a tiled one compiles the graph that takes the shared means
        t0 = time.perf_counter()
        engine.restore(image, task="rain")
        _sync(engine.device)
        first_s = time.perf_counter() - t0
    else:
        engine.restore(torch.rand(3, 64, 64, generator=gen), task="rain")
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before_mb = _rss_mb()
    times, flops = [], 0
    for _ in range(case["runs"]):
        _sync(engine.device)
        t0 = time.perf_counter()
        result = engine.restore(image, task="rain")
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
        flops = result.flops
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    median = statistics.median(times)
    row = {
        **case,
        "weights": weights,
        "device": str(engine.device),
        "precision": str(engine.dtype).removeprefix("torch."),
        "tile": tile if case["tiled"] else None,
        "overlap": engine.tile_overlap if case["tiled"] else None,
        "pooling": engine.pooling,
        "work_side": engine.work_side,
        "work_size": list(result.work_size) if result.work_size else None,
        "first_call_s": round(first_s, 2) if first_s is not None else None,
        "times_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "megapixels_per_s": round(width * height / 1e6 / median, 4),
        "gflops_per_image": round(flops / 1e9, 2),
        "gflop_per_s": round(flops / 1e9 / median, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "rss_before_mb": round(before_mb, 1),
        "growth_mb": round(peak_mb - before_mb, 1),
    }
    if engine.device.type == "cuda":
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


# ---------------------------------------------------------------------------------------------
# The parent: machine record, one subprocess per case, tables.
# ---------------------------------------------------------------------------------------------


def _available_mb() -> float | None:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    return int(found.group(1)) / 1024 if found else None


def _spawn(case: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {**case, "error": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_cases(sizes: list[str], config: str, runs: int, runs_large: int) -> list[dict]:
    cases = []
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        n = runs_large if width * height > LARGE else runs
        base = {"size": size, "width": width, "height": height, "config": config, "runs": n}
        cases.append({**base, "compiled": False, "tiled": True})
        cases.append({**base, "compiled": True, "tiled": True})
        if max(width, height) > TILE:
            cases.append({**base, "compiled": False, "tiled": False})
        if max(width, height) > WORK_SIDE:
            cases.append({**base, "compiled": False, "tiled": False, "default": True})
    return cases


def _untiled_skip_reason(case: dict, rows: list[dict]) -> str | None:
    """Skip an untiled case whose memory, scaled from a smaller untiled run, would not fit."""
    measured = [r for r in rows if not r["tiled"] and not r.get("default") and "growth_mb" in r]
    available = _available_mb()
    if not measured or available is None:
        return None
    ref = max(measured, key=lambda r: r["width"] * r["height"])
    scale = case["width"] * case["height"] / (ref["width"] * ref["height"])
    estimate = ref["growth_mb"] * scale
    if estimate > 0.6 * available:
        return (
            f"needs about {estimate / 1024:.1f} GiB ({ref['growth_mb']:.0f} MiB untiled at "
            f"{ref['size']} x {scale:.1f} pixels), over 60% of the {available / 1024:.1f} GiB "
            "available"
        )
    seconds = ref["median_s"] * scale * case["runs"]
    if seconds > 1800:
        return f"would take about {seconds / 60:.0f} min ({ref['median_s']:.0f} s at {ref['size']})"
    return None


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def write_markdown(path: Path, report: dict) -> None:
    lines = ["# Engine benchmark", "", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["", "Latency (median of the timed runs) and throughput: tiled is the photo at full "
              "size in 512-px tiles (overlap as given), default as `opir restore` runs it "
              "(work side auto, tiles only when memory needs them):", ""]  # fmt: skip
    cuda = any("cuda_peak_mb" in r for r in report["rows"])
    lines += ["| size | mode | runs (s) | median | MP/s | GFLOPs/image | GFLOP/s | first call |"
              + (" CUDA peak |" if cuda else "")]  # fmt: skip
    lines += ["|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in report["rows"]:
        if not (r["tiled"] or r.get("default")) or "error" in r or "skipped" in r:
            continue
        if r.get("default"):
            work = "x".join(map(str, r["work_size"][::-1])) if r.get("work_size") else "?"
            mode = f"default (model at {work})"
        else:
            mode = f"tiled, overlap {r.get('overlap')}, " + (
                "compiled" if r["compiled"] else "eager"
            )
        lines.append(
            f"| {r['size']} | {mode} | {', '.join(map(str, r['times_s']))} | {r['median_s']} s "
            f"| {r['megapixels_per_s']} | {r['gflops_per_image']} | {r['gflop_per_s']} "
            f"| {_fmt(r['first_call_s'], ' s')} |"
            + (f" {_fmt(r.get('cuda_peak_mb'), ' MiB')} |" if cuda else "")
        )
    lines += ["", "Peak memory, eager (peak RSS of the process; growth over the RSS before the "]
    lines += ["first restore call):", ""]
    lines += ["| size | tiled peak | tiled growth | untiled peak | untiled growth | untiled s |"]
    lines += ["|---|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in report["rows"]):
        tiled = next((r for r in report["rows"] if r["size"] == size and r["tiled"]
                      and not r["compiled"]), {})  # fmt: skip
        untiled = next((r for r in report["rows"] if r["size"] == size and not r["tiled"]
                        and not r.get("default")), {})  # fmt: skip
        if not untiled and max(tiled.get("width", 0), tiled.get("height", 0)) <= TILE:
            untiled = {**tiled, "note": "one tile"}
        if cuda:  # the GPU's allocations are what tiling bounds there
            cells = [
                _fmt(tiled.get("cuda_peak_mb"), " MiB (CUDA)"),
                "",
                untiled.get("skipped") or _fmt(untiled.get("cuda_peak_mb"), " MiB (CUDA)"),
                "",
                "" if "skipped" in untiled else _fmt(untiled.get("median_s"), " s"),
            ]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
            continue
        cells = [
            _fmt(tiled.get("peak_rss_mb"), " MiB"),
            _fmt(tiled.get("growth_mb"), " MiB"),
            untiled.get("skipped") or _fmt(untiled.get("peak_rss_mb"), " MiB"),
            "" if "skipped" in untiled else _fmt(untiled.get("growth_mb"), " MiB"),
            "" if "skipped" in untiled else _fmt(untiled.get("median_s"), " s"),
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "First call: the warm-up call of a compiled case, compile included (shorter when ",
    ]
    lines += ["Inductor's on-disk cache holds the graph from an earlier run)."]
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    errors = [r for r in report["rows"] if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['size']} {r}: {r['error']}" for r in errors]
    lines += ["", f"Command: `{report['command']}`", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="W x H, e.g. 1920x1080")
    parser.add_argument("--config", default="small", help="preset when no weights are shipped")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case")
    parser.add_argument("--runs-large", type=int, default=2, help="timed runs over 1 MP")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", action="append", default=[], help="a line for the results")
    parser.add_argument("--render", type=Path, help="only rewrite the .md of this results .json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.render:
        report = json.loads(args.render.read_text())
        report["notes"] = report.get("notes", []) + args.note
        args.render.write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(args.render.with_suffix(".md"), report)
        return

    machine = describe_machine()
    rows: list[dict] = []
    for case in plan_cases(args.sizes, args.config, args.runs, args.runs_large):
        reason = None if case["tiled"] else _untiled_skip_reason(case, rows)
        row = {**case, "skipped": reason} if reason else _spawn(case)
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine["load_average_end"] = os.getloadavg()
    tag = machine_tag(machine)
    command = "python bench/engine.py " + " ".join(sys.argv[1:])
    report = {"machine": machine, "tile": TILE, "rows": rows}
    report["command"] = command.strip()
    report["notes"] = args.note
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"engine-{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(args.out / f"engine-{tag}.md", report)
    print(f"wrote {args.out / f'engine-{tag}.json'} and .md")


if __name__ == "__main__":
    main()
