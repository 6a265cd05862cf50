"""Training: the recipe of appendix B.1 scaled to the machine, resumable exactly.

Each step's data comes from a generator seeded by (seed, step) (`sampler`), so a resumed run
draws the same crops, flips and synthetic weather as an uninterrupted one; model and Adam state
are saved as safetensors, the rest as JSON (`run_folder`). The learning rate is a pure function
of the step (cosine from `lr` to `lr_min`), so no scheduler state is needed, and nothing in a
step draws from torch's generators (no dropout; batches come from numpy), so no RNG state is
either.

Runs train on the CPU or a CUDA device (`device` in run.json). Batches are always drawn on the
CPU, the same for either, and state is always saved as CPU tensors: a run resumes on the other
kind of device, and its checkpoints load anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from opir_engine.devices import DeviceError, keep_freed_memory, pick_device
from opir_engine.evaluation.contact_sheet import write_contact_sheet
from opir_engine.model import (
    CLASSES,
    OPIR,
    GrowthError,
    OPIRConfig,
    OPIRLoss,
    grow,
    same_classifier,
)
from opir_engine.training.recipe import (
    LINEAGE_KEYS,
    RESUME_CHANGES,
    DataSpec,
    Recipe,
    TrainingError,
)
from opir_engine.training.run_folder import (
    load_optimizer_state,
    machine_description,
    save_model_state,
    save_optimizer_state,
    write_json,
)
from opir_engine.training.sampler import TrainingSet, default_workers, step_batches
from opir_engine.training.validation import ValidationSet, evaluate
from opir_engine.weights import load_checkpoint, save_checkpoint


def training_device(name: str) -> torch.device:
    """`pick_device`'s rule ("auto": CUDA when available, else the CPU), narrowed to the
    devices training is written for (CPU, CUDA), with the GPU named. DeviceError otherwise."""
    device = pick_device(name)
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"training devices are auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and device.index is None:  # name the GPU in run.json and cards
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training: the first finishes the step in progress (a
    validation included) and stops with everything saved at that step boundary, so `Trainer.resume`
    continues exactly; a second Ctrl-C stops at once (the state is still saved, but a step cut
    in the middle of the optimizer update would not resume bit-exactly)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("stopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def weight_average(model: OPIR, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights with `decay` (None for 0), starting
    from its weights as they are (Polyak & Juditsky; `torch.optim.swa_utils`)."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class Trainer:
    """Owns one run directory: `run.json` (recipe, data, device), `state/` (resume), `log.jsonl`,
    `best.safetensors` + `best.json` (the best validation so far), `last.*`, `contact/` (a sheet
    per validation) and, with `keep_validated`, `validated/step-N.safetensors` (the weights of
    every validation, each with its card).

    `device` is "auto", "cpu", "cuda" or "cuda:N" (`training_device`); run.json records it as
    given, so a run started with "auto" resumes on whatever the resuming machine has; any other
    device is a DeviceError."""

    def __init__(self, run_dir: Path, recipe: Recipe, data: DataSpec, init: Path | None = None,
                 device: str = "cpu") -> None:  # fmt: skip
        self.device = training_device(device)  # first: a bad device fails before any work
        if self.device.type == "cpu":
            keep_freed_memory()  # maps reused instead of faulted in anew (devices.py says why)
        self.device_name = device
        self.run_dir = Path(run_dir)
        self.recipe = recipe
        self.data = data
        # Built on the CPU whatever the device: the same seed gives the same initial weights.
        with torch.random.fork_rng(devices=[]):  # the recipe's seed fixes the initial weights
            torch.manual_seed(recipe.seed)
            self.model = OPIR(OPIRConfig.from_name(recipe.config))
        # Where the weights came from: the init checkpoint's own training, and its init in turn,
        # so a fine-tune's card still tells the whole recipe, steps and hours behind it.
        self.init: dict[str, Any] | None = None
        if init is not None:
            initial, init_card = load_checkpoint(init)
            try:  # the same config, or a deeper one: grown, new blocks as the identity
                added = grow(initial, self.model)
            except GrowthError as e:
                message = f"{init}: cannot start a {recipe.config} run from it: {e}"
                raise TrainingError(message) from e
            self.init = {"weights": str(init), **{k: init_card.get(k) for k in LINEAGE_KEYS}}
            if added:
                self.init["grown_from"] = initial.config.to_dict()
            if not same_classifier(initial.config, self.model.config):
                self.init["classifier_not_copied"] = initial.config.classifier
        self.model.to(self.device)
        self.average = weight_average(self.model, recipe.ema)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.lr, betas=recipe.betas)
        self.loss = OPIRLoss().to(self.device)
        self.step = 0
        self.wall_seconds = 0.0
        self.best: float | None = None
        # recipe fields changed by a resume, each with the step it took effect at
        self.recipe_changes: list[dict[str, Any]] = []

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def resume(
        cls, run_dir: Path, device: str | None = None, changes: dict[str, Any] | None = None
    ) -> Trainer:
        """The run in `run_dir` at its last saved step, on `device` (default: the device its
        run.json records; runs made before the option trained on the CPU).

        `changes` sets recipe fields from this step on, only those of `RESUME_CHANGES` (what the
        batches draw, the weight average); run.json keeps every change with its step
        (`recipe_changes`), and so do the checkpoints' cards."""
        run_dir = Path(run_dir)
        try:
            info = json.loads((run_dir / "run.json").read_text())
            trainer_state = json.loads((run_dir / "state" / "trainer.json").read_text())
        except (OSError, ValueError) as e:
            raise TrainingError(f"{run_dir}: not a resumable run directory ({e})") from e
        recipe = Recipe.from_dict(info["recipe"])
        history = list(info.get("recipe_changes", []))
        if changes:
            fixed = sorted(set(changes) - set(RESUME_CHANGES))
            if fixed:
                allowed = ", ".join(RESUME_CHANGES)
                raise TrainingError(
                    f"a resumed run can change only {allowed}; not {', '.join(fixed)}"
                )
            if "task_weights" in changes:
                changes = {**changes, "task_weights": tuple(changes["task_weights"])}
            was = {name: getattr(recipe, name) for name in changes}
            recipe = dataclasses.replace(recipe, **changes)  # validated by Recipe itself
            history.append({"step": trainer_state["step"], **changes, "was": was})
        device = device or info.get("device", "cpu")
        trainer = cls(run_dir, recipe, DataSpec(**info["data"]), device=device)
        trainer.recipe_changes = history
        trainer.model.load_state_dict(load_file(str(run_dir / "state" / "model.safetensors")))
        trainer.average = weight_average(trainer.model, recipe.ema)  # from the loaded weights
        if trainer.average is not None and (run_dir / "state" / "average.safetensors").exists():
            saved = load_file(str(run_dir / "state" / "average.safetensors"))
            trainer.average.load_state_dict(saved)
        load_optimizer_state(trainer.optimizer, run_dir / "state" / "optimizer.safetensors",
                             trainer_state["optimizer"])  # fmt: skip
        trainer.step = trainer_state["step"]
        trainer.wall_seconds = trainer_state["wall_seconds"]
        trainer.best = trainer_state["best"]
        trainer.init = info.get("init")
        return trainer

    @property
    def bf16(self) -> bool:
        """Whether the forward runs under bf16 autocast (`Recipe.precision`)."""
        return self.recipe.precision == "bf16"

    @property
    def checkpointed(self) -> OPIR:
        """The weights validated and written to the checkpoints: the average when the recipe
        keeps one, else the trained weights."""
        return self.model if self.average is None else self.average.module  # type: ignore[return-value]

    def save_state(self) -> None:
        state_dir = self.run_dir / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        save_model_state(self.model, state_dir / "model.safetensors")
        if self.average is not None:
            save_model_state(self.average, state_dir / "average.safetensors")
        opt_meta = save_optimizer_state(self.optimizer, state_dir / "optimizer.safetensors")
        write_json(state_dir / "trainer.json", {
            "step": self.step, "wall_seconds": self.wall_seconds, "best": self.best,
            "optimizer": opt_meta,
        })  # fmt: skip

    def card(self, metrics: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "name": f"opir-{self.recipe.config}",
            "config": self.model.config.to_dict(),
            "classes": list(CLASSES),
            "recipe": dataclasses.asdict(self.recipe),
            "recipe_changes": self.recipe_changes,
            "data": dataclasses.asdict(self.data),
            "steps": self.step,
            "wall_time_hours": round(self.wall_seconds / 3600, 3),
            "machine": machine_description(self.device),
            "validation": metrics,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "init": self.init,
        }

    # -- the loop ------------------------------------------------------------------------------
    def train(
        self,
        training_set: TrainingSet,
        validation: ValidationSet | None,
        max_minutes: float | None = None,
        stop_step: int | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        compile_step: bool = False,
        workers: int | None = None,
        keep_validated: bool = False,
    ) -> None:
        """Train until `stop_step` (default: the recipe's steps) or `max_minutes`, then save.
        `workers` processes draw batches ahead (default `default_workers`); the batches, and so
        the run, are the same for any number. `keep_validated` keeps the weights of every
        validation: `best` is chosen by the mean gain alone, and the checkpoint a shipping rule
        wants (no row losing) may be another validation's."""
        if compile_step and self.bf16 and self.device.type == "cpu":
            # measured on torch 2.13: inductor's CPU graph of the bf16 KPN returns NaN kernels
            # from the first step (bench/README.md); eager bf16 is also the faster step here
            raise TrainingError(
                f"a compiled bf16 step on the CPU computes NaN with torch {torch.__version__}; "
                "train it eagerly (the faster step on the CPU) or in fp32"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "run.json", {
            "recipe": dataclasses.asdict(self.recipe), "recipe_changes": self.recipe_changes,
            "data": dataclasses.asdict(self.data), "counts": training_set.counts(),
            "machine": machine_description(self.device), "init": self.init,
            "device": self.device_name,
        })  # fmt: skip
        stop_step = min(stop_step or self.recipe.steps, self.recipe.steps)
        forward = torch.compile(self.model) if compile_step else self.model
        workers = default_workers(self.device) if workers is None else workers
        batches = step_batches(training_set, self.step, stop_step, self.device, workers)
        started = time.monotonic()
        last_saved = time.monotonic()
        log = open(self.run_dir / "log.jsonl", "a")  # noqa: SIM115
        self.model.train()
        with _StopRequest() as stop:
            try:
                while self.step < stop_step:
                    if stop.requested:
                        break
                    if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
                        break
                    t0 = time.monotonic()
                    degraded, target, labels, tasks = next(batches)
                    t1 = time.monotonic()
                    for group in self.optimizer.param_groups:
                        group["lr"] = self.recipe.lr_at(self.step)
                    weights = F.one_hot(tasks, len(CLASSES)).float()
                    with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                        output = forward(degraded, weights)
                    total, parts = self.loss(output.in_fp32(), target, labels)
                    self.optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self._refuse_non_finite(total, norm)
                    self.optimizer.step()
                    if self.average is not None:
                        self.average.update_parameters(self.model)
                    self.step += 1
                    # detach: float() of a tensor that requires grad warns on every run; float()
                    # waits for a CUDA step to finish, so step_ms is the step's, not its launch's
                    losses = {"loss": float(total.detach()),
                              **{k: float(v.detach()) for k, v in parts.items()}}  # fmt: skip
                    t2 = time.monotonic()
                    self.wall_seconds += t2 - t0
                    stats = {**losses, "data_ms": 1000 * (t1 - t0), "step_ms": 1000 * (t2 - t1),
                             "lr": self.recipe.lr_at(self.step - 1)}  # fmt: skip
                    if on_step:
                        on_step(self.step, stats)
                    if self.step % self.recipe.log_every == 0:
                        log.write(json.dumps({"step": self.step, **stats}) + "\n")
                        log.flush()
                    if validation is not None and self.step % self.recipe.val_every == 0:
                        self._validate(validation, log, keep_validated)
                    due = time.monotonic() - last_saved > 600  # at least every 10 minutes
                    if self.step % self.recipe.ckpt_every == 0 or due:
                        self.save_state()
                        last_saved = time.monotonic()
            finally:
                batches.close()  # ends the workers before saving
                log.close()
                self.save_state()
                save_checkpoint(
                    self.run_dir / "last.safetensors", self.checkpointed, self.card(None)
                )

    def _refuse_non_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Stop before a NaN or infinity reaches the weights: one Adam step of it would make
        every weight NaN, and the run's saves would then write those over the last good state.
        A non-finite loss makes its gradients so, so the gradient norm covers both; checked
        before `optimizer.step`, so the state saved on the way out is the last good step's.
        (One sync a step on CUDA, after the backward; the step's loss is read back anyway.)"""
        if not math.isfinite(float(norm)):
            raise TrainingError(
                f"step {self.step + 1}: the loss is {float(loss.detach())}, its gradient norm "
                f"{float(norm)}; the step was not applied and the run is saved at step "
                f"{self.step}"
            )

    def _validate(self, validation: ValidationSet, log: Any, keep: bool) -> dict[str, Any]:
        t = time.monotonic()
        rows: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        metrics = evaluate(self.checkpointed, validation, contact=rows)
        metrics["seconds"] = round(time.monotonic() - t, 1)
        if rows:  # looked at before a checkpoint is called better: numbers hide dimmed streaks
            write_contact_sheet(self.run_dir / "contact" / f"step-{self.step:06d}.jpg", rows)
        log.write(json.dumps({"step": self.step, "validation": metrics}) + "\n")
        log.flush()
        if keep:
            path = self.run_dir / "validated" / f"step-{self.step:06d}.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_checkpoint(path, self.checkpointed, self.card(metrics))
        score = metrics["mean_gain"]
        if self.best is None or score > self.best:
            self.best = score
            save_checkpoint(
                self.run_dir / "best.safetensors", self.checkpointed, self.card(metrics)
            )
        return metrics
