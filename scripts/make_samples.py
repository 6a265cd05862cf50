"""Make `samples/`: the project's own demo inputs for `opir restore`.

The clean photos are the public-domain / CC0 images that scikit-image bundles (its docstrings
give the licences: rocket, public domain by SpaceX; astronaut, public domain by NASA; chelsea
and coffee, CC0 by their photographers). Each is degraded with opir's own synthesis (paper
Eq. 2-4) with a fixed seed, so this script rebuilds the folder byte for byte:

    pip install scikit-image && python scripts/make_samples.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from skimage import data

from opir_engine.image_io import write_image
from opir_engine.synthesis import synthesize

SAMPLES = [  # (output stem, scikit-image image, kind, seed)
    ("rocket_haze", "rocket", "haze", 3),
    ("chelsea_rain", "chelsea", "rain", 1),
    ("astronaut_snow", "astronaut", "snow", 2),
    ("coffee_clean", "coffee", None, 0),
]


SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"


def main(out: Path = SAMPLES_DIR) -> None:
    out.mkdir(exist_ok=True)
    (out / "clean").mkdir(exist_ok=True)
    records = []
    for stem, image_name, kind, seed in SAMPLES:
        clean = torch.from_numpy(getattr(data, image_name)()).permute(2, 0, 1).float() / 255
        write_image(out / "clean" / f"{stem}.png", clean)
        if kind is None:
            degraded, params = clean, None
        else:
            degraded, params = synthesize(clean, kind, seed)
        write_image(out / f"{stem}.jpg", degraded.clamp(0, 1), quality=92)
        records.append({"file": f"{stem}.jpg", "source": f"skimage.data.{image_name}",
                        "kind": kind, "seed": seed,
                        "params": None if params is None else params.to_dict()})  # fmt: skip
    (out / "samples.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
