"""Sweep the Triton forward's launch configuration (pixels per program, warps) on a CUDA device.

    python bench/triton_configs.py                  # 3840x2160, results in bench/results/
    python bench/triton_configs.py --sizes 1920x1080 3840x2160

Each configuration is timed like bench/op.py times the op (back-to-back calls between two
synchronizes, median of samples) and set against a `copy_` of the same bytes measured in the same
process. `FORWARD_CONFIG` in kernels/inverse_operator.py is the fastest row of this sweep on the
GPU it was chosen on. Needs CUDA; fp32, B=1, C=3, S=4 as bench/op.py, plus fp16 and bf16 at the
chosen configuration (half inputs move half the bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
from machine import describe_machine, machine_tag  # bench/ (the script's folder)
from op import DILATIONS, _copy_ms, _io_bytes, _make_inputs, _time_ms

from opir_kernels.inverse_operator import FORWARD_CONFIG, inverse_operator_forward_triton

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ((256, 4), (512, 4), (512, 8), (1024, 4), (1024, 8), (2048, 8))  # (BLOCK, warps)


def sweep(height: int, width: int, reps: int) -> list[dict]:
    in_bytes, out_bytes = _io_bytes(height, width)
    copy_gbps = 2 * (in_bytes + out_bytes) / _copy_ms(in_bytes + out_bytes, "cuda", reps) / 1e6
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        inputs = [t.to(dtype) for t in _make_inputs(height, width, "cuda", requires_grad=False)]
        scale = inputs[0].element_size() / 4  # bytes moved relative to fp32
        configs = (
            CONFIGS if dtype == torch.float32
            else [(FORWARD_CONFIG["BLOCK"], FORWARD_CONFIG["num_warps"])]
        )  # fmt: skip
        for block, warps in configs:
            config = {"BLOCK": block, "num_warps": warps}

            def run(config: dict = config, inputs: list = inputs) -> object:
                return inverse_operator_forward_triton(*inputs, DILATIONS, config=config)

            ms = statistics.median(_time_ms(run, "cuda", reps, 5.0)[0])
            gbps = scale * (in_bytes + out_bytes) / ms / 1e6
            rows.append({
                "size": f"{width}x{height}", "dtype": str(dtype).removeprefix("torch."),
                "BLOCK": block, "num_warps": warps, "fwd_ms": ms, "gbps": gbps,
                "copy_gbps": copy_gbps, "copy_fraction": gbps / copy_gbps,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["3840x2160"], help="W x H")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/triton_configs.py needs a CUDA device")
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        rows += sweep(height, width, args.reps)
    machine = {**describe_machine(), "triton": triton.__version__}
    best = min((r for r in rows if r["dtype"] == "float32"), key=lambda r: r["fwd_ms"])
    report = {"machine": machine, "current": FORWARD_CONFIG, "best_fp32": best, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    tag = machine_tag(machine)
    (RESULTS / f"triton_configs-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Triton forward launch configurations", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", f"FORWARD_CONFIG when run: {FORWARD_CONFIG}", ""]
    lines += ["| size | dtype | BLOCK | warps | fwd ms | GB/s | % of copy |", "|---" * 7 + "|"]
    lines += [
        f"| {r['size']} | {r['dtype']} | {r['BLOCK']} | {r['num_warps']} | {r['fwd_ms']:.3f} "
        f"| {r['gbps']:.0f} | {r['copy_fraction']:.0%} |"
        for r in rows
    ]
    (RESULTS / f"triton_configs-{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"best fp32: BLOCK {best['BLOCK']}, {best['num_warps']} warps, "
          f"{best['fwd_ms']:.3f} ms, {best['copy_fraction']:.0%} of copy")  # fmt: skip


if __name__ == "__main__":
    main()
