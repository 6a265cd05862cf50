"""Benchmark the inverse-operator op side by side: unfold baseline, reference eager, reference
compiled by inductor, the native CPU kernels, and Triton (CUDA only), against a plain `copy_` of
the same bytes.

    python bench/op.py                      # all sizes, results in bench/results/op-<machine>.*
    python bench/op.py --sizes 256x256 --reps 5

Each (implementation, size) runs in a fresh subprocess, so that allocator state and the
peak-memory high-water mark belong to that case alone. Inductor's caches are switched off there:
their key sees the call of the custom op, not the Python body it decomposes into, so an edited
reference would otherwise be timed through a stale compiled graph. `--threads 1` gives steadier
figures on a shared machine (OpenMP threads stall when a core is taken). Inside each case:

- time: median of `--reps` runs after warm-up (torch.cuda.synchronize before every clock read),
  wall clock and process CPU time (their gap is time spent waiting for a core);
- GB/s: bytes of the op's own inputs and outputs / forward time; the copy roofline moves the same
  number of bytes (read + write) with `dst.copy_(src)` in the same process, just before;
- fwd+bwd / fwd twice on CPU: with glibc's defaults, and with freed blocks kept for reuse
  (`mallopt`: no mmap threshold, no trimming; what jemalloc or tcmalloc do). With the defaults
  every block over 32 MiB goes back to the OS when freed and is page-faulted in again on the next
  call: at 1920x1080 the backward's 25 fresh gradient planes (207 MB) are faulted in at every
  call (about 15 of the native kernels' 118 ms in bench/results), so the second ratio is the
  op's own;
- peak memory: on CPU, the process's resident high-water mark (VmHWM) is reset through
  /proc/self/clear_refs, glibc is told to give freed memory back (malloc_trim) and to mmap every
  block over 64 KiB (so a freed tensor cannot be silently reused from the heap), and the growth
  over one call is read back; on CUDA, max_memory_allocated. Reported as inputs + growth, i.e.
  everything resident for the call, against the op's own inputs + outputs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)
from rich.console import Console
from rich.table import Table
from unfold_baseline import inverse_operator_unfold

from opir_kernels import native
from opir_kernels.inverse_operator import inverse_operator, kernel_backend
from opir_kernels.triton_kernels import FORWARD_CONFIG

SIZES = ("256x256", "512x512", "1920x1080", "3840x2160")  # W x H
IMPLS = ("unfold", "reference", "compiled", "native", "triton")
DILATIONS = (1, 2, 3, 4)
CHANNELS = 3
RESULTS = Path(__file__).resolve().parent / "results"
TRITON_CONFIG_KEYS = ("BLOCK_H", "BLOCK_W", "num_warps")
# Targets from the issue; each is reported as met or not, never enforced.
TARGET_SPEEDUP_VS_UNFOLD = 20.0  # compiled reference over unfold, 1920x1080 forward
TARGET_COPY_FRACTION = 0.5  # forward GB/s over copy GB/s
TARGET_PEAK_RATIO = 2.0  # peak memory over the op's own inputs + outputs
TARGET_FWD_BWD_RATIO = 4.0  # forward + backward time over forward time
TARGET_GPU_COPY_FRACTION = 0.8  # Triton forward GB/s over the GPU's copy GB/s, 3840x2160


# ---------------------------------------------------------------------------------------------
# Measuring one case (runs in the child process).
# ---------------------------------------------------------------------------------------------


def _make_inputs(height: int, width: int, device: str, requires_grad: bool) -> list[torch.Tensor]:
    """image, kernel, modulation, fusion_logits, bias: (1, 3|9|9|4|3, H, W) fp32."""
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(CHANNELS,), (9,), (9,), (len(DILATIONS),), (CHANNELS,)]
    tensors = [torch.rand((1, *c, height, width), generator=gen, device=device) for c in shapes]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _io_bytes(height: int, width: int) -> tuple[int, int]:
    """Bytes of the op's inputs (C + 9 + 9 + S + C planes) and outputs (C + 1 planes), fp32."""
    pixels = height * width
    return 4 * pixels * (CHANNELS + 18 + len(DILATIONS) + CHANNELS), 4 * pixels * (CHANNELS + 1)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(
    fn: Callable[[], object], device: str, reps: int, budget_s: float
) -> tuple[list[float], list[float]]:
    """Wall and process-CPU times (ms) of up to `reps` calls after warm-up (two calls, or one
    when a call takes over 2 s), stopping after 3 once `budget_s` is spent.

    On a shared CPU the CPU time shows how much of the wall time was spent waiting for a core.
    On CUDA a sample is the mean of back-to-back calls filling ~20 ms between two synchronizes,
    so that the host's launch overhead overlaps the GPU's work, as it does in a model.
    """
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    if once < 2.0:
        start = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - start
    inner = max(1, min(200, int(0.02 / max(once, 1e-6)))) if device == "cuda" else 1
    wall: list[float] = []
    cpu: list[float] = []
    while len(wall) < reps:
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        _sync(device)
        wall.append(1e3 * (time.perf_counter() - start) / inner)
        cpu.append(1e3 * (time.process_time() - start_cpu) / inner)
        if len(wall) >= 3 and sum(wall) * inner / 1e3 > budget_s:
            break
    return wall, cpu


def _rss_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reuse_freed_memory() -> None:
    """glibc keeps freed blocks of any size for the next allocation (no page faults)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never give the heap's top back


def _peak_growth_bytes(fn: Callable[[], object], device: str) -> int:
    """Memory that one call of `fn` adds at its peak (its results are kept until measured)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del result
        return peak - base
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks come from and go back to mmap
    libc.malloc_trim(0)
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    result = fn()
    peak = _rss_kib("VmHWM")
    del result
    return 1024 * (peak - base)


def _op_fn(impl: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The forward under test, taking (image, kernel, modulation, fusion_logits, bias)."""
    if impl == "unfold":
        return lambda *a: inverse_operator_unfold(*a, DILATIONS)
    if impl == "compiled":

        def call(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return inverse_operator(*a, dilations=DILATIONS)

        torch._inductor.config.force_disable_caches = True  # see the module docstring
        compiled = torch.compile(call, fullgraph=True, dynamic=False)

        def run_compiled(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with kernel_backend("reference"):  # read at trace time: inductor gets the reference
                return compiled(*a)

        return run_compiled
    backend = impl if impl in ("triton", "native") else "reference"

    def run_op(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with kernel_backend(backend):
            return inverse_operator(*a, dilations=DILATIONS)

    return run_op


def _copy_ms(nbytes: int, device: str, reps: int) -> float:
    """Median time of `dst.copy_(src)` for fp32 tensors of `nbytes`: the practical roofline."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return statistics.median(_time_ms(lambda: dst.copy_(src), device, max(reps, 10), 5.0)[0])


def measure_case(impl: str, height: int, width: int, reps: int, budget_s: float) -> dict:
    """Forward and forward+backward time, GB/s against copy_, and peak memory for one case."""
    device = "cuda" if impl == "triton" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    op = _op_fn(impl)
    in_bytes, out_bytes = _io_bytes(height, width)
    io_bytes = in_bytes + out_bytes

    copy_ms = _copy_ms(io_bytes, device, reps)
    copy_gbps = 2 * io_bytes / copy_ms / 1e6  # a copy reads and writes every byte

    inputs = _make_inputs(height, width, device, requires_grad=False)
    with torch.no_grad():
        fwd, fwd_cpu = _time_ms(lambda: op(*inputs), device, reps, budget_s)

    leaves = _make_inputs(height, width, device, requires_grad=True)
    grads = [torch.rand(1, c, height, width, device=device) for c in (CHANNELS, 1)]

    def forward_backward() -> tuple[torch.Tensor, ...]:
        outputs = op(*leaves)
        return torch.autograd.grad(outputs, leaves, grads)

    fwd_bwd, fwd_bwd_cpu = _time_ms(forward_backward, device, reps, budget_s)
    reused = {}
    if device == "cpu":
        _reuse_freed_memory()
        with torch.no_grad():
            fwd_reused = statistics.median(_time_ms(lambda: op(*inputs), device, reps, budget_s)[0])
        fwd_bwd_reused = statistics.median(_time_ms(forward_backward, device, reps, budget_s)[0])
        reused = {
            "fwd_ms_reused": fwd_reused,
            "fwd_bwd_ms_reused": fwd_bwd_reused,
            "fwd_bwd_ratio_reused": fwd_bwd_reused / fwd_reused,
        }

    with torch.no_grad():
        fwd_growth = _peak_growth_bytes(lambda: op(*inputs), device)
    fwd_bwd_growth = _peak_growth_bytes(forward_backward, device)

    fwd_ms, fwd_bwd_ms = statistics.median(fwd), statistics.median(fwd_bwd)
    gbps = io_bytes / fwd_ms / 1e6
    return {
        "impl": impl,
        "size": f"{width}x{height}",
        "device": device,
        "reps": len(fwd),
        "fwd_ms": fwd_ms,
        "fwd_ms_min": min(fwd),
        "fwd_cpu_ms": statistics.median(fwd_cpu),
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_bwd_cpu_ms": statistics.median(fwd_bwd_cpu),
        "fwd_bwd_ratio": fwd_bwd_ms / fwd_ms,
        "io_bytes": io_bytes,
        "gbps": gbps,
        "copy_ms": copy_ms,
        "copy_gbps": copy_gbps,
        "copy_fraction": gbps / copy_gbps,
        "peak_bytes": in_bytes + fwd_growth,
        "peak_ratio": (in_bytes + fwd_growth) / io_bytes,
        "fwd_bwd_peak_bytes": in_bytes + fwd_bwd_growth,
        **reused,
    }


# ---------------------------------------------------------------------------------------------
# The parent: machine record, one subprocess per case, tables and targets.
# ---------------------------------------------------------------------------------------------


def _skip_reason(impl: str, height: int, width: int, device: str) -> str | None:
    if impl == "triton" and not torch.cuda.is_available():
        return "no CUDA device (Triton runs on CPU only through the interpreter)"
    if impl == "native" and device != "cpu":
        return "CPU kernels (this run's tensors are on CUDA)"
    if impl == "native" and not native.available():
        return f"native kernels unavailable: {native.unavailable_reason()}"
    if impl == "unfold" and device == "cpu":
        # Unfold's backward keeps a (C*9, H*W) patch tensor and its product per dilation.
        need = 2 * len(DILATIONS) * CHANNELS * 9 * height * width * 4
        avail = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        # The machine is shared (a training run, other jobs): stay well inside what is free.
        if need > 0.25 * avail * 1024:
            return f"needs ~{need / 2**30:.1f} GiB, over 25% of the memory available now"
    return None


def run_case(impl: str, size: str, reps: int, budget_s: float, timeout_s: float) -> dict:
    """Measure one case in a fresh interpreter; returns its dict or one with `skipped`."""
    cmd = [sys.executable, __file__, "--child", impl, size, "--reps", str(reps)]
    cmd += ["--budget", str(budget_s), "--threads", str(torch.get_num_threads())]
    cmd += ["--triton-config", ",".join(str(FORWARD_CONFIG[k]) for k in TRITON_CONFIG_KEYS)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "size": size, "skipped": f"over the {timeout_s:.0f} s time limit"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"impl": impl, "size": size, "skipped": f"failed: {tail[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target against what the op runs on the device measured: Triton on CUDA; on CPU the
    native kernels where they were measured, else the compiled reference."""
    done = [r for r in rows if "skipped" not in r]
    impls = {r["impl"] for r in done}
    main = next((i for i in ("triton", "native", "compiled") if i in impls), "compiled")
    by = {(r["impl"], r["size"]): r for r in done}
    targets = []
    comp, unf = by.get(("compiled", "1920x1080")), by.get(("unfold", "1920x1080"))
    if comp and unf:
        speedup = unf["fwd_ms"] / comp["fwd_ms"]
        targets.append({
            "target": f"compiled reference >= {TARGET_SPEEDUP_VS_UNFOLD:.0f}x faster than unfold "
            "(1920x1080 fwd)",
            "value": f"{speedup:.1f}x",
            "met": speedup >= TARGET_SPEEDUP_VS_UNFOLD,
        })  # fmt: skip
    gpu_4k = by.get(("triton", "3840x2160"))
    if gpu_4k:
        targets.append({
            "target": f"triton fwd >= {TARGET_GPU_COPY_FRACTION:.0%} of the device's copy "
            "bandwidth (3840x2160)",
            "value": f"{gpu_4k['copy_fraction']:.0%}",
            "met": gpu_4k["copy_fraction"] >= TARGET_GPU_COPY_FRACTION,
        })  # fmt: skip
    for r in (r for r in done if r["impl"] == main):
        targets += [
            {"target": f"{main} fwd >= {TARGET_COPY_FRACTION:.0%} of copy GB/s ({r['size']})",
             "value": f"{r['copy_fraction']:.0%}",
             "met": r["copy_fraction"] >= TARGET_COPY_FRACTION},
            {"target": f"{main} peak <= {TARGET_PEAK_RATIO:.0f}x own inputs+outputs ({r['size']})",
             "value": f"{r['peak_ratio']:.2f}x", "met": r["peak_ratio"] <= TARGET_PEAK_RATIO},
            {"target": f"{main} fwd+bwd <= {TARGET_FWD_BWD_RATIO:.0f}x fwd ({r['size']})",
             "value": f"{r['fwd_bwd_ratio']:.2f}x",
             "met": r["fwd_bwd_ratio"] <= TARGET_FWD_BWD_RATIO},
        ]  # fmt: skip
        if "fwd_bwd_ratio_reused" in r:
            targets.append({
                "target": f"{main} fwd+bwd <= {TARGET_FWD_BWD_RATIO:.0f}x fwd, freed memory "
                f"reused ({r['size']})",
                "value": f"{r['fwd_bwd_ratio_reused']:.2f}x",
                "met": r["fwd_bwd_ratio_reused"] <= TARGET_FWD_BWD_RATIO,
            })  # fmt: skip
    return targets


COLUMNS = (
    ("size", "size", "{}"),
    ("impl", "impl", "{}"),
    ("fwd ms", "fwd_ms", "{:.2f}"),
    ("fwd cpu ms", "fwd_cpu_ms", "{:.2f}"),
    ("GB/s", "gbps", "{:.1f}"),
    ("copy GB/s", "copy_gbps", "{:.1f}"),
    ("% copy", "copy_fraction", "{:.0%}"),
    ("peak MiB", "peak_bytes", "{}"),
    ("peak / io", "peak_ratio", "{:.2f}"),
    ("fwd+bwd ms", "fwd_bwd_ms", "{:.2f}"),
    ("fwd+bwd / fwd", "fwd_bwd_ratio", "{:.2f}"),
    ("reused: fwd+bwd / fwd", "fwd_bwd_ratio_reused", "{:.2f}"),
    ("vs unfold", "speedup_vs_unfold", "{:.1f}x"),
)


def _cells(row: dict, note: int | None = None) -> list[str]:
    if "skipped" in row:
        return [row["size"], row["impl"], f"skipped [{note}]"] + [""] * (len(COLUMNS) - 3)
    out = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        if key == "peak_bytes":
            value = f"{value / 2**20:.0f}"
        out.append("" if value is None else fmt.format(value))
    return out


def write_markdown(path: Path, machine: dict, rows: list[dict], targets: list[dict]) -> None:
    lines = ["# inverse_operator benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "B=1, C=3, S=4 (dilations 1-4), modulation and bias, fp32.", ""]
    lines += ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = _skip_notes(rows)
    lines += ["| " + " | ".join(_cells(r, notes.get(id(r)))) + " |" for r in rows]
    lines += [""] + [f"[{n}] {r['size']} {r['impl']}: {r['skipped']}" for r in rows
                     if (n := notes.get(id(r)))]  # fmt: skip
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in targets]
    path.write_text("\n".join(lines) + "\n")


def _skip_notes(rows: list[dict]) -> dict[int, int]:
    """Footnote numbers for skipped rows, keyed by id(row)."""
    skipped = [r for r in rows if "skipped" in r]
    return {id(r): n for n, r in enumerate(skipped, start=1)}


def print_tables(console: Console, rows: list[dict], targets: list[dict]) -> None:
    table = Table(title="inverse_operator: B=1, C=3, S=4, fp32")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="left" if title in ("size", "impl") else "right")
    notes = _skip_notes(rows)
    for row in rows:
        table.add_row(*_cells(row, notes.get(id(row))))
    console.print(table)
    for row in rows:
        if n := notes.get(id(row)):
            console.print(f"[{n}] {row['size']} {row['impl']}: {row['skipped']}", markup=False)
    verdicts = Table(title="targets")
    for title in ("target", "value", "met"):
        verdicts.add_column(title)
    for t in targets:
        verdicts.add_row(t["target"], t["value"], "[green]yes" if t["met"] else "[red]no")
    console.print(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="W x H, e.g. 1920x1080")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--reps", type=int, default=10, help="timed runs after warm-up")
    parser.add_argument("--budget", type=float, default=15.0, help="s of timed runs per phase")
    parser.add_argument("--timeout", type=float, default=900.0, help="s per case")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--triton-config", metavar="ROWS,COLUMNS,WARPS",
        help="the Triton forward's tile and warps (default: FORWARD_CONFIG; "
        "bench/triton_configs.py sweeps them)",
    )  # fmt: skip
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.triton_config:
        values = [int(v) for v in args.triton_config.split(",")]
        FORWARD_CONFIG.update(zip(TRITON_CONFIG_KEYS, values, strict=True))
    if args.child:
        impl, size = args.child
        width, height = (int(v) for v in size.split("x"))
        print(json.dumps(measure_case(impl, height, width, args.reps, args.budget)))
        return

    console = Console(width=None if sys.stdout.isatty() else 160)
    machine = {**describe_machine(), "triton": triton.__version__, "triton_forward": FORWARD_CONFIG}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for impl in args.impls:
            reason = _skip_reason(impl, height, width, device)
            console.log(f"{size} {impl}: {reason or 'running'}")
            row = (
                {"impl": impl, "size": size, "skipped": reason}
                if reason
                else run_case(impl, size, args.reps, args.budget, args.timeout)
            )
            rows.append(row)
        unfold = next((r for r in rows if r["size"] == size and r["impl"] == "unfold"), None)
        for row in rows:
            if row["size"] == size and unfold and "skipped" not in unfold and "skipped" not in row:
                row["speedup_vs_unfold"] = unfold["fwd_ms"] / row["fwd_ms"]
    targets = check_targets(rows)
    machine["load_average_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    tag = machine_tag(machine)
    report = {"machine": machine, "dilations": DILATIONS, "rows": rows, "targets": targets}
    (RESULTS / f"op-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(RESULTS / f"op-{tag}.md", machine, rows, targets)
    print_tables(console, rows, targets)
    console.print(f"saved {RESULTS / f'op-{tag}.json'} and .md")


if __name__ == "__main__":
    main()
