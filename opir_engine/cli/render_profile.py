"""Terminal side of `opir profile`: the report as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from opir_engine.profiling.report import ProfileReport


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render_report(report: ProfileReport, console: Console) -> None:
    """Print the report as rich tables: figures per model and size, parts, ratios."""
    m, s = report.machine, report.settings
    console.print(
        f"[bold]{m['cpu']}[/], {m['logical_cores']} cores, torch {m['torch']} on {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; {s['precision']}, batch {s['batch']}, {'compiled' if s['compile'] else 'eager'}, "
        f"{s['runs']} runs after {s['warmup']} warm-up"
    )
    table = Table(title="Latency and throughput per image (FLOPs: multiply-add = 2)")
    for column in ("model", "size", "padded", "p50 ms", "p95 ms", "img/s", "MP/s", "GFLOPs",
                   "GMACs", "GFLOP/s", "params", "peak MB (+growth)"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "size") else "right")
    for r in report.results:
        memory = f"{_fmt(r.peak_memory_mb, '.0f')} (+{_fmt(r.peak_memory_growth_mb, '.0f')})"
        table.add_row(
            r.model, r.size, f"{r.padded_width}x{r.padded_height}",
            _fmt(r.latency_ms_p50), _fmt(r.latency_ms_p95), _fmt(r.images_per_s, ".2f"),
            _fmt(r.megapixels_per_s, ".2f"), _fmt(r.gflops_per_image), _fmt(r.gmacs_per_image),
            _fmt(r.achieved_gflops_per_s), f"{r.parameters / 1e6:.2f} M", memory,
        )  # fmt: skip
    console.print(table)
    for r in report.results:
        if not r.parts:
            continue
        parts = Table(
            title=f"{r.model} at {r.size}: parts timed alone (p50 {r.latency_ms_p50:.1f} ms)"
        )
        parts.add_column("part")
        parts.add_column("ms", justify="right")
        parts.add_column("% of forward", justify="right")
        for p in r.parts:
            parts.add_row(p.name, _fmt(p.ms_p50, ".2f"), _fmt(100 * p.share))
        parts.add_row("unaccounted (full - sum)", _fmt(r.parts_unaccounted_ms, ".2f"), "")
        bandwidth = f"{_fmt(r.op_gb_per_s)} GB/s"
        if r.op_bandwidth_pct_of_peak is not None:
            bandwidth += f", {r.op_bandwidth_pct_of_peak:.0f}% of peak"
        parts.add_row("op alone, all stages", _fmt(r.op_ms_p50, ".2f"), bandwidth)
        console.print(parts)
    if report.comparisons:
        ratios = Table(title="PromptIR / OPIR (same process, same inputs, interleaved runs)")
        for column in ("size", "OPIR ms", "PromptIR ms", "latency ratio", "OPIR GFLOPs",
                       "PromptIR GFLOPs", "FLOPs ratio"):  # fmt: skip
            ratios.add_column(column, justify="left" if column == "size" else "right")
        for c in report.comparisons:
            ratios.add_row(
                c.size, _fmt(c.opir_latency_ms_p50), _fmt(c.promptir_latency_ms_p50),
                f"{c.latency_ratio:.2f}x", _fmt(c.opir_gflops), _fmt(c.promptir_gflops),
                f"{c.flops_ratio:.2f}x",
            )  # fmt: skip
        console.print(ratios)
    console.print(f"memory: {report.results[0].memory_measure}" if report.results else "")
