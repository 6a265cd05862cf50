"""OPIR (`paper`, `small`) against PromptIR, eager and compiled, in one process; ratios per size.

    python bench/compare.py                      # 256 and 512, 3 runs, this machine
    python bench/compare.py --sizes 256,512,1080p --runs 5

Per size and mode, the three models' runs are interleaved round by round (opir_engine.profiling),
so a change in machine load hits all of them alike: the PromptIR / OPIR ratios are the figures
that hold on a busy machine. FLOPs are flop_counter's (a multiply-add is 2) at the padded size;
GMACs are half that, the convention of the OPIR paper's Table 6 (at 224 x 224, see README).
The per-part breakdown of OPIR is timed in eager mode only (compiling each part at each size
would double the compile time on a CPU).

Results go beside this script: results/compare-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

from opir_engine.devices import pick_device
from opir_engine.profiling.profile import build_opir, build_promptir, profile_models
from opir_engine.profiling.report import compare_results
from opir_engine.profiling.settings import ProfileSettings, label_size, parse_sizes

RESULTS = Path(__file__).resolve().parent / "results"


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="N, WxH, 720p, 1080p, 1440p, 4k")
    parser.add_argument("--configs", default="paper,small", help="OPIR presets to time")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--machine", default=None, help="file name tag (default: from the CPU/GPU)")
    return parser.parse_args(argv)


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _markdown(machine: dict, settings: dict, rows: list, ratios: list, elapsed_s: float) -> str:
    m = machine
    gpu = f" ({m['gpu']}, peak {m.get('gpu_peak_bandwidth_gbs')} GB/s)" if "gpu" in m else ""
    lines = [
        "# OPIR vs PromptIR",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}{gpu}; load average "
        f"{m.get('load_average_1min')} at start, {m.get('load_average_1min_end')} at end; "
        f"{elapsed_s / 60:.0f} min in all.",
        "",
        f"Settings: {settings['runs']} timed runs after {settings['warmup']} warm-up, fp32, "
        "batch 1, random weights; latency p50 and p95 in ms. FLOPs: multiply-add = 2 "
        "(torch.utils.flop_counter) at the padded size; GMACs = FLOPs / 2. Memory: peak growth "
        "over the memory held before the forward (CPU: VmHWM; CUDA: allocator peak).",
        "",
        "| mode | model | size | p50 ms | p95 ms | MP/s | GFLOPs | GMACs | GFLOP/s | params "
        "| peak growth MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in rows:
        growth = "-" if r.peak_memory_growth_mb is None else f"{r.peak_memory_growth_mb:.0f}"
        lines.append(
            f"| {mode} | {r.model} | {r.size} | {r.latency_ms_p50:.0f} | {r.latency_ms_p95:.0f} "
            f"| {r.megapixels_per_s:.3f} | {r.gflops_per_image:.1f} | {r.gmacs_per_image:.1f} "
            f"| {r.achieved_gflops_per_s:.1f} | {r.parameters / 1e6:.2f} M | {growth} |"
        )
    lines += [
        "",
        "## PromptIR / OPIR (interleaved runs, same inputs)",
        "",
        "| mode | OPIR | size | OPIR ms | PromptIR ms | latency ratio | FLOPs ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for mode, name, c in ratios:
        lines.append(
            f"| {mode} | {name} | {c.size} | {c.opir_latency_ms_p50:.0f} | "
            f"{c.promptir_latency_ms_p50:.0f} | {c.latency_ratio:.2f}x | {c.flops_ratio:.2f}x |"
        )
    lines += ["", "## OPIR parts (eager, each timed alone, ms p50)", ""]
    for _, r in rows:
        if not r.parts:
            continue
        parts = ", ".join(f"{p.name} {p.ms_p50:.0f}" for p in r.parts)
        op = f"op alone (both stages) {r.op_ms_p50:.1f} ms = {r.op_gb_per_s:.2f} GB/s"
        if r.op_bandwidth_pct_of_peak is not None:
            op += f", {r.op_bandwidth_pct_of_peak:.0f}% of peak"
        lines.append(f"- {r.model} {r.size}: {parts}; {op}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    device = pick_device(args.device)
    sizes = parse_sizes(args.sizes)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or not set(modes) <= {"eager", "compiled"}:
        raise SystemExit(f"--modes {args.modes!r}: eager and/or compiled")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = describe_machine(device)
    models = [(name, model) for model, name in (build_opir(c, None, device) for c in configs)]
    models.append(("PromptIR", build_promptir(device)))
    rows, ratios = [], []
    with torch.inference_mode():
        for mode in modes:
            settings = ProfileSettings(
                runs=args.runs, warmup=args.warmup, compile=mode == "compiled",
                breakdown=mode == "eager",
            )  # fmt: skip
            for size in sizes:
                _log(f"{mode} {label_size(size)}: {', '.join(n for n, _ in models)}")
                image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
                *opirs, promptir = profile_models(models, image.to(device), settings, device, _log)
                for r in [*opirs, promptir]:
                    rows.append((mode, r))
                    _log(f"  {r.model}: {r.latency_ms_p50:.0f} ms, {r.gflops_per_image:.1f} GFLOPs")
                for r in opirs:
                    c = compare_results(r, promptir)
                    ratios.append((mode, r.model, c))
                    _log(f"  PromptIR / {r.model}: {c.latency_ratio:.2f}x time, "
                         f"{c.flops_ratio:.2f}x FLOPs")  # fmt: skip
    machine["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    elapsed = time.perf_counter() - started
    settings_out = {"sizes": [label_size(s) for s in sizes], "configs": configs, "modes": modes,
                    "runs": args.runs, "warmup": args.warmup}  # fmt: skip
    tag = args.machine or machine_tag(machine)
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(machine, settings_out, rows, ratios, elapsed)
    (RESULTS / f"compare-{tag}.md").write_text(markdown)
    data = {
        "machine": machine,
        "settings": settings_out,
        "elapsed_s": round(elapsed, 1),
        "results": [{"mode": m, **dataclasses.asdict(r)} for m, r in rows],
        "ratios": [{"mode": m, "opir": n, **dataclasses.asdict(c)} for m, n, c in ratios],
    }
    (RESULTS / f"compare-{tag}.json").write_text(json.dumps(data, indent=1) + "\n")
    _log(f"wrote {RESULTS / f'compare-{tag}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
