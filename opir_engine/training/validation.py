"""Validation while training: the model itself on the held-out split's whole images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opir_engine.datasets import class_index
from opir_engine.evaluation.metrics import psnr, ssim
from opir_engine.evaluation.scoring import finite_mean, finite_min, source_set, validation_items
from opir_engine.evaluation.weather_left import weather_left
from opir_engine.image_io import as_8bit
from opir_engine.model import CLASSES, OPIR, TASKS
from opir_engine.model.padding import crop_to, pad_to_multiple


@dataclass
class ValidationSet:
    """Held-out pairs per task (full images), clean photos, synthetic snow from held-out clean
    (`evaluation.validation_items`: the same items `opir eval --split` scores)."""

    # (task, name, degraded, target), images (3, H, W) in [0, 1]
    items: list[tuple[str, str, torch.Tensor, torch.Tensor]]

    @classmethod
    def from_split(cls, split_path: Path, data_root: Path) -> ValidationSet:
        return cls(validation_items(split_path, data_root))


@torch.inference_mode()
def evaluate(
    model: OPIR,
    val: ValidationSet,
    contact: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Per task: input and output PSNR/SSIM (RGB), head accuracy, the weather left
    (`evaluation.weather_left`, rain and snow); clean: PSNR against itself. `sources` holds the
    same per source set (`evaluation.source_set`: `rain/Rain13K-subset`,
    `rain/transplant-heavy`, ...), where a task's mean hides how each kind of rain fares.
    A list given as `contact` receives (source, degraded, restored, target) for the first
    item of each source: the rows of the validation's contact sheet.

    `clean_under_weather`: each clean photo also restored under one weather's task (rain, snow,
    haze in turn), as when the classifier calls a clean photo weather; its mean and lowest
    PSNR against the photo say how much such a mistake costs (issue 24: none below 40 dB).

    Runs the model directly on whole images (no tiling), on the model's device: the quick
    monitor used while training. The model card's figures come from `opir eval`, which runs the
    engine. Scores are computed on the CPU, the same code whatever the device.
    """
    model.eval()
    device = next(model.parameters()).device
    per_task: dict[str, dict[str, list[float]]] = {}
    per_source: dict[str, dict[str, list[float]]] = {}
    keys = ("in_psnr", "in_ssim", "psnr", "ssim", "acc", "identical", "left")
    under_weather: dict[str, list[float]] = {t: [] for t in TASKS}
    clean_photos = 0
    for task, name, degraded, target in val.items:
        x, y = degraded[None].float(), target.float()
        padded, size = pad_to_multiple(x.to(device), model.multiple_of)
        logits = model.classify(padded)
        if task == "clean":
            out = model(padded).restored
            forced = TASKS[clean_photos % len(TASKS)]  # rain, snow, haze in turn
            clean_photos += 1
            weights = F.one_hot(torch.tensor([class_index(forced)], device=device), len(CLASSES))
            changed = crop_to(model(padded, weights.float()).restored, size)[0].clamp(0, 1).cpu()
            under_weather[forced].append(psnr(as_8bit(changed), y))
        else:
            label = torch.tensor([class_index(task)], device=device)
            out = model(padded, F.one_hot(label, len(CLASSES)).float()).restored
        restored = crop_to(out, size)[0].clamp(0, 1).cpu()
        restored = as_8bit(restored)  # score what a saved 8-bit file holds
        source = f"{task}/{source_set(name)}"
        if contact is not None and source not in per_source:
            contact.append((source, x[0], restored, y))
        left = weather_left(x[0], restored, y) if task in ("rain", "snow") else None
        for m in (per_task.setdefault(task, {k: [] for k in keys}),
                  per_source.setdefault(source, {k: [] for k in keys})):  # fmt: skip
            m["in_psnr"].append(psnr(x[0], y))
            m["in_ssim"].append(ssim(x[0], y))
            m["psnr"].append(psnr(restored, y))
            m["ssim"].append(ssim(restored, y))
            m["acc"].append(float(int(logits.argmax()) == class_index(task)))
            m["identical"].append(float(torch.equal(restored, y)))
            m["left"].append(left)
    model.train()

    def means(m: dict[str, list[float]]) -> dict[str, Any]:
        return {k: finite_mean(vals) for k, vals in m.items()} | {"n": len(m["psnr"])}

    summary: dict[str, Any] = {task: means(m) for task, m in per_task.items()}
    restore_tasks = [t for t in ("rain", "snow", "haze") if t in summary]
    summary["mean_gain"] = float(
        np.mean([summary[t]["psnr"] - summary[t]["in_psnr"] for t in restore_tasks])
    )
    summary["head_accuracy"] = float(np.mean([a for m in per_task.values() for a in m["acc"]]))
    summary["sources"] = {source: means(m) for source, m in sorted(per_source.items())}
    scores = [p for v in under_weather.values() for p in v]
    if scores:
        summary["clean_under_weather"] = {
            "psnr": finite_mean(scores),
            "min_psnr": finite_min(scores),
            "unchanged": float(np.mean([p == math.inf for p in scores])),  # bit for bit
            "n": len(scores),
            "per_task": {t: finite_mean(v) for t, v in under_weather.items() if v},
        }
    return summary
