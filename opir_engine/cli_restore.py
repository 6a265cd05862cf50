"""Terminal side of `opir restore` and `opir models`: progress bar, error lines, summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from opir_engine.batch import FileRecord, Job, RestoreOptions, run_jobs, summarize, write_report

COMPILE_MIN_IMAGES = 16  # on CPU, compiling (about a minute) pays off from about this many


def run_restore(
    jobs: list[Job],
    options: RestoreOptions,
    engine_args: dict[str, Any],
    batch_size: int,
    report: Path | None,
    dry_run: bool,
    quiet: bool,
) -> int:
    """Run the batch; returns the exit code (0 all done or skipped, 1 some failed, 2 usage)."""
    from opir_engine.checkpoint import CheckpointError
    from opir_engine.engine import EngineError, OPIREngine, pick_device

    out = Console(quiet=quiet, highlight=False)
    err = Console(stderr=True, highlight=False)
    if dry_run:
        for job in jobs:
            state = "exists, skip" if job.output.exists() and not options.overwrite else "restore"
            out.print(f"{job.input} -> {job.output} ({state})")
        return 0
    pending = [j for j in jobs if options.overwrite or not j.output.exists()]
    try:
        if engine_args["compile"] is None:
            on_cuda = pick_device(engine_args["device"]).type == "cuda"
            engine_args = {**engine_args, "compile": on_cuda or len(pending) >= COMPILE_MIN_IMAGES}
        engine = OPIREngine.from_pretrained(**engine_args, tiles_per_batch=batch_size)
    except (CheckpointError, EngineError) as e:
        err.print(f"error: {e}")
        return 2
    started = time.perf_counter()
    columns = (TextColumn("restoring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.2f} img/s"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, disable=quiet, transient=True) as progress:
        bar = progress.add_task("restore", total=len(jobs), rate=0.0)

        def on_record(record: FileRecord) -> None:
            if record.status == "failed":
                err.print(f"{record.input}: {record.error}", soft_wrap=True)
            done = progress.tasks[bar].completed + 1
            progress.update(bar, completed=done, rate=done / (time.perf_counter() - started))

        try:
            records = run_jobs(engine, jobs, options, on_record)
        except KeyboardInterrupt:
            err.print("interrupted: finished outputs are complete; run again to resume")
            return 130
    summary = summarize(records, time.perf_counter() - started)
    if report is not None:
        write_report(records, report, summary)
    if not quiet:
        table = Table(title=f"opir restore: {engine.name} on {engine.device}", show_header=False)
        for key, value in _summary_rows(summary):
            table.add_row(key, value)
        out.print(table)
    return 1 if summary.failed else 0


def _summary_rows(s: Any) -> list[tuple[str, str]]:
    def fmt(x: float | None, unit: str = "") -> str:
        return "-" if x is None else f"{x:g}{unit}"

    tasks = ", ".join(f"{k} {v}" for k, v in sorted(s.per_task.items())) or "-"
    return [
        ("images", f"{s.done} done, {s.skipped} skipped, {s.failed} failed"),
        ("wall time", f"{s.wall_s:.1f} s"),
        ("per image", f"p50 {fmt(s.ms_p50, ' ms')}, p95 {fmt(s.ms_p95, ' ms')}"),
        ("throughput", f"{fmt(s.megapixels_per_s)} MP/s"),
        (
            "compute",
            f"{fmt(s.gflops_per_image)} GFLOPs/image, {fmt(s.achieved_gflops_per_s)} GFLOP/s",
        ),
        ("tasks", tasks),
    ]


def print_models() -> None:
    from opir_engine.checkpoint import read_card
    from opir_engine.engine import list_shipped

    table = Table(title="shipped checkpoints")
    for column in ("name", "config", "params", "steps", "validation (PSNR in -> out)"):
        table.add_column(column)
    for name, path in list_shipped():
        card = read_card(path)
        val = card.get("validation") or {}
        gains = ", ".join(
            f"{t} {val[t]['in_psnr']:.1f}->{val[t]['psnr']:.1f}"
            for t in ("rain", "snow", "haze") if t in val
        )  # fmt: skip
        cfg = card.get("config", {})
        table.add_row(name, f"width {cfg.get('width')}", str(card.get("parameters", "?")),
                      str(card.get("steps", "?")), gains or "-")  # fmt: skip
    Console().print(table)
