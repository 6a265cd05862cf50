"""The `opir` command line: thin Typer commands that parse options and call the library."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    help="Restore photos degraded by rain, snow and haze with one all-in-one OPIR model.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


@app.callback()
def _main() -> None:
    """Restore photos degraded by rain, snow and haze with one all-in-one OPIR model."""


def _parse_tagged(values: list[str], option: str) -> dict[str, list[str]]:
    tagged: dict[str, list[str]] = {}
    for value in values:
        task, sep, folder = value.partition("=")
        if not sep or task not in ("rain", "snow", "haze"):
            raise typer.BadParameter(
                f"{value!r}: expected rain=DIR, snow=DIR or haze=DIR", param_hint=option
            )
        tagged.setdefault(task, []).append(folder)
    return tagged


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory (created)."),
    config: str = typer.Option("small", help="Model preset: tiny, small or paper."),
    data: list[str] = typer.Option(
        [], "--data", help="Paired folder tagged with its task: rain=DIR."
    ),
    clean: list[Path] = typer.Option(
        [], "--clean", help="Folder of clean photos (synthesis, clean class)."
    ),
    split: Path | None = typer.Option(
        None, help="Validation split JSON; its files are never trained on."
    ),
    data_root: Path | None = typer.Option(None, help="Root the split's paths are relative to."),
    synth_ratio: float = typer.Option(
        0.6, help="Share of weather samples synthesized from clean photos."
    ),
    clean_ratio: float = typer.Option(0.1, help="Share of clean -> clean samples."),
    steps: int = typer.Option(20000, help="Length of the cosine schedule."),
    stop_at: int | None = typer.Option(None, help="Stop at this step (resume later)."),
    batch: int = typer.Option(8),
    patch: int = typer.Option(128),
    lr: float = typer.Option(2e-4),
    seed: int = typer.Option(0),
    val_every: int = typer.Option(1000),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly."),
    init: Path | None = typer.Option(None, help="Start from these weights with a fresh schedule."),
    max_minutes: float | None = typer.Option(
        None, help="Stop cleanly (with a checkpoint) after this."
    ),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the step."),
) -> None:
    """Train OPIR on paired folders plus weather synthesized from clean photos (resumable)."""
    from opir_engine.train import (
        DataSpec,
        Recipe,
        Trainer,
        TrainingError,
        TrainingSet,
        ValidationSet,
    )
    from opir_engine.train_progress import run_with_progress

    try:
        if resume:
            trainer = Trainer.resume(out)
        else:
            if (out / "state").exists():
                raise TrainingError(f"{out}: already holds a run; pass --resume to continue it")
            recipe = Recipe(config=config, steps=steps, batch=batch, patch=patch, lr=lr,
                            synth_ratio=synth_ratio, clean_ratio=clean_ratio, seed=seed,
                            val_every=val_every)  # fmt: skip
            spec = DataSpec(paired=_parse_tagged(data, "--data"), clean=[str(c) for c in clean],
                            split=str(split) if split else None,
                            data_root=str(data_root) if data_root else None)  # fmt: skip
            trainer = Trainer(out, recipe, spec, init=init)
        training_set = TrainingSet(trainer.data, trainer.recipe)
        validation = None
        if trainer.data.split and trainer.data.data_root:
            validation = ValidationSet.from_split(
                Path(trainer.data.split), Path(trainer.data.data_root)
            )
    except TrainingError as e:
        err.print(f"error: {e}")
        raise typer.Exit(2) from e
    run_with_progress(trainer, training_set, validation, max_minutes, stop_at, compile)


def main() -> None:
    app()
