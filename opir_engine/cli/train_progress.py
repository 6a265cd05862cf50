"""A rich progress display for `Trainer.train` (kept out of the trainer so it stays testable)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from opir_engine.training.sampler import TrainingSet
from opir_engine.training.trainer import Trainer
from opir_engine.training.validation import ValidationSet


def run_with_progress(
    trainer: Trainer,
    training_set: TrainingSet,
    validation: ValidationSet | None,
    max_minutes: float | None,
    stop_at: int | None,
    compile_step: bool,
    workers: int | None = None,
    keep_validated: bool = False,
) -> None:
    console = Console(stderr=True)
    console.print(f"run {trainer.run_dir}: step {trainer.step} of {trainer.recipe.steps} on "
                  f"{trainer.device}; data {training_set.counts()}")  # fmt: skip
    columns = (
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} steps/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=trainer.recipe.steps, completed=trainer.step,
                                 loss=float("nan"), rate=0.0)  # fmt: skip

        def on_step(step: int, stats: dict[str, float]) -> None:
            rate = 1000.0 / max(stats["data_ms"] + stats["step_ms"], 1e-6)
            progress.update(task, completed=step, loss=stats["loss"], rate=rate)

        trainer.train(training_set, validation, max_minutes, stop_at, on_step, compile_step,
                      workers, keep_validated)  # fmt: skip
    console.print(f"stopped at step {trainer.step}; best mean PSNR gain {trainer.best}; "
                  f"state in {trainer.run_dir / 'state'}")  # fmt: skip
