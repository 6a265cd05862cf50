"""Sweep the Triton forward's launch configuration (tile rows x columns, warps) on a CUDA device.

    python bench/triton_configs.py                  # 3840x2160, results in bench/results/
    python bench/triton_configs.py --sizes 1920x1080 3840x2160

Each configuration is timed like bench/op.py times the op (back-to-back calls between two
synchronizes, median of samples) and set against a `copy_` of the same bytes measured in the same
process, and its output is checked against the PyTorch reference on the same GPU. The forward this
kernel replaced (bench/one_row_forward.py) is timed in the same run, so the change reads as a ratio.
`FORWARD_CONFIG` in kernels/triton_kernels.py is the fastest fp32 row of this sweep on the GPU it
was chosen on. Needs CUDA; fp32, B=1, C=3, S=4 as bench/op.py, plus fp16 and bf16 at the best and
at the current configuration (half inputs move half the bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from machine import describe_machine, machine_tag  # bench/ (the script's folder)
from one_row_forward import one_row_forward
from op import DILATIONS, _copy_ms, _io_bytes, _make_inputs, _time_ms

from opir_kernels.reference import inverse_operator_reference
from opir_kernels.triton_kernels import FORWARD_CONFIG, inverse_operator_forward_triton

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("BLOCK_H", "BLOCK_W", "num_warps")
# (BLOCK_H, BLOCK_W, warps) with 1, 2 and 4 pixels a thread (an sm_90 build of the kernel takes
# 72, 108 and 198 registers), from one row of 512 (the replaced kernel's shape) to tall tiles.
CONFIGS = (
    (2, 64, 4), (4, 32, 4), (1, 128, 4), (8, 32, 8), (4, 64, 8), (8, 16, 4), (16, 32, 16),
    (4, 64, 4), (8, 32, 4), (2, 128, 4), (8, 64, 8), (16, 32, 8),
    (8, 64, 4), (16, 32, 4), (1, 512, 4),
)  # fmt: skip


def _max_error(fn: Callable[[], tuple], reference: tuple) -> float:
    """Largest absolute difference of both outputs from the reference's (fp32 on the GPU)."""
    return max((a.float() - r).abs().max().item() for a, r in zip(fn(), reference, strict=True))


def sweep(height: int, width: int, reps: int) -> list[dict]:
    in_bytes, out_bytes = _io_bytes(height, width)
    base = _make_inputs(height, width, "cuda", requires_grad=False)
    # Warm-up, untimed: in two runs the first configuration timed came out about 2x slower than
    # when it was timed later in the sweep (0.79 against 0.37 ms).
    warm = dict(zip(KEYS, CONFIGS[0], strict=True))
    for _ in range(200):
        inverse_operator_forward_triton(*base, DILATIONS, config=warm)
    torch.cuda.synchronize()
    copy_gbps = 2 * (in_bytes + out_bytes) / _copy_ms(in_bytes + out_bytes, "cuda", reps) / 1e6
    rows = []

    def measure(kernel: str, config: dict, dtype: torch.dtype, run: Callable, ref: tuple) -> dict:
        ms = statistics.median(_time_ms(run, "cuda", reps, 2.0)[0])
        gbps = torch.finfo(dtype).bits / 32 * (in_bytes + out_bytes) / ms / 1e6
        row = {
            "size": f"{width}x{height}", "dtype": str(dtype).removeprefix("torch."),
            "kernel": kernel, **config, "fwd_ms": ms, "gbps": gbps, "copy_gbps": copy_gbps,
            "copy_fraction": gbps / copy_gbps, "max_abs_error": _max_error(run, ref),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        return row

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        inputs = [t.to(dtype) for t in base]
        with torch.no_grad():
            ref = inverse_operator_reference(*(t.float() for t in inputs), DILATIONS)
        if dtype == torch.float32:
            configs = [dict(zip(KEYS, c, strict=True)) for c in CONFIGS]
        else:  # the current launch and the best fp32 one
            tiles = [r for r in rows if r["dtype"] == "float32" and r["kernel"] == "tile"]
            best = {k: min(tiles, key=lambda r: r["fwd_ms"])[k] for k in FORWARD_CONFIG}
            configs = [FORWARD_CONFIG] + ([best] if best != FORWARD_CONFIG else [])
        for config in configs:

            def run(config: dict = config, inputs: list = inputs) -> tuple:
                return inverse_operator_forward_triton(*inputs, DILATIONS, config=config)

            try:
                rows.append(measure("tile", config, dtype, run, ref))
            except Exception as error:  # a launch that does not build: say so, go on
                print(f"{config} {dtype}: {type(error).__name__}: {error}"[:300], flush=True)

        def previous(inputs: list = inputs) -> tuple:
            return one_row_forward(*inputs, DILATIONS)

        replaced = {"BLOCK": 512, "num_warps": 4}
        try:
            rows.append(measure("one-row (replaced)", replaced, dtype, previous, ref))
        except Exception as error:  # the baseline failing must not lose the sweep
            print(f"one-row {dtype}: {type(error).__name__}: {error}"[:300], flush=True)
        del ref
    return rows


def _config_text(row: dict) -> str:
    if "BLOCK_H" in row:
        return f"{row['BLOCK_H']}x{row['BLOCK_W']}, {row['num_warps']} warps"
    return f"{row['BLOCK']} px, {row['num_warps']} warps"


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
    tiles = [r for r in rows if r["dtype"] == "float32" and r["kernel"] == "tile"]
    best = min(tiles, key=lambda r: r["fwd_ms"])
    report = {"machine": machine, "current": FORWARD_CONFIG, "best_fp32": best, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    tag = machine_tag(machine)
    (RESULTS / f"triton_configs-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Triton forward launch configurations", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", f"FORWARD_CONFIG when run: {FORWARD_CONFIG}", ""]
    lines += [
        "| size | dtype | kernel | launch | fwd ms | GB/s | % of copy | max abs error |",
        "|---" * 8 + "|",
    ]
    lines += [
        f"| {r['size']} | {r['dtype']} | {r['kernel']} | {_config_text(r)} | {r['fwd_ms']:.3f} "
        f"| {r['gbps']:.0f} | {r['copy_fraction']:.0%} | {r['max_abs_error']:.1e} |"
        for r in rows
    ]
    (RESULTS / f"triton_configs-{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"best fp32: {_config_text(best)}, {best['fwd_ms']:.3f} ms, "
          f"{best['copy_fraction']:.0%} of copy")  # fmt: skip


if __name__ == "__main__":
    main()
