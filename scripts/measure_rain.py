"""Measure the rain of paired sets against our renderer's: what synthesis has to match.

For each pair, on luma: PSNR of input against target; the veil (median of the slow part of
input minus target, a 15 px box); the streak coverage (share of pixels whose fast part exceeds
0.04) and brightness (99th percentile of the fast part); the streak length and width (how far
the fast part's autocorrelation stays above 0.5 along the best direction, and across it) and
that direction (degrees from vertical). Our renderer is measured on the same number of CBSD68
photos with `synthesize(..., "rain")`. Prints median [10th, 90th percentile] per set.

    python scripts/measure_rain.py ../shared/data --pairs 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opir_engine.datasets import find_pairs
from opir_engine.image_io import list_images, read_image
from opir_engine.synthesis import scale_for_size, synthesize

SETS = ("Rain13K-subset", "DDN-samples", "JORDER-E-RainTrainH-samples",
        "HeavyRain-OutdoorRain-samples", "GT-RAIN-webcam")  # fmt: skip


def luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def measure(degraded: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    diff = (luma(degraded) - luma(target))[None, None]
    slow = F.avg_pool2d(F.pad(diff, (7, 7, 7, 7), mode="replicate"), 15, stride=1)
    fast = (diff - slow)[0, 0].numpy().astype(np.float64)
    spectrum = np.fft.rfft2(fast)
    corr = np.fft.irfft2(np.abs(spectrum) ** 2, s=fast.shape)
    corr /= corr[0, 0]

    def reach(dy: float, dx: float) -> int:
        for r in range(1, 120):
            y, x = round(r * dy) % fast.shape[0], round(r * dx) % fast.shape[1]
            if corr[y, x] < 0.5:
                return r - 1
        return 119

    angles = range(-45, 46, 5)
    lengths = [reach(np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))) for a in angles]
    best = int(np.argmax(lengths))
    a = np.deg2rad(angles[best])
    mse = float(((degraded - target) ** 2).mean())
    return {
        "psnr": 10 * np.log10(1 / mse),
        "veil": float(slow.median()),
        "coverage": float((fast > 0.04).mean()),
        "p99": float(np.percentile(fast, 99)),
        "length": float(lengths[best]),
        "width": float(reach(np.sin(a), -np.cos(a))),
        "angle": float(angles[best]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--pairs", type=int, default=20, help="pairs (photos) per set")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {}
    for name in SETS:
        pairs = find_pairs(args.data_root / "rain" / name, "rain")[: args.pairs]
        rows[name] = [measure(read_image(p.input).rgb, read_image(p.target).rgb) for p in pairs]
    ours = []
    for i, path in enumerate(list_images(args.data_root / "clean" / "CBSD68")[: args.pairs]):
        clean = read_image(path).rgb
        rainy, _ = synthesize(clean, "rain", seed=i, scale=scale_for_size(*clean.shape[-2:]))
        ours.append(measure((rainy.clamp(0, 1) * 255).round() / 255, clean))
    rows["ours (opir synth)"] = ours
    keys = list(ours[0])
    print("| set | n | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, found in rows.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in found])
            cells.append(
                f"{np.median(v):.3g} [{np.percentile(v, 10):.3g}, {np.percentile(v, 90):.3g}]"
            )
        print(f"| {name} | {len(found)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
