"""The `opir` command line: thin Typer commands that parse options and call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup

from opir_weights import DEFAULT as DEFAULT_WEIGHTS  # no torch: `opir --help` stays quick

# Defaults decided at run time are written into the help as "\\[default: ...]": the help is
# rich markup, where a bare "[default: ...]" reads as a tag and vanishes.


class _BareArgument(TyperArgument):
    """An argument shown by its metavar alone: Typer would add a type tag such as <path>."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def _name_values(params: list[Any]) -> None:
    """Help names values by what they are (INPUT, PATH, N), not by Typer's type tags: a flag
    takes no value, so it shows none; an argument or option without an explicit metavar is
    named after itself (--task TASK)."""
    for param in params:
        if isinstance(param, TyperArgument):
            param.__class__ = _BareArgument
            param.metavar = param.metavar or param.name.upper()
        elif param.is_flag:
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = param.name.upper()


class _NamedValues:
    """Names every value in help (see `_name_values`), the help option's included."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _name_values(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _name_values([option])
        return option


class _Group(_NamedValues, TyperGroup):
    pass


class _Command(_NamedValues, TyperCommand):
    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """`[OPTIONS] INPUT OUTPUT`, an optional argument in brackets (Typer braces them)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


app = typer.Typer(
    cls=_Group,
    help="Restore photos degraded by rain, snow and haze with one all-in-one OPIR model.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from opir_engine import __version__  # opir_engine/__init__ imports nothing

        typer.echo(f"opir {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Restore photos degraded by rain, snow and haze with one all-in-one OPIR model."""


def _work_side(value: str) -> int | str | None:
    """--work-side: "auto", a number of pixels, or 0 for full size (None)."""
    from opir_engine.batch.runner import UsageError

    if value == "auto":
        return value
    try:
        side = int(value)
    except ValueError:
        raise UsageError(f"--work-side must be auto or a number of pixels; got {value!r}") from None
    return side or None


def _parse_tagged(values: list[str], option: str) -> dict[str, list[str]]:
    from opir_engine.model import TASKS  # the library loads on use: `opir --help` stays quick

    tagged: dict[str, list[str]] = {}
    for value in values:
        task, sep, folder = value.partition("=")
        if not sep or task not in TASKS:
            raise typer.BadParameter(
                f"{value!r}: expected rain=DIR, snow=DIR or haze=DIR", param_hint=option
            )
        tagged.setdefault(task, []).append(folder)
    return tagged


def _parse_task_weights(values: list[str]) -> tuple[float, float, float]:
    from opir_engine.model import TASKS

    weights = dict.fromkeys(TASKS, 1.0)
    for value in values:
        task, sep, number = value.partition("=")
        try:
            if not sep or task not in weights:
                raise ValueError
            weights[task] = float(number)
        except ValueError:
            raise typer.BadParameter(
                f"{value!r}: expected rain=W, snow=W or haze=W with W a number",
                param_hint="--task-weight",
            ) from None
    return tuple(weights[t] for t in TASKS)  # type: ignore[return-value]


@app.command(cls=_Command)
def train(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Run directory (created)."),
    config: str = typer.Option("small", help="Model preset: tiny, small, small-deep or paper."),
    data: list[str] = typer.Option(
        [], "--data", metavar="TASK=DIR", help="Paired folder tagged with its task: rain=DIR."
    ),
    clean: list[Path] = typer.Option(
        [], "--clean", metavar="DIR", help="Folder of clean photos (synthesis, clean class)."
    ),
    split: Path | None = typer.Option(
        None, metavar="FILE", help="Validation split JSON; its files are never trained on."
    ),
    data_root: Path | None = typer.Option(
        None, metavar="DIR", help="Root the split's paths are relative to."
    ),
    synth_ratio: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of weather samples synthesized from clean photos. \\[default: 0.6]",
    ),
    clean_ratio: float | None = typer.Option(
        None, metavar="X", help="Share of clean -> clean samples. \\[default: 0.1]"
    ),
    clean_under_weather: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of the clean samples shown under a weather's task, to be returned "
        "unchanged. \\[default: 0]",
    ),
    source_balance: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of the real pairs drawn from a source set chosen evenly (then a pair of "
        "it), so that small sets are seen as often as large ones. \\[default: 0]",
    ),
    rain_veil: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of synthesized rain seen through a grey veil of its own mist, as heavy "
        "real rain is. \\[default: 0]",
    ),
    rain_mist: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of synthesized rain seen through a mist brighter than the scene it covers, "
        "as daylight rain is. \\[default: 0]",
    ),
    dense_fog: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of synthesized haze drawn as fog dense over the whole frame. \\[default: 0]",
    ),
    haze_dim: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of synthesized haze laid on a dimmed photo: dark things under a bright "
        "veil. \\[default: 0]",
    ),
    haze_mist: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of synthesized haze drawn as a light mist over the whole frame, brighter "
        "than the scene. \\[default: 0]",
    ),
    rain_layers: list[Path] = typer.Option(
        [],
        "--rain-layers",
        metavar="DIR",
        help="Paired rain folder lending its rain layers to clean photos (see --transplant-ratio).",
    ),
    transplant_ratio: float | None = typer.Option(
        None,
        metavar="X",
        help="Share of synthesized rain transplanted from --rain-layers. \\[default: 0]",
    ),
    task_weight: list[str] = typer.Option(
        [],
        "--task-weight",
        metavar="TASK=W",
        help="How often a weather is drawn, relative: rain=2. \\[default: 1 each]",
    ),
    ema: float | None = typer.Option(
        None,
        metavar="DECAY",
        help="Validate and save a moving average of the weights (0.999: about the last 1000 "
        "steps). \\[default: 0, none]",
    ),
    precision: str | None = typer.Option(
        None,
        metavar="P",
        help="fp32, or bf16: the forward under bf16 autocast (weights, gradients and Adam "
        "in fp32). \\[default: fp32]",
    ),
    max_side: int = typer.Option(
        512,
        metavar="N",
        help="Photos are loaded at most this long (restore's --work-side is 1024).",
    ),
    steps: int = typer.Option(20000, metavar="N", help="Length of the cosine schedule."),
    stop_at: int | None = typer.Option(
        None, metavar="N", help="Stop at this step (resume later). \\[default: --steps]"
    ),
    batch: int = typer.Option(8, metavar="N", help="Crops per step."),
    patch: int = typer.Option(128, metavar="N", help="Side of the square training crops."),
    lr: float = typer.Option(
        2e-4, metavar="X", help="Learning rate at the start (Adam; cosine decay)."
    ),
    seed: int = typer.Option(
        0, metavar="N", help="Seeds the initial weights and every draw of data."
    ),
    val_every: int = typer.Option(1000, metavar="N", help="Validate every N steps."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out exactly; the sampling options given (ratios, "
        "--task-weight), --ema and --precision change it from here on, on record.",
    ),
    init: Path | None = typer.Option(
        None,
        metavar="PATH",
        help="Start from these weights with a fresh schedule (a deeper --config grows them; "
        "the trunk classifier of shipped weights is not copied: the run trains its own head).",
    ),
    max_minutes: float | None = typer.Option(
        None, metavar="X", help="Stop cleanly (with a checkpoint) after X minutes."
    ),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the step."),
    keep_validated: bool = typer.Option(
        False,
        "--keep-validated",
        help="Keep the weights of every validation in DIR/validated/ (best.safetensors is "
        "chosen by the mean gain alone).",
    ),
    device: str | None = typer.Option(
        None,
        help="auto (CUDA when available), cpu, cuda or cuda:N. "
        "\\[default: auto; with --resume, the run's own]",
    ),
    workers: int | None = typer.Option(
        None,
        min=0,
        metavar="N",
        help="Processes drawing batches ahead; the batches are the same for any number. "
        "\\[default: 0 on the CPU; on CUDA 4, at most the cores less 2]",
    ),
) -> None:
    """Train OPIR on paired folders plus weather synthesized from clean photos (resumable;
    Ctrl-C stops after the step in progress with everything saved, a second Ctrl-C at once)."""
    from opir_engine.cli.train_progress import run_with_progress
    from opir_engine.devices import DeviceError
    from opir_engine.training.recipe import DataSpec, Recipe, TrainingError
    from opir_engine.training.sampler import TrainingSet
    from opir_engine.training.trainer import Trainer
    from opir_engine.training.validation import ValidationSet

    if split and not data_root:
        raise typer.BadParameter("a validation split needs --data-root", param_hint="--split")
    # what the batches draw, the average, the precision: given on a resume, these change the
    # run from its current step
    mix = {"synth_ratio": synth_ratio, "clean_ratio": clean_ratio,
           "transplant_ratio": transplant_ratio, "clean_under_weather": clean_under_weather,
           "source_balance": source_balance, "rain_veil": rain_veil, "rain_mist": rain_mist,
           "dense_fog": dense_fog, "haze_dim": haze_dim, "haze_mist": haze_mist,
           "task_weights": _parse_task_weights(task_weight) if task_weight else None,
           "ema": ema, "precision": precision}  # fmt: skip
    mix = {name: value for name, value in mix.items() if value is not None}
    try:
        if resume:
            trainer = Trainer.resume(out, device, changes=mix)
        else:
            if (out / "state").exists():
                raise TrainingError(f"{out}: already holds a run; pass --resume to continue it")
            recipe = Recipe(config=config, steps=steps, batch=batch, patch=patch, lr=lr,
                            seed=seed, max_side=max_side, val_every=val_every,
                            **mix)  # fmt: skip
            spec = DataSpec(paired=_parse_tagged(data, "--data"), clean=[str(c) for c in clean],
                            rain_layers=[str(d) for d in rain_layers],
                            split=str(split) if split else None,
                            data_root=str(data_root) if data_root else None)  # fmt: skip
            trainer = Trainer(out, recipe, spec, init=init, device=device or "auto")
        training_set = TrainingSet(trainer.data, trainer.recipe)
        validation = None
        if trainer.data.split and trainer.data.data_root:
            validation = ValidationSet.from_split(
                Path(trainer.data.split), Path(trainer.data.data_root)
            )
    except DeviceError as e:
        err.print(f"error: --device: {e}")
        raise typer.Exit(2) from e
    except TrainingError as e:
        err.print(f"error: {e}")
        raise typer.Exit(2) from e
    run_with_progress(trainer, training_set, validation, max_minutes, stop_at, compile, workers,
                      keep_validated)  # fmt: skip


@app.command("train-classifier", cls=_Command)
def train_classifier(
    weights: Path = typer.Argument(..., help="Trained checkpoint (.safetensors) to extend."),
    out: Path = typer.Option(
        ..., "--out", metavar="PATH", help="Write the checkpoint with its classifier here."
    ),
    data: list[str] = typer.Option(
        [],
        "--data",
        metavar="TASK=DIR",
        help="Paired folder tagged with its task: rain=DIR (targets count as clean).",
    ),
    photos: list[str] = typer.Option(
        [], "--photos", metavar="TASK=DIR", help="Degraded photos without targets: snow=DIR."
    ),
    clean: list[Path] = typer.Option([], "--clean", metavar="DIR", help="Folder of clean photos."),
    split: Path | None = typer.Option(
        None, metavar="FILE", help="Validation split JSON: never trained on."
    ),
    data_root: Path | None = typer.Option(
        None, metavar="DIR", help="Root the split's paths are relative to."
    ),
    rain_layers: list[Path] = typer.Option(
        [],
        "--rain-layers",
        metavar="DIR",
        help="Paired rain folder lending its rain layers to clean photos (see --transplant-ratio).",
    ),
    transplant_ratio: float = typer.Option(
        0.0, metavar="X", help="Share of synthetic rain views that are a --rain-layers layer."
    ),
    snow_variety: float = typer.Option(
        0.0, metavar="X", help="Share of synthetic snow views with larger flakes, some veiled."
    ),
    snow_sparse: float = typer.Option(
        0.0, metavar="X", help="Share of the other synthetic snow views with few flakes."
    ),
    rain_veil: float = typer.Option(
        0.0, metavar="X", help="Share of synthetic rain views seen through a grey veil of mist."
    ),
    views: int = typer.Option(1000, metavar="N", help="Views rendered per class."),
    steps: int = typer.Option(4000, metavar="N", help="Training steps."),
    lr: float = typer.Option(1e-3, metavar="X", help="Learning rate at the start (cosine)."),
    width: int = typer.Option(24, metavar="N", help="The classifier trunk's first width."),
    seed: int = typer.Option(0, metavar="N", help="Seeds the views and the classifier."),
    start: Path | None = typer.Option(
        None,
        "--start-from",
        metavar="PATH",
        help="Train on from this checkpoint's trained classifier (and its width), not a fresh one.",
    ),
    donor: Path | None = typer.Option(
        None,
        "--from",
        metavar="PATH",
        help="Copy the trained classifier of this checkpoint instead of training.",
    ),
    recalibrate: bool = typer.Option(
        False,
        "--recalibrate",
        help="With --from: choose clean_threshold again on the donor's "
        "held-out views (by the current rule) and score the split again.",
    ),
) -> None:
    """Train the `--task auto` classifier on whole images as the engine sees them; every
    other weight is kept (a second phase after `opir train`). With --from, reuse a trained
    classifier: it reads the image alone, so it fits newer restoration weights as they are."""
    from rich.progress import Progress

    from opir_engine.training.classifier import (
        ClassifierData,
        ClassifierRecipe,
        ClassifierTrainingError,
        summarize_report,
        train_classifier_checkpoint,
        transplant_classifier,
    )
    from opir_engine.weights import CheckpointError

    if out.resolve() == weights.resolve():
        raise typer.BadParameter("refusing to overwrite the input checkpoint", param_hint="--out")
    if recalibrate and donor is None:
        raise typer.BadParameter("needs --from DONOR", param_hint="--recalibrate")
    if donor is not None:
        try:
            report = transplant_classifier(weights, donor, out, recalibrate)
        except (ClassifierTrainingError, CheckpointError) as e:
            err.print(f"error: {e}")
            raise typer.Exit(2) from e
        err.print(summarize_report(report, out), highlight=False)
        return
    if split and not data_root:
        raise typer.BadParameter("a validation split needs --data-root", param_hint="--split")
    spec = ClassifierData(paired=_parse_tagged(data, "--data"),
                          photos=_parse_tagged(photos, "--photos"), clean=[str(c) for c in clean],
                          rain_layers=[str(d) for d in rain_layers],
                          split=str(split) if split else None,
                          data_root=str(data_root) if data_root else None)  # fmt: skip
    try:
        recipe = ClassifierRecipe(views_per_class=views, steps=steps, width=width, seed=seed, lr=lr,
                                  transplant_ratio=transplant_ratio,
                                  snow_variety=snow_variety, snow_sparse=snow_sparse,
                                  rain_veil=rain_veil)  # fmt: skip
        with Progress(console=err, transient=True) as progress:
            render = progress.add_task("rendering views", total=views * 4)
            train = progress.add_task("training", total=steps, start=False)

            def on_step(step: int, loss: float) -> None:
                progress.start_task(train)
                progress.update(train, completed=step, description=f"training (loss {loss:.3f})")

            report = train_classifier_checkpoint(
                weights, out, spec, recipe,
                on_view=lambda done, total: progress.update(render, completed=done, total=total),
                on_step=on_step, start=start,
            )  # fmt: skip
    except (ClassifierTrainingError, CheckpointError) as e:
        err.print(f"error: {e}")
        raise typer.Exit(2) from e
    err.print(summarize_report(report, out), highlight=False)


@app.command(cls=_Command)
def restore(
    input: Path = typer.Argument(..., help="An image file or a folder of images."),
    output: Path = typer.Argument(..., help="Output folder (or file, for one input file)."),
    task: str = typer.Option(
        "auto", help="auto (the model decides per image), rain, snow or haze."
    ),
    weights: str = typer.Option(
        DEFAULT_WEIGHTS, metavar="NAME|PATH", help="Shipped checkpoint name or .safetensors path."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16 or bf16."),
    tile: int | None = typer.Option(
        None,
        metavar="N",
        help="Tile side: force tiles of N px. \\[default: one piece when the photo fits in free "
        "memory, else the largest tiles that fit]",
    ),
    tile_overlap: int | None = typer.Option(
        None,
        metavar="N",
        help="Overlap between tiles, blended smoothly. \\[default: 128; 32 with --pooling global]",
    ),
    pooling: str = typer.Option(
        "shared",
        metavar="MODE",
        help="How tiles take the model's global statistics: shared (the whole photo's, so tiles "
        "agree with one piece), local (a window around each pixel) or global (each tile its own).",
    ),
    work_side: str = typer.Option(
        "auto",  # engine.DEFAULT_WORK_SIDE
        metavar="auto|N",
        help="Photos longer than N are restored at N and the correction is carried back to full "
        "size (the model knows weather at the scale it trained on); 0: full size; auto: a photo "
        "over 1024 px at the side of 512-1536 that leaves the fewest streak-like lines.",
    ),
    batch_size: int = typer.Option(1, min=1, metavar="N", help="Tiles per forward pass."),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        # cli/restore.py and the Ray backend decide on the device picked: the first compile
        # takes minutes on a CPU, where eager was as fast.
        help="torch.compile the model. \\[default: on CUDA only]",
    ),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Include subfolders."),
    format: str = typer.Option("keep", help="keep, png, jpg, webp or tiff."),
    suffix: str = typer.Option("", help="Added to each output's stem, e.g. _restored."),
    quality: int | None = typer.Option(
        None,
        metavar="1-100",
        # image_io.write_image_like: a JPEG keeps its source JPEG's estimated quality.
        help="JPEG/WebP quality. "
        "\\[default: JPEG: the input JPEG's own quality, else 95; WebP: lossless]",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite/--skip-existing", help="Replace outputs that exist."
    ),
    save_uncertainty: bool = typer.Option(False, help="Also write <name>.uncertainty.png."),
    report: Path | None = typer.Option(
        None,
        metavar="FILE",
        help="Per-image report: .json, .csv, or .html (a review page; its thumbnails go in "
        "<name>_files/ beside it).",
    ),
    max_pixels: int = typer.Option(
        200_000_000, metavar="N", help="Larger images fail as possible decompression bombs."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be done, load nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    backend: str = typer.Option("local", help="local (this process) or ray (a Ray cluster)."),
    address: str | None = typer.Option(
        None,
        help="Ray cluster to join: auto or ray://HOST:PORT. \\[default: start a local one]",
    ),
    workers: int = typer.Option(2, min=1, metavar="N", help="Ray actors, each holding one model."),
    gpus_per_worker: float = typer.Option(
        0.0, min=0.0, metavar="X", help="GPUs per Ray actor (0: CPU)."
    ),
) -> None:
    """Restore a photo or a folder of photos; inputs are never modified."""
    from opir_engine.batch.runner import RestoreOptions, UsageError, check_report_path, plan_jobs
    from opir_engine.cli.restore import run_restore, usage_error_line

    try:
        check_report_path(report)
        options = RestoreOptions(task, quality, overwrite, save_uncertainty, max_pixels)
        jobs = plan_jobs(input, output, recursive=recursive, fmt=format, suffix=suffix)
        if backend not in ("local", "ray"):
            raise UsageError(f"--backend must be local or ray; got {backend!r}")
        side = _work_side(work_side)
    except UsageError as e:
        err.print(usage_error_line(e), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2) from e
    engine_args = dict(name_or_path=weights, device=device, precision=precision, tile=tile,
                       tile_overlap=tile_overlap, pooling=pooling, compile=compile,
                       work_side=side)  # fmt: skip
    ray_args = None
    if backend == "ray":
        ray_args = dict(address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    code = run_restore(jobs, options, engine_args, batch_size, report, dry_run, quiet, ray_args)
    raise typer.Exit(code)


@app.command(cls=_Command)
def models() -> None:
    """List the shipped checkpoints with their cards' summary."""
    from opir_engine.cli.models import print_models

    print_models()


@app.command(cls=_Command)
def synth(
    clean_dir: Path = typer.Argument(..., help="Folder of clean photos (searched recursively)."),
    out_dir: Path = typer.Argument(..., help="Writes input/, target/ and pairs.jsonl here."),
    kind: str = typer.Option(..., help="rain, snow, haze or mixed."),
    count: int = typer.Option(..., min=1, metavar="N", help="Number of pairs."),
    seed: int = typer.Option(0, metavar="N", help="Everything drawn follows from it."),
) -> None:
    """Synthesize degraded/clean pairs from clean photos with the paper's models (Eq. 2-4)."""
    from opir_engine.image_io import ImageIOError
    from opir_engine.synthesis import KINDS, SynthesisError, synthesize_folder

    if kind not in (*KINDS, "mixed"):
        err.print(f"error: --kind must be rain, snow, haze or mixed, got {kind!r}")
        raise typer.Exit(2)
    try:
        records = synthesize_folder(clean_dir, out_dir, kind, count, seed)
    except (SynthesisError, ImageIOError) as e:
        err.print(f"error: {e}", highlight=False)
        raise typer.Exit(1) from e
    Console().print(f"wrote {len(records)} pairs to {out_dir} (parameters in pairs.jsonl)")


@app.command("eval", cls=_Command)
def evaluate(
    restored: Path | None = typer.Argument(
        None, metavar="RESTORED_DIR", help="Folder of restored images."
    ),
    target: Path | None = typer.Argument(
        None, metavar="TARGET_DIR", help="Folder of ground truth, matched by stem."
    ),
    input: Path | None = typer.Option(
        None, "--input", metavar="DIR", help="Degraded inputs: adds their scores."
    ),
    y: bool = typer.Option(False, "--y", help="Score the Y channel (BT.601), as for deraining."),
    csv_path: Path | None = typer.Option(
        None, "--csv", metavar="FILE", help="Write per-image scores here."
    ),
    weights: str | None = typer.Option(
        None, metavar="NAME|PATH", help="Evaluate these weights on held-out data."
    ),
    split: Path | None = typer.Option(
        None, metavar="FILE", help="Validation split JSON (with --weights)."
    ),
    data_root: Path | None = typer.Option(None, metavar="DIR", help="Root of the split's paths."),
    data: list[str] = typer.Option(
        [], "--data", metavar="TASK=DIR", help="Paired folder: rain=DIR (with --weights)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (with --weights)."),
    precision: str = typer.Option(
        "auto", help="auto, fp32, fp16 or bf16, as opir restore takes it (with --weights)."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", metavar="FILE", help="Write the table as JSON."
    ),
    per_set: bool = typer.Option(
        False, "--per-set", help="With --weights: a row per source set under each task."
    ),
    every_task: Path | None = typer.Option(
        None,
        "--every-task",
        metavar="FILE",
        help="With --weights: restore every item under every task and write the table here; "
        "without: read it. Prints rows per decision: the classifier's, an oracle's.",
    ),
    classifier: list[str] = typer.Option(
        [],
        "--classifier",
        metavar="NAME|PATH",
        help="With --every-task: rows under this checkpoint's classifier too (no restoring).",
    ),
    against: Path | None = typer.Option(
        None,
        "--against",
        metavar="FILE",
        help="With --every-task: judge its auto rows against this table's (the shipping rule: "
        "no row's PSNR lower, no clean photo under 40 dB).",
    ),
) -> None:
    """PSNR/SSIM of restored folders, or of a checkpoint on paired folders / the held-out split."""
    from opir_engine.cli.evaluate import eval_engine, eval_every_task, eval_folders

    if every_task is not None:
        ignored = [flag for flag, given in (("--y", y), ("--per-set", per_set),
                   ("--json", json_path), ("--csv", csv_path), ("RESTORED_DIR", restored))
                   if given]  # fmt: skip
        if ignored:
            err.print(
                f"error: --every-task scores RGB per set into its table: not with {ignored[0]}"
            )
            raise typer.Exit(2)
        tagged = _parse_tagged(data, "--data")
        raise typer.Exit(eval_every_task(weights, split, data_root, tagged, device, every_task,
                                         classifier, precision, against))  # fmt: skip
    if classifier or against:
        flag = "--classifier compares classifiers" if classifier else "--against compares tables"
        err.print(f"error: {flag} on an --every-task table")
        raise typer.Exit(2)

    if weights is None:
        if restored is None or target is None:
            err.print("error: give RESTORED_DIR TARGET_DIR, or --weights with --split/--data")
            raise typer.Exit(2)
        raise typer.Exit(eval_folders(restored, target, input, y, csv_path))
    tagged = _parse_tagged(data, "--data")
    raise typer.Exit(
        eval_engine(weights, split, data_root, tagged, y, device, json_path, per_set, precision)
    )


@app.command(cls=_Command)
def profile(
    weights: str | None = typer.Option(
        None,
        metavar="NAME|PATH",
        help="Shipped checkpoint name or .safetensors path. "
        f"\\[default: {DEFAULT_WEIGHTS}, what opir restore uses]",
    ),
    config: str | None = typer.Option(
        None,
        help="Profile this preset with random weights instead: tiny, small, small-deep or paper.",
    ),
    sizes: str = typer.Option("256,512", help="N, WxH, 720p, 1080p, 1440p or 4k; comma-separated."),
    batch: int = typer.Option(1, metavar="N", help="Images per forward."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16, fp16 or auto."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    runs: int = typer.Option(10, metavar="N", help="Timed runs per size, after the warm-up."),
    warmup: int = typer.Option(2, metavar="N", help="Untimed runs first (compiling, caches)."),
    breakdown: bool = typer.Option(True, "--breakdown/--no-breakdown", help="Time each part."),
    compare: str = typer.Option("none", help="none or promptir (timed side by side)."),
    threads: int | None = typer.Option(
        None,
        metavar="N",
        help="CPU threads for torch. \\[default: torch's own]",
    ),
    json_path: Path | None = typer.Option(
        None, "--json", metavar="FILE", help="Write the figures as JSON."
    ),
) -> None:
    """Latency, throughput, FLOPs and memory per size, per part, and against PromptIR."""
    from opir_engine.cli.render_profile import render_report
    from opir_engine.devices import DeviceError
    from opir_engine.profiling.profile import run_profile
    from opir_engine.profiling.settings import ProfileError, ProfileSettings, parse_sizes

    try:
        settings = ProfileSettings(
            config=config, weights=weights, sizes=tuple(parse_sizes(sizes)), batch=batch,
            device=device, precision=precision, compile=compile, runs=runs, warmup=warmup,
            breakdown=breakdown, compare=compare, threads=threads,
        )  # fmt: skip
        report = run_profile(settings, progress=err.log)
    except (ProfileError, DeviceError) as e:
        # The library speaks of values; the option at fault is the command line's to name.
        option = getattr(e, "setting", None)
        where = f"--{option.replace('_', '-')}: " if option else ""
        err.print(f"error: {where}{e}", highlight=False)
        raise typer.Exit(1) from e
    render_report(report, Console())
    if json_path is not None:
        report.write_json(json_path)


def main() -> None:
    app()


if __name__ == "__main__":  # python -m opir_engine.cli.app
    main()
