"""Validation while training: the model itself on the held-out split's whole images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opir_engine.datasets import class_index
from opir_engine.evaluation.metrics import psnr, ssim
from opir_engine.evaluation.scoring import finite_mean, validation_items
from opir_engine.model import CLASSES, OPIR
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
