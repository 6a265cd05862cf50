"""Training batches: preloaded photos and pairs, and a batch that is a pure function of its step.

Each step's batch comes from a numpy generator seeded by (seed, step): a resumed run draws the
same crops, flips and synthetic weather as an uninterrupted one, and workers drawing ahead hand
back exactly the batches of a serial run. Batches are always drawn on the CPU.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from opir_engine.datasets import (
    HeldOut,
    Pair,
    class_index,
    kept_images,
    kept_pairs,
    load_rgb,
)
from opir_engine.model import TASKS
from opir_engine.synthesis import (
    DAYLIT_MIST,
    DENSE_FOG,
    DIM_SCENE,
    RAIN_VEIL,
    apply_veil,
    sample_veil_params,
    scale_for_size,
    synthesize,
)
from opir_engine.synthesis.transplant import rain_layer, random_transplant
from opir_engine.training.recipe import DataSpec, Recipe, TrainingError

# Drawing a batch of 32 128x128 crops (about half synthesized) takes 30-60 ms on one core, about
# what we estimate a CUDA step of the small config to take (not measured yet), so a CUDA run draws
# them ahead in worker processes; the CPU trains on every core itself and draws in turn.
_CUDA_WORKERS = 4

# (degraded, target, labels, tasks): see `TrainingSet.batch`
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def default_workers(device: torch.device) -> int:
    """How many processes draw batches ahead when the caller names no number (see
    `_CUDA_WORKERS`)."""
    if device.type == "cpu":
        return 0
    return min(_CUDA_WORKERS, max((os.cpu_count() or 1) - 2, 0))


class TrainingSet:
    """Preloaded images and a per-step batch sampler. On the CPU it draws in the main process
    (no worker competes for the cores; sampling costs a few percent of a CPU step, see the run
    log's `data_ms`); a CUDA run draws ahead in workers (`step_batches`)."""

    def __init__(self, spec: DataSpec, recipe: Recipe) -> None:
        excluded = HeldOut()
        if spec.split:
            if not spec.data_root:  # the split's paths are relative: nothing would be excluded
                raise TrainingError(f"{spec.split}: a validation split needs a data root")
            excluded = HeldOut.from_split(Path(spec.split), Path(spec.data_root))
        root = Path(spec.data_root) if spec.data_root else Path("/")
        self.paths: list[Path] = []  # every file loaded, in order (tests check the exclusion)
        self.pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # per task, the indices of its pairs grouped by source set (`Recipe.source_balance`)
        self.sources: dict[str, list[list[int]]] = {}
        for task, folders in spec.paired.items():
            pairs = kept_pairs(folders, task, excluded, root)
            self.pairs[task] = [self._load_pair(p, recipe.max_side) for p in pairs]
            self.paths += [q for p in pairs for q in (p.input, p.target)]
            sets: dict[Path, list[int]] = {}
            for index, pair in enumerate(pairs):  # the set is the folder holding input/
                sets.setdefault(pair.input.parent.parent, []).append(index)
            self.sources[task] = [sets[folder] for folder in sorted(sets)]
        layer_pairs = kept_pairs(spec.rain_layers, "rain", excluded, root)
        self.rain_layers = [rain_layer(*self._load_pair(p, recipe.max_side)) for p in layer_pairs]
        self.paths += [q for p in layer_pairs for q in (p.input, p.target)]
        if recipe.transplant_ratio > 0 and not self.rain_layers:
            raise TrainingError("a transplant ratio above 0 needs rain-layer folders with pairs")
        clean_paths = kept_images(spec.clean, excluded, root)
        self.clean = [load_rgb(p, recipe.max_side) for p in clean_paths]
        self.paths += clean_paths
        if not self.clean:
            raise TrainingError(f"no clean photos to synthesize from in {spec.clean}")
        self.recipe = recipe

    @staticmethod
    def _load_pair(pair: Pair, max_side: int) -> tuple[torch.Tensor, torch.Tensor]:
        degraded, target = load_rgb(pair.input, max_side), load_rgb(pair.target, max_side)
        if degraded.shape != target.shape:
            raise TrainingError(f"{pair.input}: input and target sizes differ")
        return degraded, target

    def counts(self) -> dict[str, int]:
        counts = {**{t: len(p) for t, p in self.pairs.items()}, "clean": len(self.clean)}
        return counts | ({"rain_layers": len(self.rain_layers)} if self.rain_layers else {})

    def batch(self, step: int) -> Batch:
        """The batch of a step: (degraded, target) (B, 3, P, P) float in [0, 1], the class of
        each crop (B,) and the task whose embedding it is shown under (B,)."""
        rng = np.random.default_rng([self.recipe.seed, step])
        samples = [self._sample(rng) for _ in range(self.recipe.batch)]
        degraded, target, labels, tasks = zip(*samples, strict=True)
        return torch.stack(degraded), torch.stack(target), torch.tensor(labels), torch.tensor(tasks)

    def _sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        r = self.recipe
        if rng.random() < r.clean_ratio:  # clean -> clean teaches the head and pass-through
            image = self._crop([self.clean[rng.integers(len(self.clean))]], rng)[0]
            clean = class_index("clean")
            # drawn only when the option is on, so runs without it draw the batches they did
            if r.clean_under_weather > 0 and rng.random() < r.clean_under_weather:
                return image, image, clean, class_index(TASKS[self._draw_weather(rng)])
            return image, image, clean, clean
        task = TASKS[self._draw_weather(rng)]
        label = class_index(task)  # weather crops are shown under their own task
        real = self.pairs.get(task, [])
        if real and rng.random() >= r.synth_ratio:
            degraded, target = self._crop(list(real[self._real_index(task, rng)]), rng)
            return degraded, target, label, label
        source = self.clean[rng.integers(len(self.clean))]
        target = self._crop([source], rng)[0]
        # drawn only when the option is on, so runs without it draw the batches they did
        if task == "haze" and r.haze_dim > 0 and rng.random() < r.haze_dim:
            target = target * float(rng.uniform(*DIM_SCENE))
        scale = scale_for_size(*source.shape[-2:])
        return self._synthesize(target, task, scale, rng), target, label, label

    def _synthesize(
        self, target: torch.Tensor, task: str, scale: float, rng: np.random.Generator
    ) -> torch.Tensor:
        """`target`'s crop under `task`'s weather, drawn by the recipe's synthesis options."""
        r = self.recipe
        # each option is drawn only when it is on, so runs without it draw the batches they did
        if task == "haze" and r.dense_fog > 0 and rng.random() < r.dense_fog:
            return apply_veil(target, sample_veil_params(rng, DENSE_FOG))
        if task == "haze" and r.haze_mist > 0 and rng.random() < r.haze_mist:
            mist = sample_veil_params(rng, DAYLIT_MIST, scene_level=float(target.mean()))
            return apply_veil(target, mist).clamp(0, 1)
        if task == "rain" and r.transplant_ratio > 0 and rng.random() < r.transplant_ratio:
            degraded = random_transplant(target, self.rain_layers, rng)
        else:
            degraded = synthesize(target, task, int(rng.integers(0, 2**62)), scale=scale)[0]
        if task == "rain" and r.rain_veil > 0 and rng.random() < r.rain_veil:
            degraded = apply_veil(degraded, sample_veil_params(rng, RAIN_VEIL))
        if task == "rain" and r.rain_mist > 0 and rng.random() < r.rain_mist:
            mist = sample_veil_params(rng, DAYLIT_MIST, scene_level=float(target.mean()))
            degraded = apply_veil(degraded, mist)
        return degraded.clamp(0, 1)

    def _real_index(self, task: str, rng: np.random.Generator) -> int:
        """A real pair of `task`: any pair evenly, or (a `source_balance` share of the draws)
        a source set evenly, then one of its pairs."""
        # drawn only when the option is on, so runs without it draw the batches they always did
        if self.recipe.source_balance > 0 and rng.random() < self.recipe.source_balance:
            sets = self.sources[task]
            members = sets[rng.integers(len(sets))]
            return members[rng.integers(len(members))]
        return int(rng.integers(len(self.pairs[task])))

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

    def __getitem__(self, index: int) -> Batch:
        return self.training_set.batch(self.start + index)


def _leave_signals_to_the_trainer(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: a worker it ended would fail the run, while the
    main process means to finish the step in progress and save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step_batches(
    training_set: TrainingSet, start: int, stop: int, device: torch.device, workers: int = 0
) -> Iterator[Batch]:
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
        yield tuple(t.to(device, non_blocking=cuda) for t in batch)  # type: ignore[misc]
