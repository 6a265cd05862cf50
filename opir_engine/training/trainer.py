"""Training: the recipe of appendix B.1 scaled to the machine, resumable exactly.

Each step's data comes from a generator seeded by (seed, step), so a resumed run draws the
same crops, flips and synthetic weather as an uninterrupted one; model and Adam state are
saved as safetensors, the rest as JSON. The learning rate is a pure function of the step
(cosine from `lr` to `lr_min`), so no scheduler state is needed, and nothing in a step draws
from torch's generators (no dropout; batches come from numpy), so no RNG state is either.

Runs train on the CPU or a CUDA device (`device` in run.json). Batches are always drawn on the
CPU, the same for either, and state is always saved as CPU tensors: a run resumes on the other
kind of device, and its checkpoints load anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from opir_engine.datasets import (
    Pair,
    class_index,
    held_out_names,
    kept_images,
    kept_pairs,
    load_rgb,
)
from opir_engine.devices import DeviceError, pick_device
from opir_engine.evaluation.metrics import psnr, ssim
from opir_engine.evaluation.scoring import finite_mean, validation_items
from opir_engine.model import CLASSES, OPIR, TASKS, GrowthError, OPIRConfig, OPIRLoss, grow
from opir_engine.model.padding import crop_to, pad_to_multiple
from opir_engine.synthesis import scale_for_size, synthesize
from opir_engine.weights import load_checkpoint, save_checkpoint

_LINEAGE_KEYS = ("steps", "wall_time_hours", "recipe", "data", "init")  # kept of an init's card
# Drawing a batch of 32 128x128 crops (about half synthesized) takes 30-60 ms on one core, about
# what we estimate a CUDA step of the small config to take (not measured yet), so a CUDA run draws
# them ahead in worker processes; the CPU trains on every core itself and draws in turn.
_CUDA_WORKERS = 4


class TrainingError(Exception):
    """A run directory or training option is unusable."""


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a run besides the data (appendix B.1 defaults, machine-sized)."""

    config: str = "small"
    steps: int = 20000
    batch: int = 8
    patch: int = 128
    lr: float = 2e-4
    lr_min: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    synth_ratio: float = 0.6
    clean_ratio: float = 0.1
    # How often each weather is drawn, rain/snow/haze (relative): a fine-tune can lean on the
    # task that lags without starving the others. Equal weights draw as every earlier run did.
    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    max_side: int = 512
    seed: int = 0
    val_every: int = 1000
    ckpt_every: int = 250
    log_every: int = 25

    def __post_init__(self) -> None:
        w = self.task_weights
        if len(w) != 3 or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise TrainingError(
                f"task weights must be three finite numbers >= 0 (rain, snow, haze), not all 0; "
                f"got {tuple(w)}"
            )

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Recipe:
        """The recipe of a run.json or card (JSON lists back to tuples; runs made before
        `task_weights` existed get equal weights)."""
        fields = dict(fields, betas=tuple(fields["betas"]))
        if "task_weights" in fields:
            fields["task_weights"] = tuple(fields["task_weights"])
        return cls(**fields)

    def lr_at(self, step: int) -> float:
        """Cosine annealing from lr to lr_min over `steps` (Loshchilov & Hutter)."""
        t = min(step, self.steps) / max(self.steps, 1)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * t))


@dataclass
class DataSpec:
    """Where training reads from: paired folders per task, clean photos, the held-out split."""

    paired: dict[str, list[str]] = field(default_factory=dict)
    clean: list[str] = field(default_factory=list)
    split: str | None = None
    data_root: str | None = None


def lineage(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainings behind a checkpoint's card, first to last: each stage's recipe, data, steps,
    wall time and the weights it started from (`init_weights`, None for a fresh start)."""
    stages = []
    node: dict[str, Any] | None = card
    while node is not None:
        parent = node.get("init")
        stages.append({k: node.get(k) for k in ("steps", "wall_time_hours", "recipe", "data")}
                      | {"init_weights": parent["weights"] if parent else None})  # fmt: skip
        node = parent
    return stages[::-1]


def train_command(recipe: Recipe, data: DataSpec, init: str | None = None, out: str = "RUN",
                  data_alias: str = "DATA") -> str:  # fmt: skip
    """The `opir train` command line that makes a run in `out` with this recipe and data (the
    data root written as `data_alias`), from `init` weights if given."""
    root = data.data_root

    def path(p: str) -> str:
        return shlex.quote(data_alias + p[len(root) :] if root and p.startswith(root) else p)

    defaults = Recipe()
    args = [f"opir train --out {shlex.quote(out)}", f"--config {recipe.config}"]
    args += [f"--data {task}={path(f)}" for task, folders in data.paired.items() for f in folders]
    args += [f"--clean {path(f)}" for f in data.clean]
    if data.split:
        args.append(f"--split {path(data.split)}")
        if root:
            args.append(f"--data-root {data_alias}")
    for name in ("synth_ratio", "clean_ratio", "steps", "batch", "patch", "lr", "seed",
                 "max_side", "val_every"):  # fmt: skip
        value = getattr(recipe, name)
        if value != getattr(defaults, name):
            args.append(f"--{name.replace('_', '-')} {value!r}")
    for task, weight in zip(TASKS, recipe.task_weights, strict=True):
        if weight != 1.0:  # the default weight
            args.append(f"--task-weight {task}={weight!r}")
    if init:
        args.append(f"--init {shlex.quote(init)}")
    return " ".join(args)


def training_device(name: str) -> torch.device:
    """The engine's device rule ("auto": CUDA when available, else the CPU) for the devices
    training is written for; TrainingError for anything else."""
    try:
        device = pick_device(name)
    except DeviceError as e:
        raise TrainingError(f"--device: {e}") from e
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and device.index is None:  # name the GPU in run.json and cards
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_workers(device: torch.device) -> int:
    """Batch-drawing worker processes when --workers is not given (see `_CUDA_WORKERS`)."""
    if device.type == "cpu":
        return 0
    return min(_CUDA_WORKERS, max((os.cpu_count() or 1) - 2, 0))


class TrainingSet:
    """Preloaded images and a per-step batch sampler. On the CPU it draws in the main process
    (no worker competes for the cores; sampling costs a few percent of a CPU step, see the run
    log's `data_ms`); a CUDA run draws ahead in workers (`step_batches`)."""

    def __init__(self, spec: DataSpec, recipe: Recipe) -> None:
        excluded: set[str] = set()
        if spec.split:
            if not spec.data_root:  # the split's paths are relative: nothing would be excluded
                raise TrainingError(f"{spec.split}: a validation split needs --data-root")
            excluded = held_out_names(Path(spec.split))
        root = Path(spec.data_root) if spec.data_root else Path("/")
        self.paths: list[Path] = []  # every file loaded, in order (tests check the exclusion)
        self.pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for task, folders in spec.paired.items():
            pairs = kept_pairs(folders, task, excluded, root)
            self.pairs[task] = [self._load_pair(p, recipe.max_side) for p in pairs]
            self.paths += [q for p in pairs for q in (p.input, p.target)]
        clean_paths = kept_images(spec.clean, excluded, root)
        self.clean = [load_rgb(p, recipe.max_side) for p in clean_paths]
        self.paths += clean_paths
        if not self.clean:
            raise TrainingError("no clean photos to synthesize from (pass --clean DIR)")
        self.recipe = recipe

    @staticmethod
    def _load_pair(pair: Pair, max_side: int) -> tuple[torch.Tensor, torch.Tensor]:
        degraded, target = load_rgb(pair.input, max_side), load_rgb(pair.target, max_side)
        if degraded.shape != target.shape:
            raise TrainingError(f"{pair.input}: input and target sizes differ")
        return degraded, target

    def counts(self) -> dict[str, int]:
        return {**{t: len(p) for t, p in self.pairs.items()}, "clean": len(self.clean)}

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(degraded, target) (B, 3, P, P) float in [0, 1] and class indices (B,) for a step."""
        rng = np.random.default_rng([self.recipe.seed, step])
        samples = [self._sample(rng) for _ in range(self.recipe.batch)]
        degraded, target, labels = zip(*samples, strict=True)
        return torch.stack(degraded), torch.stack(target), torch.tensor(labels)

    def _sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        r = self.recipe
        if rng.random() < r.clean_ratio:  # clean -> clean teaches the head and pass-through
            image = self._crop([self.clean[rng.integers(len(self.clean))]], rng)[0]
            return image, image, class_index("clean")
        task = TASKS[self._draw_weather(rng)]
        real = self.pairs.get(task, [])
        if real and rng.random() >= r.synth_ratio:
            degraded, target = self._crop(list(real[rng.integers(len(real))]), rng)
            return degraded, target, class_index(task)
        source = self.clean[rng.integers(len(self.clean))]
        target = self._crop([source], rng)[0]
        seed = int(rng.integers(0, 2**62))
        degraded, _ = synthesize(target, task, seed, scale=scale_for_size(*source.shape[-2:]))
        return degraded.clamp(0, 1), target, class_index(task)

    def _draw_weather(self, rng: np.random.Generator) -> int:
        weights = np.asarray(self.recipe.task_weights, dtype=np.float64)
        if np.all(weights == weights[0]):  # uniform: the draw of runs made before the option
            return int(rng.integers(3))
        return int(rng.choice(3, p=weights / weights.sum()))

    def _crop(self, images: list[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
        """The same random crop and flips of each image, as float (3, P, P)."""
        p = self.recipe.patch
        h, w = images[0].shape[-2:]
        if h < p or w < p:  # upscale small photos so a full patch fits
            scale = p / min(h, w)
            size = (max(p, math.ceil(h * scale)), max(p, math.ceil(w * scale)))
            images = [
                F.interpolate(im[None].float(), size=size, mode="bilinear")[0] for im in images
            ]
            h, w = size
        y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        flip_h, flip_v = rng.random() < 0.5, rng.random() < 0.5
        out = []
        for im in images:
            crop = im[:, y : y + p, x : x + p].float() / 255.0
            if flip_h:
                crop = crop.flip(-1)
            if flip_v:
                crop = crop.flip(-2)
            out.append(crop.contiguous())
        return out


class _Steps(Dataset):
    """Item i is the batch of step `start + i`. A batch is a pure function of its step, so
    workers drawing steps ahead in parallel hand back exactly the batches, in the order, that a
    serial run draws: a run resumes on the same batches whatever the worker count."""

    def __init__(self, training_set: TrainingSet, start: int, stop: int) -> None:
        self.training_set, self.start, self.stop = training_set, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.training_set.batch(self.start + index)


def _leave_signals_to_the_trainer(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: a worker it ended would fail the run, while the
    main process means to finish the step in progress and save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step_batches(
    training_set: TrainingSet, start: int, stop: int, device: torch.device, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of steps start .. stop - 1 in order, on `device`: drawn on the CPU (in the
    main process, or ahead in `workers` processes), pinned and copied without waiting on CUDA."""
    cuda = device.type == "cuda"
    # fork: workers share the preloaded photos instead of each unpickling a copy (Python 3.14
    # starts workers with forkserver by default)
    fork = workers and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork") if fork else None
    loader = DataLoader(
        _Steps(training_set, start, stop),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        multiprocessing_context=context,
        worker_init_fn=_leave_signals_to_the_trainer if workers else None,
        generator=torch.Generator(),  # its workers' seeds: not drawn from torch's global stream
    )
    for batch in loader:
        degraded, target, labels = (t.to(device, non_blocking=cuda) for t in batch)
        yield degraded, target, labels


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@dataclass
class ValidationSet:
    """Held-out pairs per task (full images), clean photos, synthetic snow from held-out clean
    (`evaluation.validation_items`: the same items `opir eval --split` scores)."""

    items: list[tuple[str, str, torch.Tensor, torch.Tensor]]  # (task, name, degraded, target)

    @classmethod
    def from_split(cls, split_path: Path, data_root: Path) -> ValidationSet:
        return cls(validation_items(split_path, data_root))


@torch.inference_mode()
def evaluate(model: OPIR, val: ValidationSet) -> dict[str, Any]:
    """Per task: input and output PSNR/SSIM (RGB), head accuracy; clean: PSNR against itself.

    Runs the model directly on whole images (no tiling), on the model's device: the quick
    monitor used while training. The model card's figures come from `opir eval`, which runs the
    engine. Scores are computed on the CPU, the same code whatever the device.
    """
    model.eval()
    device = next(model.parameters()).device
    per_task: dict[str, dict[str, list[float]]] = {}
    for task, _name, degraded, target in val.items:
        x, y = degraded[None].float(), target.float()
        padded, size = pad_to_multiple(x.to(device), model.multiple_of)
        logits = model.classify(padded)
        if task == "clean":
            out = model(padded).restored
        else:
            label = torch.tensor([class_index(task)], device=device)
            out = model(padded, F.one_hot(label, len(CLASSES)).float()).restored
        restored = crop_to(out, size)[0].clamp(0, 1).cpu()
        restored = (restored * 255).round() / 255  # score what a saved 8-bit file holds
        keys = ("in_psnr", "in_ssim", "psnr", "ssim", "acc", "identical")
        m = per_task.setdefault(task, {k: [] for k in keys})
        m["in_psnr"].append(psnr(x[0], y))
        m["in_ssim"].append(ssim(x[0], y))
        m["psnr"].append(psnr(restored, y))
        m["ssim"].append(ssim(restored, y))
        m["acc"].append(float(int(logits.argmax()) == class_index(task)))
        m["identical"].append(float(torch.equal(restored, y)))
    model.train()
    summary: dict[str, Any] = {
        task: {k: finite_mean(vals) for k, vals in m.items()} | {"n": len(m["psnr"])}
        for task, m in per_task.items()
    }
    restore_tasks = [t for t in ("rain", "snow", "haze") if t in summary]
    summary["mean_gain"] = float(
        np.mean([summary[t]["psnr"] - summary[t]["in_psnr"] for t in restore_tasks])
    )
    summary["head_accuracy"] = float(np.mean([a for m in per_task.values() for a in m["acc"]]))
    return summary


# ---------------------------------------------------------------------------------------------
# Run directory: exact resume
# ---------------------------------------------------------------------------------------------


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.contiguous().cpu()  # loads on any device (load_state_dict moves it)
        for idx, entries in state["state"].items()
        for name, value in entries.items()
    }
    _atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    return {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    # JSON turned the betas tuple into a list; restore it so the state matches a straight run
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.part")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def machine_description(device: torch.device | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        machine += f", {device} ({torch.cuda.get_device_name(device)})"
    return machine


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training: the first finishes the step in progress (a
    validation included) and stops with everything saved at that step boundary, so `--resume`
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


class Trainer:
    """Owns one run directory: `run.json` (recipe, data, device), `state/` (resume), `log.jsonl`,
    `best.safetensors` + `best.json` (the best validation so far), `last.*`.

    `device` is "auto", "cpu", "cuda" or "cuda:N" (`training_device`); run.json records it as
    given, so a run started with "auto" resumes on whatever the resuming machine has."""

    def __init__(self, run_dir: Path, recipe: Recipe, data: DataSpec, init: Path | None = None,
                 device: str = "cpu") -> None:  # fmt: skip
        self.device = training_device(device)  # first: a bad device fails before any work
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
            self.init = {"weights": str(init), **{k: init_card.get(k) for k in _LINEAGE_KEYS}}
            if added:
                self.init["grown_from"] = initial.config.to_dict()
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.lr, betas=recipe.betas)
        self.loss = OPIRLoss().to(self.device)
        self.step = 0
        self.wall_seconds = 0.0
        self.best: float | None = None

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir: Path, device: str | None = None) -> Trainer:
        """The run in `run_dir` at its last saved step, on `device` (default: the device its
        run.json records; runs made before the option trained on the CPU)."""
        run_dir = Path(run_dir)
        try:
            info = json.loads((run_dir / "run.json").read_text())
            trainer_state = json.loads((run_dir / "state" / "trainer.json").read_text())
        except (OSError, ValueError) as e:
            raise TrainingError(f"{run_dir}: not a resumable run directory ({e})") from e
        recipe = Recipe.from_dict(info["recipe"])
        device = device or info.get("device", "cpu")
        trainer = cls(run_dir, recipe, DataSpec(**info["data"]), device=device)
        trainer.model.load_state_dict(load_file(str(run_dir / "state" / "model.safetensors")))
        _load_optimizer(trainer.optimizer, run_dir / "state" / "optimizer.safetensors",
                        trainer_state["optimizer"])  # fmt: skip
        trainer.step = trainer_state["step"]
        trainer.wall_seconds = trainer_state["wall_seconds"]
        trainer.best = trainer_state["best"]
        trainer.init = info.get("init")
        return trainer

    def save_state(self) -> None:
        state_dir = self.run_dir / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        model_state = {k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}
        _atomic(state_dir / "model.safetensors", lambda t: save_file(model_state, str(t)))
        opt_meta = _save_optimizer(self.optimizer, state_dir / "optimizer.safetensors")
        _write_json(state_dir / "trainer.json", {
            "step": self.step, "wall_seconds": self.wall_seconds, "best": self.best,
            "optimizer": opt_meta,
        })  # fmt: skip

    def card(self, metrics: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "name": f"opir-{self.recipe.config}",
            "config": self.model.config.to_dict(),
            "classes": list(CLASSES),
            "recipe": dataclasses.asdict(self.recipe),
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
    ) -> None:
        """Train until `stop_step` (default: the recipe's steps) or `max_minutes`, then save.
        `workers` processes draw batches ahead (default `default_workers`); the batches, and so
        the run, are the same for any number."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "run.json", {
            "recipe": dataclasses.asdict(self.recipe), "data": dataclasses.asdict(self.data),
            "counts": training_set.counts(), "machine": machine_description(self.device),
            "init": self.init, "device": self.device_name,
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
                    degraded, target, labels = next(batches)
                    t1 = time.monotonic()
                    for group in self.optimizer.param_groups:
                        group["lr"] = self.recipe.lr_at(self.step)
                    weights = F.one_hot(labels, len(CLASSES)).float()
                    total, parts = self.loss(forward(degraded, weights), target, labels)
                    self.optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.optimizer.step()
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
                        self._validate(validation, log)
                    due = time.monotonic() - last_saved > 600  # at least every 10 minutes
                    if self.step % self.recipe.ckpt_every == 0 or due:
                        self.save_state()
                        last_saved = time.monotonic()
            finally:
                batches.close()  # ends the workers before saving
                log.close()
                self.save_state()
                save_checkpoint(self.run_dir / "last.safetensors", self.model, self.card(None))

    def _validate(self, validation: ValidationSet, log: Any) -> dict[str, Any]:
        t = time.monotonic()
        metrics = evaluate(self.model, validation)
        metrics["seconds"] = round(time.monotonic() - t, 1)
        log.write(json.dumps({"step": self.step, "validation": metrics}) + "\n")
        log.flush()
        score = metrics["mean_gain"]
        if self.best is None or score > self.best:
            self.best = score
            save_checkpoint(self.run_dir / "best.safetensors", self.model, self.card(metrics))
        return metrics
