"""Terminal side of `opir profile`: the report as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from opir_engine.profiling.report import ProfileReport, SizeProfile


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _spread(p50: float | None, p95: float | None) -> str:
    return "-" if p50 is None or p95 is None else f"{p95 - p50:.2f}"


def _render_parts(r: SizeProfile, console: Console) -> None:
    """The parts, their sum against the whole forward timed in the same rounds, and a verdict
    on the difference that does not mistake the runs' noise for time spent elsewhere."""
    parts = Table(title=f"{r.model} at {r.size}: each part timed alone, in rounds with the whole")
    for column in ("part", "p50 ms", "p95-p50 ms", "% of whole", "note"):
        parts.add_column(column, justify="left" if column == "part" else "right")
    for p in r.parts:
        parts.add_row(p.name, _fmt(p.ms_p50, ".2f"), _spread(p.ms_p50, p.ms_p95),
                      _fmt(100 * p.share), "")  # fmt: skip
    part_spread = sum(p.ms_p95 - p.ms_p50 for p in r.parts)
    parts.add_row("sum of the parts", _fmt(r.parts_sum_ms_p50, ".2f"), f"{part_spread:.2f}", "", "")
    whole_spread = _spread(r.parts_whole_ms_p50, r.parts_whole_ms_p95)
    parts.add_row("whole forward", _fmt(r.parts_whole_ms_p50, ".2f"), whole_spread, "100.0", "")
    bandwidth = f"{_fmt(r.op_gb_per_s)} GB/s"
    if r.op_bandwidth_pct_of_peak is not None:
        bandwidth += f", {r.op_bandwidth_pct_of_peak:.0f}% of peak"
    parts.add_row("op alone, all stages", _fmt(r.op_ms_p50, ".2f"), "", "", bandwidth)
    console.print(parts)
    console.print(_parts_verdict(r), highlight=False)


def _parts_verdict(r: SizeProfile) -> str:
    """The whole's p50 minus the parts' summed p50, judged against the runs' spread."""
    diff, noise = r.parts_unaccounted_ms, r.parts_noise_ms
    if diff is None:
        return ""
    gap = f"whole - sum of the parts: {diff:+.2f} ms"
    if noise is None:
        return f"{gap}; one run measures no spread, so this may be noise (--runs 2 or more)"
    if r.parts_within_noise:
        return f"{gap}, within the runs' spread ({noise:.2f} ms), so within noise"
    if diff > 0:
        return f"{gap}, beyond the runs' spread ({noise:.2f} ms): time outside the parts timed"
    return (
        f"{gap}, beyond the runs' spread ({noise:.2f} ms): timed alone, the parts take longer "
        "than the whole (which overlaps, caches or fuses across them)"
    )


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
        if r.parts:
            _render_parts(r, console)
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
