"""The Ray backend of `opir restore`: the same per-file restore, spread over a Ray cluster.

The Ray Dataset is the list of files (rows `{input, output}` as strings), not decoded images, so
EXIF, ICC, alpha and 16-bit handling stay exactly those of the local backend: each actor of a
fixed-size pool builds one `OPIREngine` once and calls `batch.restore_file` per row, which
writes its output atomically. The rows that come back are the per-file records, fed to the same
`on_record` callback, summary and report as the local backend.

What a cluster needs: every node sees the input and output folders at the same paths (a
shared file system such as NFS), has opir installed (`pip install opir[ray]`) and sees the
weights (a shipped name needs the installed package; a .safetensors path must exist on every
node). Outputs are renamed into place only when complete, so a worker that dies mid-file leaves
no partial output; Ray restarts the actor and retries its rows, and a retried row whose output
already exists is skipped, never written twice.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from opir_engine.batch.runner import (
    FileRecord,
    Job,
    RestoreOptions,
    remove_stale_parts,
    restore_file,
)

_RECORD_FIELDS = [f.name for f in fields(FileRecord)]


class RayBackendError(Exception):
    """The Ray backend cannot run (Ray missing, cluster unreachable, workers failing to start)."""


class RayUnavailableError(RayBackendError):
    """Ray is not installed."""


class RayClusterError(RayBackendError):
    """Connecting to or running on the Ray cluster failed."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # the extra, not just ray core
    except ImportError as e:
        raise RayUnavailableError(
            f"ray: not installed ({e}); install the extra with `pip install opir[ray]`"
        ) from e
    return ray


class _Restorer:
    """One Ray actor: builds the engine once, then restores the rows of each batch it is given."""

    def __init__(self, engine_args: dict[str, Any], options: RestoreOptions, threads: int) -> None:
        import torch

        from opir_engine.devices import pick_device
        from opir_engine.inference.engine import OPIREngine

        # Each actor owns `threads` CPUs of its node; more torch threads would oversubscribe
        # the cores the other actors on that node were given.
        torch.set_num_threads(max(1, threads))
        args = dict(engine_args)
        if args.get("compile") is None:  # as the local backend: compile on CUDA only
            args["compile"] = pick_device(args.get("device", "auto")).type == "cuda"
        self.engine = OPIREngine.from_pretrained(**args)
        self.options = options

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Restore each row of a batch {input: (N,), output: (N,)}; returns record columns."""
        columns: dict[str, list[Any]] = {name: [] for name in _RECORD_FIELDS}
        for src, dst in zip(batch["input"], batch["output"], strict=True):
            record = restore_file(self.engine, Job(Path(str(src)), Path(str(dst))), self.options)
            for name, value in asdict(record).items():
                columns[name].append(value)
        return columns


def _record_from_row(row: dict[str, Any]) -> FileRecord:
    """A result row -> FileRecord, with numpy scalars and NaN (missing) turned back to Python."""
    values: dict[str, Any] = {}
    for name in _RECORD_FIELDS:
        value = row.get(name)
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and value != value:  # NaN: a None in a numeric column
            value = None
        values[name] = value
    for name in ("width", "height"):
        if values[name] is not None:
            values[name] = int(values[name])
    values["flops"] = int(values["flops"] or 0)
    for name in ("task", "restored_at", "error"):
        values[name] = values[name] or ""
    return FileRecord(**values)


def _iter_records(ray: Any, jobs: list[Job], options: RestoreOptions, engine_args: dict[str, Any],
                  workers: int, cpus_per_worker: float, gpus_per_worker: float,
                  max_retries: int) -> Iterator[FileRecord]:  # fmt: skip
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own bar from the records
    # A file that kills its worker every time (after the retries) fails its one-row block;
    # letting every block fail keeps the rest of the run going, and the file is reported below.
    ctx.max_errored_blocks = len(jobs)
    rows = [{"input": str(j.input), "output": str(j.output)} for j in jobs]
    # One row per block and per batch: rows spread over the actors one by one, and a retry
    # after a worker dies redoes one file.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options as extra keyword arguments but names no
        # replacement for max_restarts / max_task_retries; its defaults are unbounded, and a
        # file that crashes its worker every time must not loop forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            _Restorer,
            fn_constructor_args=(engine_args, options, max(1, int(cpus_per_worker))),
            batch_size=1,
            compute=ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
            max_restarts=-1,  # a dead actor is always replaced
            max_task_retries=max_retries,  # a batch in flight on it is retried this often
        )
    for row in ds.iter_rows():
        yield _record_from_row(row)


def restore_with_ray(
    jobs: list[Job],
    options: RestoreOptions,
    engine_args: dict[str, Any],
    on_record: Callable[[FileRecord], None] | None = None,
    *,
    address: str | None = None,
    workers: int = 2,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_retries: int = 3,
) -> list[FileRecord]:
    """Restore every job on a pool of `workers` Ray actors; returns the records in job order.

    `engine_args` are `OPIREngine.from_pretrained`'s keyword arguments (`compile=None`: compile
    on CUDA only). `address` joins a running cluster (`auto`, `ray://HOST:PORT`); without it,
    an already initialized Ray is used as it is, else a local instance with
    `workers * cpus_per_worker` CPUs is started and shut down after. `on_record` sees each
    record as it arrives (in completion order). A file whose worker died more than
    `max_retries` times becomes a failed record, and the run goes on.

    Raises RayUnavailableError (no ray) and RayClusterError (cluster unreachable, workers that
    cannot start, e.g. weights missing on a node).
    """
    if workers < 1:
        raise RayClusterError(f"--workers must be at least 1; got {workers}")
    if gpus_per_worker < 0:
        raise RayClusterError(f"--gpus-per-worker must be >= 0; got {gpus_per_worker}")
    ray = _import_ray()
    jobs = list(jobs)
    remove_stale_parts(jobs)
    if not jobs:
        return []
    started_here = False
    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                cpus = max(1, round(workers * cpus_per_worker))
                ray.init(num_cpus=cpus, **quiet)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError...
            raise RayClusterError(f"ray: cannot start or join {address or 'a local instance'}"
                                  f": {' '.join(str(e).split())}") from e  # fmt: skip
        started_here = True
    got: dict[str, FileRecord] = {}
    # Ray Data logs its plan and notices to stderr at INFO; the CLI prints its own lines.
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        for record in _iter_records(ray, jobs, options, engine_args, workers, cpus_per_worker,
                                    gpus_per_worker, max_retries):  # fmt: skip
            got[record.input] = record
            if on_record:
                on_record(record)
        # Rows missing from the result are files whose worker kept dying (errored blocks).
        for job in jobs:
            if str(job.input) not in got:
                record = FileRecord(str(job.input), str(job.output), "failed")
                record.error = f"worker process died {max_retries + 1} times on this file"
                got[record.input] = record
                if on_record:
                    on_record(record)
    except (KeyboardInterrupt, RayBackendError):
        raise
    except Exception as e:  # e.g. actors that cannot build the engine on some node
        raise RayClusterError(f"ray: the run failed: {' '.join(str(e).split())[:500]}") from e
    finally:
        # A worker killed mid-write can leave a temporary `.part` beside its output; the
        # retry wrote the output under a new name, so the leftover is stale now.
        remove_stale_parts(jobs)
        data_logger.setLevel(level)
        if started_here:
            ray.shutdown()
    return [got[str(j.input)] for j in jobs]
