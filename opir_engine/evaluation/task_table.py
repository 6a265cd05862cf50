"""Every held-out item restored under every task: the trunk and the classifier apart.

A row of `evaluate_engine` mixes what the classifier calls each photo with what the trunk does
under that call. This table keeps both apart: each item's PSNR under rain, snow and haze (each
task's one-hot embedding; "clean": the input as it is), its `--task auto` restoration, and the
classifier's probabilities. `TaskTable.rows()` gives `evaluate_engine`'s figures (auto restores
with the probabilities themselves as the task mix); the rows of other decisions, an oracle's
(the true task every time) or another classifier's, follow from the one-hot restorations
without restoring again: what the trunk can do under each call, and what the classifier costs
it. (Another classifier's auto would mix by its own probabilities: on an unsure call its figure
differs from the one-hot one given here.) Same protocol as `evaluate_engine`: the engine at its
working size, outputs scored as 8-bit files, RGB PSNR. `compare_rows` judges one checkpoint's
rows against another's by the shipping rule.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from opir_engine.evaluation.metrics import psnr as rgb_psnr
from opir_engine.evaluation.scoring import (
    TaskRow,
    finite_mean,
    finite_min,
    row_groups,
    row_order,
    set_psnr,
)
from opir_engine.evaluation.weather_left import weather_left
from opir_engine.image_io import as_8bit
from opir_engine.model.config import CLASSES
from opir_engine.model.opir import auto_decision

if TYPE_CHECKING:
    from opir_engine.inference.engine import OPIREngine

ORACLE = "oracle"  # `TaskTable.rows`' name for the true task as the decision


@dataclass
class ItemUnderTasks:
    """One held-out item: its true task, the classifier's probabilities, and per class its
    PSNR restored under that task's one-hot embedding ("clean": the input as it is; None where
    the output equals the target, as a clean photo passed through) and, for rain and snow, the
    weather left; `auto`: what `--task auto` did with it ({"task", "psnr", "left"})."""

    task: str
    name: str
    probabilities: dict[str, float]
    psnr: dict[str, float | None] | None = None  # None: a photo without ground truth
    left: dict[str, float | None] | None = None
    auto: dict[str, Any] | None = None


@dataclass
class TaskTable:
    """The items of one checkpoint, with the classifier's `clean_threshold` and where the items
    came from (`source`: the split, its data root, paired folders), to read them again."""

    weights: str
    clean_threshold: float
    items: list[ItemUnderTasks]
    source: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> TaskTable:
        data = json.loads(Path(path).read_text())
        items = [ItemUnderTasks(**item) for item in data["items"]]
        return cls(data["weights"], data["clean_threshold"], items, data.get("source", {}))

    def decisions(
        self, probabilities: Sequence[dict[str, float]] | None = None,
        clean_threshold: float | None = None,
    ) -> list[str]:  # fmt: skip
        """What `--task auto` decides for each item, from these probabilities (the table's
        own classifier's by default) with this threshold (default: the table's)."""
        probs = (
            probabilities if probabilities is not None else [i.probabilities for i in self.items]
        )
        if len(probs) != len(self.items):
            raise ValueError(f"{len(probs)} probabilities for {len(self.items)} items")
        threshold = self.clean_threshold if clean_threshold is None else clean_threshold
        weights = torch.tensor([[p[c] for c in CLASSES] for p in probs], dtype=torch.float64)
        return [CLASSES[int(k)] for k in auto_decision(weights, threshold)]

    def rows(self, decisions: Sequence[str] | str | None = None) -> list[TaskRow]:
        """A row per task and per task/source set (as `evaluate_engine(per_set=True)`, without
        SSIM and baselines) and the `*_photos` rows' head accuracy. None: `--task auto` with
        the table's own classifier, `evaluate_engine`'s figures; `ORACLE`: the true task; or a
        class per item, scored under that class's one-hot embedding."""
        auto = decisions is None
        if auto:
            own = self.decisions()  # from the probabilities, for tables kept without `auto`
            decisions = [
                i.auto["task"] if i.auto else d for i, d in zip(self.items, own, strict=True)
            ]
        elif decisions == ORACLE:
            decisions = [i.task for i in self.items]
        elif isinstance(decisions, str) or any(d not in CLASSES for d in decisions):
            raise ValueError(f"decisions: a class of {', '.join(CLASSES)} per item, or {ORACLE!r}")
        groups: dict[tuple[str, str], list[tuple[ItemUnderTasks, str]]] = {}
        for item, decided in zip(self.items, decisions, strict=True):
            if auto and item.auto is not None and item.psnr is not None:
                item = _as_auto(item)
            if item.psnr is None:
                groups.setdefault((f"{item.task}_photos", ""), []).append((item, decided))
                continue
            for key in row_groups(item.task, item.name, per_set=True):
                groups.setdefault(key, []).append((item, decided))
        rows = []  # evaluate_engine's order, then the photos' rows
        for (task, source), members in sorted(groups.items(), key=lambda kv: row_order(kv[0])):
            acc = float(np.mean([item.task == d for item, d in members]))
            if task.endswith("_photos"):
                rows.append(TaskRow(task, len(members), None, None, None, None, "-", None,
                                    None, acc, 0.0))  # fmt: skip
                continue
            chosen = [item.psnr[d] for item, d in members]
            left = [item.left[d] for item, d in members if item.left is not None]
            rows.append(TaskRow(
                task=f"{task}/{source}" if source else task, n=len(members),
                input_psnr=finite_mean(item.psnr["clean"] for item, _ in members),
                input_ssim=None, psnr=finite_mean(chosen), ssim=None, baseline="-",
                baseline_psnr=None, baseline_ssim=None, head_accuracy=acc,
                identical=float(np.mean([p is None for p in chosen])),
                set_psnr=set_psnr(_as_number(p) for p in chosen), weather_left=finite_mean(left),
                min_psnr=finite_min(chosen),
            ))  # fmt: skip
        return rows


def _as_auto(item: ItemUnderTasks) -> ItemUnderTasks:
    """The item with what auto gave in place of its decided class's one-hot figures."""
    decided, auto = item.auto["task"], item.auto
    psnr = {**item.psnr, decided: auto["psnr"]}
    left = None if item.left is None else {**item.left, decided: auto["left"]}
    return dataclasses.replace(item, psnr=psnr, left=left)


def _as_number(psnr: float | None) -> float:
    """A stored PSNR as a number: None (output equal to the target) is infinite."""
    return float("inf") if psnr is None else psnr


def _scored(
    out: torch.Tensor, degraded: torch.Tensor, target: torch.Tensor, weather: bool
) -> tuple[float | None, float | None]:
    """(PSNR, weather left) of an output as its 8-bit file holds it; PSNR None where it equals
    the target (JSON holds no infinity), weather left None but for rain and snow."""
    out = as_8bit(out)
    value = rgb_psnr(out, target)
    left = weather_left(degraded, out, target) if weather else None
    return (None if not np.isfinite(value) else value), left


def score_every_task(
    engine: OPIREngine,
    items: list[tuple[str, str, torch.Tensor, torch.Tensor]],
    photos: Sequence[tuple[str, str, torch.Tensor]] = (),
    source: dict[str, Any] | None = None,
) -> TaskTable:
    """Restore each (task, name, degraded, target) item with task auto and under rain, snow and
    haze, score each output (and the input as it is) against the target, and keep the
    classifier's probabilities; photos without ground truth (task, name, image) keep their
    probabilities only."""
    table = []
    for task, name, degraded, target in items:
        weather = task in ("rain", "snow")
        result = engine.restore(degraded, task="auto")
        psnr_auto, left_auto = _scored(result.image, degraded, target, weather)
        psnr: dict[str, float | None] = {}
        left: dict[str, float | None] = {}
        for decided in CLASSES:  # "clean" returns the image as it is
            out = degraded if decided == "clean" else engine.restore(degraded, task=decided).image
            psnr[decided], left[decided] = _scored(out, degraded, target, weather)
        auto = {"task": result.task, "psnr": psnr_auto, "left": left_auto}
        table.append(ItemUnderTasks(task, name, result.probabilities, psnr,
                                    left if weather else None, auto))  # fmt: skip
    for task, name, image in photos:
        probs = engine.classify(image)
        decided = {"task": engine.auto_task(probs), "psnr": None, "left": None}
        table.append(ItemUnderTasks(task, name, probs, auto=decided))
    return TaskTable(engine.name, engine.model.config.clean_threshold, table, source or {})


def classify_items(
    engine: OPIREngine,
    items: list[tuple[str, str, torch.Tensor, torch.Tensor]],
    photos: Sequence[tuple[str, str, torch.Tensor]] = (),
) -> list[dict[str, float]]:
    """The engine's classifier's probabilities for the items and photos, in a table's order:
    another classifier's decisions on restorations already scored."""
    return [engine.classify(x[2]) for x in items] + [engine.classify(x[2]) for x in photos]


CLEAN_FLOOR_DB = 40.0  # issue 24: no clean photo below this, whatever the reference did


@dataclass(frozen=True)
class RowVerdict:
    """A candidate's row against the same row of a reference (`compare_rows`)."""

    task: str
    reference: float | None  # PSNR; None: every output equals its target
    candidate: float | None
    loses: bool
    why: str  # empty where the row holds


def compare_rows(candidate: list[TaskRow], reference: list[TaskRow]) -> list[RowVerdict]:
    """The shipping rule, row by row (both from `TaskTable.rows()` of the same items): a weather
    row (and each of its source sets) loses when its mean PSNR is below the reference's; a clean
    row loses when any photo it changed comes back below CLEAN_FLOOR_DB. The `*_photos` rows
    (accuracy only, no PSNR) are not judged."""
    theirs = {row.task: row for row in reference}
    verdicts = []
    for row in candidate:
        if row.task.endswith("_photos"):
            continue
        ref = theirs.get(row.task)
        if row.task.split("/")[0] == "clean":
            low = row.min_psnr is not None and row.min_psnr < CLEAN_FLOOR_DB
            why = f"a photo at {row.min_psnr:.2f} dB, under {CLEAN_FLOOR_DB:.0f}" if low else ""
            verdicts.append(RowVerdict(row.task, ref and ref.min_psnr, row.min_psnr, low, why))
            continue
        if ref is None:
            raise ValueError(f"the reference has no row {row.task!r}: tables of other items")
        ours, base = _as_number(row.psnr), _as_number(ref.psnr)
        loses = ours < base
        why = f"{ours - base:+.2f} dB" if loses else ""
        verdicts.append(RowVerdict(row.task, ref.psnr, row.psnr, loses, why))
    return verdicts
