"""Terminal side of `opir restore` and `opir models`: progress bar, error lines, summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from opir_engine.batch.runner import (
    FileRecord,
    Job,
    NoImagesError,
    RestoreOptions,
    UsageError,
    needs_model,
    run_jobs,
    summarize,
    write_report,
)


def usage_error_line(error: UsageError) -> str:
    """The one `error: ...` line for a usage error, naming the option that helps."""
    if isinstance(error, NoImagesError) and error.subfolders:
        s = "s" if error.subfolders > 1 else ""
        return (
            f"error: {error.folder}: no images found; --recursive (-r) also reads its "
            f"{error.subfolders} subfolder{s}"
        )
    return f"error: {error}"


def run_restore(
    jobs: list[Job],
    options: RestoreOptions,
    engine_args: dict[str, Any],
    batch_size: int,
    report: Path | None,
    dry_run: bool,
    quiet: bool,
    ray_args: dict[str, Any] | None = None,
) -> int:
    """Run the batch; returns the exit code (0 all done or skipped, 1 some failed, 2 usage,
    130 interrupted). `ray_args` (address, workers, gpus_per_worker) picks the Ray backend."""
    from opir_engine.devices import DeviceError, pick_device
    from opir_engine.inference.engine import EngineError, OPIREngine
    from opir_engine.weights import CheckpointError

    # Paths and error messages are printed as they are: no markup, no highlighting, no wrapping
    # (each error is one `PATH: reason` line, whatever the terminal width).
    out = Console(quiet=quiet, highlight=False, markup=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        for job in jobs:
            state = "exists, skip" if job.output.exists() and not options.overwrite else "restore"
            out.print(f"{job.input} -> {job.output} ({state})")
        return 0
    if not needs_model(jobs, options):
        # A rerun after a finished one: skip without loading the model or starting Ray.
        title = "opir restore: every output exists (--overwrite replaces them)"
        return _run_and_summarize(
            lambda on_record: run_jobs(None, jobs, options, on_record), len(jobs), report,
            quiet, title, out, err,
        )  # fmt: skip
    if ray_args is not None:
        return _run_restore_ray(jobs, options, engine_args, batch_size, report, quiet, ray_args)
    try:
        if engine_args["compile"] is None:
            # Compile by default on CUDA only: on a 2-core CPU (bench/results/engine-*.md) the
            # compiled small model was no faster per 512x512 tile than eager, and the first
            # compile takes minutes there.
            on_cuda = pick_device(engine_args["device"]).type == "cuda"
            engine_args = {**engine_args, "compile": on_cuda}
        engine = OPIREngine.from_pretrained(**engine_args, tiles_per_batch=batch_size)
    except (CheckpointError, DeviceError, EngineError) as e:
        err.print(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        err.print("interrupted while loading the model; nothing was written")
        return 130
    title = f"opir restore: {engine.name} on {engine.device}"
    return _run_and_summarize(
        lambda on_record: run_jobs(engine, jobs, options, on_record), len(jobs), report, quiet,
        title, out, err,
    )  # fmt: skip


def _run_restore_ray(
    jobs: list[Job],
    options: RestoreOptions,
    engine_args: dict[str, Any],
    batch_size: int,
    report: Path | None,
    quiet: bool,
    ray_args: dict[str, Any],
) -> int:
    """The Ray backend (`opir_engine.batch.ray_backend`): same progress, error lines and summary."""
    from opir_engine.batch.ray_backend import RayBackendError, restore_with_ray
    from opir_engine.weights import CheckpointError, read_card, resolve_weights

    out = Console(quiet=quiet, highlight=False, markup=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    try:  # fail fast on the driver: missing weights would otherwise fail every actor's start
        name = read_card(resolve_weights(engine_args["name_or_path"])).get("name", "opir")
    except CheckpointError as e:
        err.print(f"error: {e}")
        return 2
    args = {**engine_args, "tiles_per_batch": batch_size}
    where = ray_args.get("address") or "a local instance"
    title = f"opir restore: {name} on ray ({ray_args.get('workers')} workers, {where})"
    try:
        return _run_and_summarize(
            lambda on_record: restore_with_ray(jobs, options, args, on_record, **ray_args),
            len(jobs), report, quiet, title, out, err,
        )  # fmt: skip
    except RayBackendError as e:
        err.print(f"error: {e}")
        return 2


def _run_and_summarize(
    run: Any, total: int, report: Path | None, quiet: bool, title: str, out: Console, err: Console
) -> int:
    """Call `run(on_record)` under the progress bar, then write the report and the summary."""
    records: list[FileRecord] = []
    started = time.perf_counter()
    columns = (TextColumn("restoring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.2f} img/s"), TimeRemainingColumn())  # fmt: skip
    # The bar is for terminals: in a log (stderr redirected) only the error lines appear.
    show_bar = not quiet and err.is_terminal
    with Progress(*columns, console=err, disable=not show_bar, transient=True) as progress:
        bar = progress.add_task("restore", total=total, rate=0.0)

        def on_record(record: FileRecord) -> None:
            records.append(record)
            if record.status == "failed":
                progress.console.print(f"{record.input}: {record.error}")
            elapsed = time.perf_counter() - started
            progress.update(bar, completed=len(records), rate=len(records) / elapsed)

        try:
            run(on_record)
        except KeyboardInterrupt:
            interrupted = True
        else:
            interrupted = False
    summary = summarize(records, time.perf_counter() - started)
    if report is not None:
        write_report(records, report, summary)
    if not quiet:
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
