"""Restoring files: plan input -> output paths safely, restore each file, report.

Everything `opir restore` does besides parsing options lives here, so the local and the Ray
backend share one per-file function (`restore_file`) and one summary.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from opir_engine.image_io import (
    DEFAULT_MAX_PIXELS,
    ImageIOError,
    is_image_path,
    read_image,
    write_image,
)
from opir_engine.inference.engine import TASK_CHOICES, EngineError
from opir_engine.model import CLASSES

FORMAT_SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tiff"}


class UsageError(Exception):
    """The command cannot run as asked (bad paths, an output that would overwrite an input)."""


class NoImagesError(UsageError):
    """An input folder without images to restore; `subfolders` counts the ones not read."""

    def __init__(self, folder: Path, subfolders: int = 0) -> None:
        self.folder, self.subfolders = folder, subfolders
        unread = f" ({subfolders} subfolder{'s' * (subfolders > 1)} not read)" if subfolders else ""
        super().__init__(f"{folder}: no images found{unread}")


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path


@dataclass(frozen=True)
class RestoreOptions:
    """How each file is restored and written; checked on construction (UsageError)."""

    task: str = "auto"
    quality: int | None = None
    overwrite: bool = False
    save_uncertainty: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images fail (decompression bombs)

    def __post_init__(self) -> None:
        if self.task not in TASK_CHOICES:
            raise UsageError(f"--task must be one of {', '.join(TASK_CHOICES)}; got {self.task!r}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be in 1..100; got {self.quality}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be positive; got {self.max_pixels}")


@dataclass
class FileRecord:
    """One line of the report."""

    input: str
    output: str
    status: str  # "done", "skipped" or "failed"
    task: str = ""
    confidence: float | None = None
    width: int | None = None
    height: int | None = None
    ms: float | None = None
    flops: int = 0
    restored_at: str = ""  # "WxH" the model ran at: the photo's size or the working side's
    # How much the photo changed: PSNR in dB of the output against the input (lower: more
    # changed; inf: unchanged, as a clean photo passed through; null in JSON). Not a quality
    # score: there is no clean reference to measure against.
    psnr_vs_input: float | None = None
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _output_name(relative: Path, fmt: str, suffix: str) -> Path:
    ext = relative.suffix if fmt == "keep" else FORMAT_SUFFIXES[fmt]
    return relative.with_name(f"{relative.stem}{suffix}{ext}")


def plan_jobs(
    input: Path, output: Path, *, recursive: bool = False, fmt: str = "keep", suffix: str = ""
) -> list[Job]:
    """Map INPUT (a file or folder) to output paths, mirroring relative paths.

    Raises UsageError before anything runs when an output would overwrite any input, or when
    the output folder sits inside a recursively-read input folder (its files would be read
    back as inputs on the next run); NoImagesError when a folder holds no image to restore.
    Files in the folder that are these jobs' own outputs (an earlier run into the same
    folder) are not inputs: a rerun skips or replaces them.
    """
    if fmt != "keep" and fmt not in FORMAT_SUFFIXES:
        raise UsageError(f"--format must be keep, {', '.join(FORMAT_SUFFIXES)}; got {fmt!r}")
    if not input.exists():
        raise UsageError(f"{input}: no such file or folder")
    if input.is_file():
        if output.suffix and not output.is_dir():
            target = output if fmt == "keep" else output.with_suffix(FORMAT_SUFFIXES[fmt])
            jobs = [Job(input, target)]
        else:
            jobs = [Job(input, output / _output_name(Path(input.name), fmt, suffix))]
    else:
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: INPUT is a folder, so OUTPUT must be a folder")
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in input.glob(pattern) if p.is_file() and is_image_path(p))
        in_root, out_root = input.resolve(), output.resolve()
        if recursive and out_root != in_root and out_root.is_relative_to(in_root):
            raise UsageError(
                f"{output}: is inside the input folder {input} read with --recursive; "
                "choose an output folder outside it"
            )
        jobs = [Job(p, output / _output_name(p.relative_to(input), fmt, suffix)) for p in files]
        jobs = _without_own_outputs(jobs)
        if not jobs:
            subfolders = 0 if recursive else sum(p.is_dir() for p in input.iterdir())
            raise NoImagesError(input, subfolders)
    inputs = {j.input.resolve() for j in jobs}
    for job in jobs:
        if job.output.resolve() in inputs:
            raise UsageError(
                f"{job.output}: would overwrite an input; choose another output folder or --suffix"
            )
    outputs = Counter(j.output.resolve() for j in jobs)
    clash = [str(p) for p, n in outputs.items() if n > 1]
    if clash:
        raise UsageError(f"{clash[0]}: several inputs map to this output (same stem, other format)")
    return jobs


def _without_own_outputs(jobs: list[Job]) -> list[Job]:
    """Drop the jobs whose input is the output (or uncertainty map) of another job's input.

    With the output folder in the input tree, an earlier run's `photo_r.jpg` is listed beside
    `photo.jpg`; it is an output only while its source is a real input, so `photo_r.jpg`
    whose `photo.jpg` is gone stays an input (and `photo_r_r.jpg` an input when `photo_r.jpg`
    is an output). A file whose output is itself is never one: the overwrite guard refuses it.
    """
    inputs = {j.input.resolve() for j in jobs}
    sources: dict[Path, list[Path]] = {}
    for job in jobs:
        source = job.input.resolve()
        for made in (job.output.resolve(), uncertainty_path(job.output).resolve()):
            if made != source and made in inputs:
                sources.setdefault(made, []).append(source)
    own: dict[Path, bool] = {}

    def is_own(path: Path) -> bool:
        if path not in own:
            own[path] = False  # marks the path in progress: a cycle leaves it an input
            own[path] = any(not is_own(s) for s in sources.get(path, ()))
        return own[path]

    return [j for j in jobs if not is_own(j.input.resolve())]


# ---------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------


def uncertainty_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.uncertainty.png")


def restore_file(engine, job: Job, options: RestoreOptions) -> FileRecord:  # type: ignore[no-untyped-def]
    """Read, restore and atomically write one file; errors become a failed record.

    The output is written last, after the uncertainty map, so an output that exists is a
    finished one: a rerun after Ctrl-C skips exactly the files that were complete.
    """
    record = FileRecord(str(job.input), str(job.output), "done")
    if job.output.exists() and not options.overwrite:
        record.status = "skipped"
        return record
    if engine is None:  # needs_model found every output; this one was deleted since
        record.status, record.error = "failed", "no model loaded: the output was removed"
        return record
    try:
        t0 = time.perf_counter()
        decoded = read_image(job.input, max_pixels=options.max_pixels)
        record.width, record.height = decoded.source_size
        result = engine.restore(decoded, task=options.task)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        if options.save_uncertainty and result.uncertainty is not None:
            um = result.uncertainty  # scaled to its maximum: a map to look at, not to measure
            um = (um / um.max().clamp_min(1e-8)).expand(3, -1, -1)
            write_image(uncertainty_path(job.output), um, channels="gray")
        # skip or overwrite was decided above; save() still never writes over the input
        result.save(job.output, quality=options.quality, overwrite=True)
        record.ms = round(1000 * (time.perf_counter() - t0), 2)
        record.psnr_vs_input = change_psnr(result.image, decoded.rgb)
        record.task, record.confidence = result.task, round(result.confidence, 4)
        record.flops = result.flops
        if result.work_size is not None:
            record.restored_at = f"{result.work_size[1]}x{result.work_size[0]}"
    except ImageIOError as e:
        # Read errors name the input, which the error line starts with anyway; write errors
        # name the output.
        where = "" if e.path == str(job.input) else f"writing {e.path}: "
        record.status, record.error = "failed", where + e.reason
    except MemoryError:
        record.status, record.error = "failed", "out of memory (try a smaller --tile)"
    except (EngineError, OSError, ValueError, RuntimeError) as e:
        record.status, record.error = "failed", " ".join(f"{type(e).__name__}: {e}".split())
    return record


def change_psnr(output: torch.Tensor, input: torch.Tensor) -> float | None:
    """PSNR in dB (peak 1) of `output` against `input`, both (3, H, W) in [0, 1], to 2 decimals;
    inf when identical, None when the shapes differ.

    In float32, unlike `evaluation.metrics.psnr`: its float64 copies would take four times the
    photo's memory for a number shown to 0.01 dB.
    """
    if output.shape != input.shape:
        return None
    mse = torch.nn.functional.mse_loss(output.float(), input.float()).item()
    return math.inf if mse == 0 else round(10 * math.log10(1 / mse), 2)


def remove_stale_parts(jobs: Iterable[Job]) -> list[Path]:
    """Delete temporary files a killed run left beside these jobs' outputs; returns them.

    `image_io` writes `.<name>.<8 hex>.part` and renames it into place; a run killed hard
    (SIGKILL, power loss) can leave one. Only names made for a planned output are touched.
    """
    expected: dict[Path, set[str]] = {}
    for job in jobs:
        for out in (job.output, uncertainty_path(job.output)):
            expected.setdefault(out.parent, set()).add(out.name[:100])
    removed = []
    for folder, names in expected.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            stem, dot, token = entry.name.removesuffix(".part").rpartition(".")
            if (
                entry.name.startswith(".")
                and entry.name.endswith(".part")
                and dot
                and len(token) == 8
                and all(c in "0123456789abcdef" for c in token)
                and stem[1:] in names
                and entry.is_file()
            ):
                with contextlib.suppress(OSError):  # not ours to fail on: the run goes on
                    entry.unlink()
                    removed.append(entry)
    return removed


def needs_model(jobs: Iterable[Job], options: RestoreOptions) -> bool:
    """False when every output exists and is kept: the run only skips, so loading a model
    (seconds) is wasted. `run_jobs` then takes `engine=None`."""
    return options.overwrite or not all(job.output.exists() for job in jobs)


def run_jobs(
    engine,  # type: ignore[no-untyped-def]
    jobs: Iterable[Job],
    options: RestoreOptions,
    on_record: Callable[[FileRecord], None] | None = None,
) -> list[FileRecord]:
    """Restore every job in turn; a failure is recorded and the batch goes on.

    `on_record` sees each record as it is made, so a caller interrupted by Ctrl-C still
    holds the records of the files that finished.
    """
    jobs = list(jobs)
    remove_stale_parts(jobs)
    records = []
    for job in jobs:
        record = restore_file(engine, job, options)
        records.append(record)
        if on_record:
            on_record(record)
    return records


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    done: int
    skipped: int
    failed: int
    wall_s: float
    ms_p50: float | None
    ms_p95: float | None
    megapixels_per_s: float | None
    gflops_per_image: float | None
    achieved_gflops_per_s: float | None
    per_task: dict[str, int] = field(default_factory=dict)


def summarize(records: list[FileRecord], wall_s: float) -> Summary:
    """Counts, per-image latency (p50, p95, of the files restored), throughput and FLOPs."""
    done = [r for r in records if r.status == "done"]
    ms = np.array([r.ms for r in done], dtype=float)
    pixels = sum((r.width or 0) * (r.height or 0) for r in done)
    flops = sum(r.flops for r in done)
    busy_s = float(ms.sum()) / 1000 if done else 0.0
    return Summary(
        done=len(done),
        skipped=sum(r.status == "skipped" for r in records),
        failed=sum(r.status == "failed" for r in records),
        wall_s=round(wall_s, 3),
        ms_p50=round(float(np.percentile(ms, 50)), 1) if done else None,
        ms_p95=round(float(np.percentile(ms, 95)), 1) if done else None,
        megapixels_per_s=round(pixels / 1e6 / busy_s, 3) if busy_s else None,
        gflops_per_image=round(flops / 1e9 / len(done), 2) if done else None,
        achieved_gflops_per_s=round(flops / 1e9 / busy_s, 2) if busy_s else None,
        per_task={t: sum(r.task == t for r in done) for t in CLASSES},  # every class gets a count
    )


REPORT_SUFFIXES = (".json", ".csv", ".html")


def write_report(records: list[FileRecord], path: Path, summary: Summary | None = None) -> None:
    """JSON (records and summary), CSV (records) or HTML (a review page with thumbnails,
    `html_report`), chosen by the suffix; written atomically."""
    check_report_path(path)
    if path.suffix.lower() == ".html":
        # Imported here: html_report builds on this module's records (a cycle at import time).
        from opir_engine.batch.html_report import write_html_report

        write_html_report(records, path, summary)
        return
    rows = [asdict(r) for r in records]
    tmp = path.with_name(f".{path.name}.part")
    if path.suffix.lower() == ".csv":
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(FileRecord("", "", "")).keys()))
            writer.writeheader()
            writer.writerows(rows)
    else:
        for row in rows:  # JSON has no inf: an unchanged photo's psnr_vs_input is null there
            if row["psnr_vs_input"] == math.inf:
                row["psnr_vs_input"] = None
        data = {"files": rows, "summary": asdict(summary) if summary else None}
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def check_report_path(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in REPORT_SUFFIXES:
        raise UsageError(f"{path}: --report must end in .json, .csv or .html")
