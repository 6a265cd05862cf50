"""One 4K fp32 forward of the Triton kernel and of the one it replaced, for Nsight Compute.

    ncu --clock-control none -k regex:fwd_kernel --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats python bench/profile_forward.py

Each kernel runs once to compile (the two skipped launches), then once more to be profiled.
`--config ROWS,COLUMNS,WARPS` profiles another tile than FORWARD_CONFIG.
"""

from __future__ import annotations

import argparse
import sys

import torch
from one_row_forward import one_row_forward  # bench/ (the script's folder)
from op import DILATIONS, _make_inputs

from opir_kernels.triton_kernels import FORWARD_CONFIG, inverse_operator_forward_triton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3840x2160", help="W x H")
    parser.add_argument("--config", help="ROWS,COLUMNS,WARPS (default: FORWARD_CONFIG)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/profile_forward.py needs a CUDA device")
    width, height = (int(v) for v in args.size.split("x"))
    config = dict(FORWARD_CONFIG)
    if args.config:
        values = map(int, args.config.split(","))
        config = dict(zip(("BLOCK_H", "BLOCK_W", "num_warps"), values, strict=True))
    inputs = _make_inputs(height, width, "cuda", requires_grad=False)
    for _ in range(2):  # compile, then the profiled launch
        inverse_operator_forward_triton(*inputs, DILATIONS, config=config)
        one_row_forward(*inputs, DILATIONS)
    torch.cuda.synchronize()
    print(f"profiled: tile {config} and the one-row kernel at {width}x{height}")


if __name__ == "__main__":
    main()
