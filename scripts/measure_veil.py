"""Fit the veil of paired sets, I = t J + (1 - t) A: what `synthesis.RAIN_VEIL` and `DENSE_FOG`
are drawn to cover.

Per training pair (the split's held-out pairs are left out, as training leaves them out): one
transmission t for the whole image and an airlight A per channel, by least squares of the input
on the target at a quarter of the size (streaks and misalignment are noise to this fit, so it
reads the slow, global part: the veil). Prints t and the grey level of A (the mean of its three
channels) per set, median [10th, 90th percentile]. A above 1 means the set brightens beyond any
airlight (a screen towards white plus streaks); A far below the scene's light means it darkens.

    python scripts/measure_veil.py ../shared/data --split splits/validation-v3.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from opir_engine.datasets import HeldOut, kept_pairs
from opir_engine.image_io import read_image

SETS = ("rain/Rain13K-subset", "rain/DDN-samples", "rain/JORDER-E-RainTrainH-samples",
        "rain/HeavyRain-OutdoorRain-samples", "rain/GT-RAIN-webcam", "haze/Dense-Haze",
        "haze/NH-HAZE2", "haze/HazeRD", "haze/SOTS-indoor", "haze/HSTS-synthetic")  # fmt: skip


def fit_veil(degraded: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(t, grey level of A) of I = t J + (1 - t) A fitted on (3, H, W) images in [0, 1]."""
    small = [torch.nn.functional.avg_pool2d(x[None], 4)[0] for x in (degraded, target)]
    i, j = (x.reshape(3, -1).double().numpy() for x in small)
    # unknowns: t, then c_k = (1 - t) A_k per channel
    design = np.zeros((i.size, 4))
    design[:, 0] = j.ravel()
    for k in range(3):
        design[k * j.shape[1] : (k + 1) * j.shape[1], 1 + k] = 1.0
    (t, *c), *_ = np.linalg.lstsq(design, i.ravel(), rcond=None)
    return float(t), float(np.mean(c) / max(1.0 - t, 1e-3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--split", type=Path, help="validation split whose pairs are left out")
    args = parser.parse_args()
    held_out = HeldOut.from_split(args.split, args.data_root) if args.split else HeldOut()
    print("| set | n | t | A (grey level) |")
    print("|---|---|---|---|")
    for name in SETS:
        task = name.split("/")[0]
        pairs = kept_pairs([str(args.data_root / name)], task, held_out, args.data_root)
        fits = np.array([fit_veil(read_image(p.input).rgb, read_image(p.target).rgb)
                         for p in pairs])  # fmt: skip
        if not len(fits):
            continue
        cells = [f"{np.median(v):.2f} [{np.percentile(v, 10):.2f}, {np.percentile(v, 90):.2f}]"
                 for v in fits.T]  # fmt: skip
        print(f"| {name} | {len(fits)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
