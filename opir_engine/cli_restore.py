"""Terminal side of `opir restore` and `opir models`: progress bar, error lines, summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from opir_engine.batch import FileRecord, Job, RestoreOptions, run_jobs, summarize, write_report


def run_restore(
    jobs: list[Job],
    options: RestoreOptions,
    engine_args: dict[str, Any],
    batch_size: int,
    report: Path | None,
    dry_run: bool,
    quiet: bool,
) -> int:
    """Run the batch; returns the exit code (0 all done or skipped, 1 some failed, 2 usage,
    130 interrupted)."""
    from opir_engine.checkpoint import CheckpointError
    from opir_engine.engine import EngineError, OPIREngine, pick_device

    # Paths and error messages are printed as they are: no markup, no highlighting, no wrapping
    # (each error is one `PATH: reason` line, whatever the terminal width).
    out = Console(quiet=quiet, highlight=False, markup=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        for job in jobs:
            state = "exists, skip" if job.output.exists() and not options.overwrite else "restore"
            out.print(f"{job.input} -> {job.output} ({state})")
        return 0
    try:
        if engine_args["compile"] is None:
            # Compile by default on CUDA only: on a 2-core CPU (bench/results/engine-*.md) the
            # compiled small model was no faster per 512x512 tile than eager, and the first
            # compile takes minutes there.
            on_cuda = pick_device(engine_args["device"]).type == "cuda"
            engine_args = {**engine_args, "compile": on_cuda}
        engine = OPIREngine.from_pretrained(**engine_args, tiles_per_batch=batch_size)
    except (CheckpointError, EngineError) as e:
        err.print(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        err.print("interrupted while loading the model; nothing was written")
        return 130
    records: list[FileRecord] = []
    started = time.perf_counter()
    columns = (TextColumn("restoring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.2f} img/s"), TimeRemainingColumn())  # fmt: skip
    # The bar is for terminals: in a log (stderr redirected) only the error lines appear.
    show_bar = not quiet and err.is_terminal
    with Progress(*columns, console=err, disable=not show_bar, transient=True) as progress:
        bar = progress.add_task("restore", total=len(jobs), rate=0.0)

        def on_record(record: FileRecord) -> None:
            records.append(record)
            if record.status == "failed":
                progress.console.print(f"{record.input}: {record.error}")
            elapsed = time.perf_counter() - started
            progress.update(bar, completed=len(records), rate=len(records) / elapsed)

        try:
            run_jobs(engine, jobs, options, on_record)
        except KeyboardInterrupt:
            interrupted = True
        else:
            interrupted = False
    summary = summarize(records, time.perf_counter() - started)
    if report is not None:
        write_report(records, report, summary)
    if not quiet:
        title = f"opir restore: {engine.name} on {engine.device}"
        table = Table(title=title + (" (interrupted)" if interrupted else ""), show_header=False)
        for key, value in _summary_rows(summary):
            table.add_row(key, value)
        out.print(table)
    if interrupted:
        err.print("interrupted: finished outputs are complete; run again to resume")
        return 130
    return 1 if summary.failed else 0


def _summary_rows(s: Any) -> list[tuple[str, str]]:
    def fmt(x: float | None, unit: str = "") -> str:
        return "-" if x is None else f"{x:g}{unit}"

    tasks = ", ".join(f"{k} {v}" for k, v in s.per_task.items()) or "-"
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
    from opir_engine.checkpoint import CheckpointError, read_card
    from opir_engine.engine import list_shipped

    table = Table(title="shipped checkpoints")
    for column in ("name", "config", "params", "steps", "validation (PSNR in -> out)"):
        table.add_column(column)
    for name, path in list_shipped():
        try:
            card = read_card(path)
        except CheckpointError as e:  # one broken card must not hide the others
            table.add_row(name, "-", "-", "-", f"unreadable card: {e}")
            continue
        val = card.get("validation") or {}
        gains = ", ".join(
            f"{t} {val[t]['in_psnr']:.1f}->{val[t]['psnr']:.1f}"
            for t in ("rain", "snow", "haze") if t in val
        )  # fmt: skip
        cfg = card.get("config", {})
        table.add_row(name, f"width {cfg.get('width')}", str(card.get("parameters", "?")),
                      str(card.get("steps", "?")), gains or "-")  # fmt: skip
    Console().print(table)
