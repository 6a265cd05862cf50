"""glibc's malloc keeping freed memory (`opir_engine.devices.keep_freed_memory`) against its
defaults: the shipped model's forward, a training step and the engine restoring a 1920x1080
photo (samples/rocket_haze.jpg enlarged, at working side 1024), each setting in its own process
(the allocator is per process), the processes alternated round by round so that a load change
hits both; medians of the rounds' medians, and the page faults.

    python bench/allocator.py --rounds 3

Results go to bench/results/allocator-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"glibc defaults": "0", "freed memory kept": "1"}


def _measure(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median ms and minor page faults per call of `fn`, after one warm-up call."""
    fn()
    times, faults = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(times), "page_faults": statistics.median(faults)}


def child(repeats: int) -> dict:
    """One process's figures, under the setting its environment asks for."""
    import torch
    import torch.nn.functional as F

    from opir_engine.devices import keep_freed_memory
    from opir_engine.image_io import read_image
    from opir_engine.inference.engine import OPIREngine
    from opir_engine.model import CLASSES, OPIR, OPIRConfig, OPIRLoss
    from opir_engine.weights import load_checkpoint

    kept = keep_freed_memory()  # OPIR_KEEP_FREED_MEMORY=0 leaves glibc's defaults
    model, _ = load_checkpoint(ROOT / "weights" / "opir-small-allinone.safetensors")
    model.eval()
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    task = F.one_hot(torch.tensor([CLASSES.index("rain")]), len(CLASSES)).float()
    with torch.no_grad():
        forward = _measure(lambda: model(image, task), repeats)

    torch.manual_seed(0)
    net = OPIR(OPIRConfig.from_name("small")).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    loss_fn = OPIRLoss()
    g = torch.Generator().manual_seed(0)
    target = torch.rand(8, 3, 128, 128, generator=g)
    degraded = (0.7 * target + 0.3 * torch.rand(target.shape, generator=g)).clamp(0, 1)
    labels = torch.randint(0, len(CLASSES), (8,), generator=g)

    def step() -> None:
        total, _ = loss_fn(net(degraded, F.one_hot(labels, len(CLASSES)).float()), target, labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    train = _measure(step, repeats)
    engine = OPIREngine.from_pretrained(
        "opir-small-allinone", device="cpu", compile=False, work_side=1024
    )
    sample = read_image(ROOT / "samples" / "rocket_haze.jpg").rgb[None]
    photo = F.interpolate(sample, size=(1080, 1920), mode="bicubic").clamp(0, 1)[0]
    restore = _measure(lambda: engine.restore(photo), repeats)
    return {"kept": kept, "forward_512": forward, "train_step": train, "restore_sample": restore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, flag in SETTINGS.items():
            env = {**os.environ, "OPIR_KEEP_FREED_MEMORY": flag}
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    parts = ("forward_512", "train_step", "restore_sample")
    labels = {
        "forward_512": "shipped model forward 512x512",
        "train_step": "training step, small, batch 8 of 128x128",
        "restore_sample": "engine restore, a 1920x1080 photo at working side 1024",
    }
    summary = {
        name: {
            part: {k: statistics.median(r[part][k] for r in rs) for k in ("ms", "page_faults")}
            for part in parts
        }
        for name, rs in runs.items()
    }
    assert all(r["kept"] for r in runs["freed memory kept"]), "the setting did not take"
    result = {"machine": describe_machine(), "summary": summary, "runs": runs}
    off, on = (summary[name] for name in SETTINGS)
    lines = [
        "# The CPU allocator: freed memory kept against glibc's defaults", "",
        f"machine: `{json.dumps(result['machine'])}`", "",
        f"{args.rounds} rounds of one process per setting, {args.repeats} timed calls each; "
        "medians.", "",
        "| | glibc defaults | freed memory kept | speed-up |", "|---|---|---|---|",
    ]  # fmt: skip
    for part in parts:
        a, b = off[part], on[part]
        lines.append(
            f"| {labels[part]} | {a['ms']:.0f} ms, {a['page_faults']:.0f} faults | "
            f"{b['ms']:.0f} ms, {b['page_faults']:.0f} faults | {a['ms'] / b['ms']:.2f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"allocator-{machine_tag(result['machine'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
