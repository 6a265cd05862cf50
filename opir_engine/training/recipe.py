"""What defines a training run: the recipe (appendix B.1, machine-sized), where its data comes
from, and the lineage of trainings behind a checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The parts of an init checkpoint's card a run keeps, so a fine-tune's card still tells the
# whole recipe, steps and hours behind it.
LINEAGE_KEYS = ("steps", "wall_time_hours", "recipe", "recipe_changes", "data", "init")

# The recipe's sampling shares, each in [0, 1]; each has an `opir train` option of its name.
SHARES = ("synth_ratio", "clean_ratio", "transplant_ratio", "clean_under_weather",
          "source_balance", "rain_veil", "rain_mist", "dense_fog", "haze_dim",
          "haze_mist")  # fmt: skip

# What a resumed run may change (`Trainer.resume(changes=)`): what its batches draw, the weight
# average it validates and the precision its forward runs in, never the model, the schedule or
# the seed, so the run stays one run with its changes on record.
RESUME_CHANGES = (*SHARES, "task_weights", "ema", "precision")

# The forward's arithmetic: fp32, or bf16 autocast (convolutions in bf16, the NAFBlock's norm
# and gate on bf16 maps, the operator in fp32; weights, gradients and Adam stay fp32)
PRECISIONS = ("fp32", "bf16")


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
    # Share of synthesized rain drawn as another renderer's rain layer transplanted onto a clean
    # photo (synthesis/transplant.py) instead of our own streaks; needs DataSpec.rain_layers.
    transplant_ratio: float = 0.0
    # Share of the clean -> clean crops shown under a weather's embedding (drawn by task_weights)
    # instead of clean's: where there is no weather to remove, the operator must return the
    # photo, so a clean photo the classifier calls weather comes back nearly unchanged.
    clean_under_weather: float = 0.0
    # Share of the real pairs drawn by first choosing one of the task's source sets (the folders
    # holding input/ and target/) evenly, then a pair of it, instead of any pair evenly: a set
    # of 4 real pairs beside sets of 100 (Dense-Haze beside SOTS) is otherwise almost never seen,
    # and its rows are the ones that lag. 0 draws as every earlier run did.
    source_balance: float = 0.0
    # Share of the synthesized rain (rendered or transplanted) seen through a grey veil of its
    # own mist (synthesis.RAIN_VEIL): real heavy rain dims and greys the scene, our rain and the
    # transplanted layers only brighten it. 0 draws as every earlier run did.
    rain_veil: float = 0.0
    # Share of the synthesized rain seen through a mist brighter than the scene it covers
    # (synthesis.DAYLIT_MIST), as in every paired rain set: RAIN_VEIL's absolute airlight also
    # draws veils darker than a bright scene, which no real set holds. Drawn after (and
    # independently of) rain_veil; 0 draws as every earlier run did.
    rain_mist: float = 0.0
    # Share of the synthesized haze drawn as fog dense over the whole frame (synthesis.DENSE_FOG)
    # instead of by depth. 0 draws as every earlier run did.
    dense_fog: float = 0.0
    # Share of the synthesized haze whose clean crop is first dimmed (synthesis.DIM_SCENE):
    # dark things under a bright veil (a far forest, a dusk or night scene), which the daylight
    # clean photos seldom hold and on which the campaign came to leave the haze in place.
    # 0 draws as every earlier run did.
    haze_dim: float = 0.0
    # Share of the synthesized haze drawn as a mist of even depth brighter than the scene
    # (synthesis.DAYLIT_MIST), drawn after (and independently of) dense_fog: light fog over the
    # whole frame, as on GT-RAIN's misty hillside, which the depth proxy never draws and which
    # both the shipped weights and the campaign mostly leave in place. 0 draws as before.
    haze_mist: float = 0.0
    # Decay of an exponential moving average of the weights (0: none). With it, validation and
    # the best and last checkpoints use the average: at batch 8 the weights one validation
    # apart differ by 1-3 dB on the rows of one or two photos. Training itself is unchanged.
    ema: float = 0.0
    precision: str = "fp32"  # one of PRECISIONS
    max_side: int = 512
    seed: int = 0
    val_every: int = 1000
    ckpt_every: int = 250
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in SHARES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise TrainingError(f"{name.replace('_', ' ')} must be in [0, 1]; got {value}")
        if not 0.0 <= self.ema < 1.0:
            raise TrainingError(f"ema decay must be in [0, 1); got {self.ema}")
        if self.precision not in PRECISIONS:
            raise TrainingError(
                f"precision must be {' or '.join(PRECISIONS)}; got {self.precision!r}"
            )
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
    """Where training reads from: paired folders per task, clean photos, the held-out split
    (whose paths are relative to `data_root`)."""

    paired: dict[str, list[str]] = field(default_factory=dict)
    clean: list[str] = field(default_factory=list)
    # Paired rain folders whose (non-held-out) pairs lend their rain layers to transplant
    rain_layers: list[str] = field(default_factory=list)
    split: str | None = None
    data_root: str | None = None


def lineage(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainings behind a checkpoint's card, first to last: each stage's recipe, data, steps,
    wall time, the changes made on resume (`recipe_changes`, [] for cards before them) and the
    weights it started from (`init_weights`, None for a fresh start)."""
    stages = []
    node: dict[str, Any] | None = card
    while node is not None:
        parent = node.get("init")
        stages.append({k: node.get(k) for k in ("steps", "wall_time_hours", "recipe", "data")}
                      | {"recipe_changes": node.get("recipe_changes") or [],
                         "init_weights": parent["weights"] if parent else None})  # fmt: skip
        node = parent
    return stages[::-1]
