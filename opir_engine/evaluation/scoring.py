"""`opir eval`: PSNR/SSIM of restored folders, and of the engine on held-out paired data."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from opir_engine.datasets import find_paired_sets, pair_of
from opir_engine.evaluation.baselines import BASELINE_NAMES, classical_baseline
from opir_engine.evaluation.metrics import psnr, ssim
from opir_engine.evaluation.weather_left import weather_left
from opir_engine.image_io import as_8bit, list_images, read_image
from opir_engine.model.config import CLASSES, TASKS
from opir_engine.synthesis import apply_params, field_seed, synthesize
from opir_engine.synthesis.transplant import fit_layer, lay_rain, rain_layer

if TYPE_CHECKING:  # scoring folders needs no model: the engine is loaded by whoever passes one
    from opir_engine.inference.engine import OPIREngine


class EvaluationError(Exception):
    """Folders that cannot be compared."""


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float
    input_psnr: float | None = None
    input_ssim: float | None = None


def finite_mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def finite_min(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return min(vals) if vals else None


def set_psnr(values: Iterable[float]) -> float | None:
    """PSNR of a set of images (peak 1) from their PSNRs: 10 log10(1 / mean MSE). An output
    identical to its target (inf dB) adds an MSE of 0, so the figure stays finite where the
    mean of per-image PSNRs would not: how a folder of clean photos fares as a whole."""
    mses = [10.0 ** (-v / 10.0) for v in values]
    if not mses:
        return None
    mean = float(np.mean(mses))
    return math.inf if mean == 0 else -10.0 * math.log10(mean)


def _score(a: torch.Tensor, b: torch.Tensor, y: bool) -> tuple[float, float]:
    # On Y, round as MATLAB does on 8-bit files (the deraining protocol); RGB files are 8-bit.
    return psnr(a, b, y_channel=y, quantize=y), ssim(a, b, y_channel=y, quantize=y)


def match_by_stem(first: Path, second: Path) -> list[tuple[str, Path, Path]]:
    """Files of two folders paired by stem; a stem missing on either side is an error."""
    a = {p.stem: p for p in list_images(first)}
    b = {p.stem: p for p in list_images(second)}
    if not a:
        raise EvaluationError(f"{first}: no images")
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise EvaluationError(f"{first} and {second}: unmatched stems: {', '.join(missing[:5])}")
    return [(s, a[s], b[s]) for s in sorted(a)]


def evaluate_folders(
    restored: Path, target: Path, degraded: Path | None = None, y_channel: bool = False
) -> list[ImageScore]:
    """PSNR/SSIM per image of RESTORED against TARGET, and of DEGRADED when given."""
    pairs = match_by_stem(restored, target)
    inputs = dict((s, p) for s, p, _ in match_by_stem(degraded, target)) if degraded else {}
    scores = []
    for stem, rest_path, tgt_path in pairs:
        out, tgt = read_image(rest_path).rgb, read_image(tgt_path).rgb
        if out.shape != tgt.shape:
            raise EvaluationError(f"{rest_path}: size {tuple(out.shape[1:])} differs from target")
        score = ImageScore(stem, *_score(out, tgt, y_channel))
        if stem in inputs:
            score.input_psnr, score.input_ssim = _score(
                read_image(inputs[stem]).rgb, tgt, y_channel
            )
        scores.append(score)
    return scores


def write_scores_csv(scores: list[ImageScore], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(scores[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)


# ---------------------------------------------------------------------------------------------
# The engine on paired data (the model card's table)
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskRow:
    task: str
    n: int
    input_psnr: float | None
    input_ssim: float | None
    psnr: float | None
    ssim: float | None
    baseline: str
    baseline_psnr: float | None
    baseline_ssim: float | None
    head_accuracy: float | None  # None where the task is given, not decided
    identical: float  # share of outputs equal to the target (clean photos passed through)
    set_psnr: float | None = None  # the PSNR of all the task's outputs together (see set_psnr)
    weather_left: float | None = None  # mean share of streak/flake amplitude left (weather_left.py)
    min_psnr: float | None = None  # the worst output's PSNR (outputs equal to the target left out)

    @property
    def gain(self) -> float | None:
        if self.psnr is None or self.input_psnr is None:
            return None
        return self.psnr - self.input_psnr


def validation_items(
    split_path: Path, data_root: Path
) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(task, name, degraded, target) of the written-down split.

    Real pairs for rain and haze; clean photos against themselves; snow, which has no real
    held-out pairs, synthesized from every other clean validation photo with fixed seeds; and,
    when the split names `rain_layers` (held-out pairs of other renderers), rain transplanted
    from those onto the remaining clean validation photos (`synthesis.transplant`): a renderer
    training does not use, on photos it never saw. Where the split sets `synthetic_rain` (v3),
    every other one of those photos also carries rain of our own renderer (`rain/synthetic`):
    the rain `opir synth` draws and the README's sample shows, which no other row holds. Where
    it sets `synthetic_haze` (v4), the second photo of every four carries our own renderer's
    haze (`haze/synthetic`), and the same haze laid on the photo dimmed to `DUSK_EXPOSURE`
    (`haze/synthetic-dusk`): dark things under a bright veil, as in the README's night launch.
    """
    written = json.loads(Path(split_path).read_text())
    split = written["validation"]
    synthetic_rain = bool(written.get("synthetic_rain"))
    synthetic_haze = bool(written.get("synthetic_haze"))
    items = []
    for task in ("rain", "haze"):
        for name in split.get(task, []):
            pair = pair_of(data_root / name, task)
            items.append((task, name, read_image(pair.input).rgb, read_image(pair.target).rgb))
    layers = [_held_out_layer(data_root / n) for n in written.get("rain_layers", [])]
    for i, name in enumerate(split.get("clean", [])):
        clean = read_image(data_root / name).rgb
        items.append(("clean", name, clean, clean))
        if i % 2 == 0:
            snowy, _ = synthesize(clean, "snow", seed=1000 + i)
            items.append(("snow", f"synthetic:{name}", as_8bit(snowy.clamp(0, 1)), clean))
        elif layers:
            # odd photos carry other renderers' held-out rain: each layer once light, once heavy
            k = i // 2
            (stem, layer), (kind, strength) = layers[k // 2 % len(layers)], TRANSPLANT[k % 2]
            rainy = lay_rain(clean, fit_layer(layer, *clean.shape[-2:]), strength)
            rainy = as_8bit(rainy)
            items.append(("rain", f"transplant-{kind}:{stem}:{name}", rainy, clean))
        if synthetic_rain and i % 4 == 3:
            rainy, _ = synthesize(clean, "rain", seed=3000 + i)
            items.append(("rain", f"synthetic:{name}", as_8bit(rainy.clamp(0, 1)), clean))
        if synthetic_haze and i % 4 == 1:
            hazy, params = synthesize(clean, "haze", seed=4000 + i)
            items.append(("haze", f"synthetic:{name}", as_8bit(hazy.clamp(0, 1)), clean))
            dusk = as_8bit(clean * DUSK_EXPOSURE)
            hazy = apply_params(dusk, params, field_seed(4000 + i))
            items.append(("haze", f"synthetic-dusk:{name}", as_8bit(hazy.clamp(0, 1)), dusk))
    return items


# The dusk row's photos are dimmed to this share of their exposure before the haze: a clean
# validation photo averages about 0.45, the README's night launch 0.26
DUSK_EXPOSURE = 0.5


# The held-out rain layers' strengths on the transplant rows: half and as rendered
TRANSPLANT = (("light", 0.5), ("heavy", 1.0))


def _held_out_layer(input_path: Path) -> tuple[str, torch.Tensor]:
    pair = pair_of(input_path, "rain")
    return input_path.stem, rain_layer(read_image(pair.input).rgb, read_image(pair.target).rgb)


def paired_items(
    tagged: dict[str, list[str]],
) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(task, input path, degraded, target) of every pair in task-tagged paired folders
    ({"rain": [folder, ...]}, each folder holding input/ and target/ or sets of them)."""
    items = []
    for task, folders in tagged.items():
        for folder in folders:
            for pair in find_paired_sets(Path(folder), task):
                items.append(
                    (task, str(pair.input), read_image(pair.input).rgb, read_image(pair.target).rgb)
                )
    return items


def photo_items(split_path: Path, data_root: Path) -> list[tuple[str, str, torch.Tensor]]:
    """(task, name, image) of the split's degraded photos without ground truth (real snow):
    they score the head alone."""
    split = json.loads(Path(split_path).read_text())["validation"]
    return [
        ("snow", name, read_image(data_root / name).rgb) for name in split.get("snow_photos", [])
    ]


def evaluate_head(engine: OPIREngine, photos: list[tuple[str, str, torch.Tensor]]) -> list[TaskRow]:
    """One row per task of (task, name, image (3, H, W) in [0, 1]) photos without ground truth
    (`<task>_photos`): head accuracy only, counted as task "auto" decides (clean threshold
    included), like `evaluate_engine`."""
    hits: dict[str, list[float]] = {}
    for task, _name, image in photos:
        hits.setdefault(task, []).append(float(engine.auto_task(engine.classify(image)) == task))
    return [
        TaskRow(
            task=f"{task}_photos",
            n=len(h),
            input_psnr=None,
            input_ssim=None,
            psnr=None,
            ssim=None,
            baseline="-",
            baseline_psnr=None,
            baseline_ssim=None,
            head_accuracy=float(np.mean(h)),
            identical=0.0,
        )
        for task, h in hits.items()
    ]


def evaluate_clean_under_weather(
    engine: OPIREngine, items: list[tuple[str, str, torch.Tensor, torch.Tensor]]
) -> list[TaskRow]:
    """Rows `clean_under_weather` and `clean_under_weather/<task>`: every clean photo of
    (task, name, degraded, target) items restored under one weather's task (rain, snow, haze
    in turn), as when `--task auto` calls a clean photo weather, and scored against the photo
    as the 8-bit file. Their mean and lowest PSNR are what such a mistake costs; none below
    40 dB is issue 24's bar. (Haze removal raises a clean photo's contrast whatever the model,
    so its row is the one to expect lowest.)"""
    photos = [degraded for task, _, degraded, _ in items if task == "clean"]
    if not photos:
        return []
    groups: dict[str, list[tuple[tuple[float, float], bool]]] = {"": []}
    for i, photo in enumerate(photos):
        task = TASKS[i % len(TASKS)]
        out = as_8bit(engine.restore(photo, task=task).image)
        scored = (_score(out, photo, False), torch.equal(out, photo))
        groups[""].append(scored)
        groups.setdefault(task, []).append(scored)
    return [
        TaskRow(
            task="clean_under_weather" + (f"/{task}" if task else ""),
            n=len(group),
            input_psnr=None,
            input_ssim=None,
            psnr=finite_mean(p for (p, _), _ in group),
            ssim=finite_mean(s for (_, s), _ in group),
            baseline="-",
            baseline_psnr=None,
            baseline_ssim=None,
            head_accuracy=None,  # the task is given, not decided
            identical=float(np.mean([same for _, same in group])),
            set_psnr=set_psnr(p for (p, _), _ in group),
            min_psnr=finite_min(p for (p, _), _ in group),
        )
        for task, group in groups.items()
    ]


def source_set(name: str) -> str:
    """The set a validation item comes from, for the per-set rows: the folder of a paired set
    (`rain/GT-RAIN-webcam/input/s003_r009.png` -> `GT-RAIN-webcam`), of a clean photo
    (`clean/CBSD68/1.png` -> `CBSD68`), or the kind of a pair made from a clean photo (its
    name's prefix: `synthetic`, `synthetic-dusk`, `transplant-light`, ...)."""
    if ":" in name:  # `synthetic:`, `synthetic-dusk:`, `transplant-heavy:<layer>:` + a photo
        return name.split(":", 1)[0]
    path = Path(name)
    return path.parent.parent.name if path.parent.name == "input" else path.parent.name


TASK_ORDER = ("rain", "snow", "haze", "clean")  # the rows' order in every table


def row_groups(task: str, name: str, per_set: bool) -> list[tuple[str, str]]:
    """The rows an item counts in, as (task, source set): its task's, and with `per_set` its
    source set's. An item outside any set folder (a bare file name) has no set row: its task's
    row is all there is, and it counts there once."""
    source = source_set(name) if per_set else ""
    return [(task, "")] + ([(task, source)] if source else [])


def row_order(key: tuple[str, str]) -> tuple[int, str, str]:
    """Sort key of a (task, source set) row: TASK_ORDER, any other rows after, each task's own
    row before its sets' rows."""
    task, source = key
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task, source)


def evaluate_engine(
    engine: OPIREngine,
    items: list[tuple[str, str, torch.Tensor, torch.Tensor]],
    y_channel: bool = False,
    baselines: bool = True,
    per_set: bool = False,
) -> list[TaskRow]:
    """Run the engine with task auto (what users run) on each (task, name, degraded, target)
    item (images (3, H, W) in [0, 1]) and score per task.

    The output is scored as the 8-bit file a user would get. Head accuracy counts images whose
    auto decision is the right class (for clean photos: passed through or called clean).
    With `per_set`, each task's row is followed by one row per source set (`source_set`),
    labelled `task/set`: a task's mean can hide sets that fare very differently (the real rain
    of GT-RAIN next to Rain13K's synthetic streaks).
    """
    keys = ("ip", "is", "p", "s", "bp", "bs", "acc", "same", "left")
    per_group: dict[tuple[str, str], dict[str, list]] = {}
    for task, name, degraded, target in items:
        result = engine.restore(degraded, task="auto")
        out = as_8bit(result.image)
        ip, is_ = _score(degraded, target, y_channel)
        p, s = _score(out, target, y_channel)
        left = weather_left(degraded, out, target) if task in ("rain", "snow") else None
        base = None
        if baselines and task in BASELINE_NAMES:
            restored = as_8bit(classical_baseline(degraded, task))
            base = _score(restored, target, y_channel)
        for group in row_groups(task, name, per_set):
            m = per_group.setdefault(group, {k: [] for k in keys})
            m["ip"].append(ip), m["is"].append(is_), m["p"].append(p), m["s"].append(s)
            m["acc"].append(float(result.task == task))
            m["same"].append(float(torch.equal(out, target)))
            m["left"].append(left)
            if base is not None:
                m["bp"].append(base[0]), m["bs"].append(base[1])
    return [
        TaskRow(
            task=f"{task}/{source}" if source else task,
            n=len(m["p"]),
            input_psnr=finite_mean(m["ip"]),
            input_ssim=finite_mean(m["is"]),
            psnr=finite_mean(m["p"]),
            ssim=finite_mean(m["s"]),
            baseline=BASELINE_NAMES.get(task, "-"),
            baseline_psnr=finite_mean(m["bp"]),
            baseline_ssim=finite_mean(m["bs"]),
            head_accuracy=float(np.mean(m["acc"])),
            identical=float(np.mean(m["same"])),
            set_psnr=set_psnr(m["p"]),
            weather_left=finite_mean(m["left"]),
            min_psnr=finite_min(m["p"]),
        )
        for (task, source), m in sorted(per_group.items(), key=lambda kv: row_order(kv[0]))
    ]


def rows_to_card(rows: list[TaskRow], y_channel: bool) -> dict:
    """The card's `validation` entry."""
    data = {r.task: {**asdict(r), "gain": r.gain} for r in rows}
    # `*_photos` rows are reported apart, and `task/set` rows split a task's row
    classes = [r for r in rows if r.task in CLASSES]
    data["head_accuracy"] = sum(r.head_accuracy * r.n for r in classes) / max(
        1, sum(r.n for r in classes)
    )
    data["channel"] = "Y (BT.601)" if y_channel else "RGB"
    return data
