"""Benchmark one training step of `opir train`: eager against torch.compile, and where the time
goes (data, forward, loss, backward, optimizer).

    python bench/train_step.py                      # small config, batch 8 of 128x128
    python bench/train_step.py --threads 1 --rounds 4 --steps 5

The two variants alternate in rounds (eager block, compiled block, ...) inside one process, so a
load change on a shared machine hits both; the compiled variant's first steps (compilation) are
timed apart. Batches come from the real training data when ../shared/data is present (the
sampling cost is measured too), else from seeded random tensors of the same shape. Results go
to bench/results/train_step-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

from opir_engine.model import CLASSES, OPIR, OPIRConfig, OPIRLoss

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("OPIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _batches(batch: int, patch: int, count: int) -> tuple[list, float | None]:
    """`count` training batches and the mean ms to sample one (None for random tensors)."""
    if DATA.is_dir():
        from opir_engine.training.recipe import DataSpec, Recipe
        from opir_engine.training.sampler import TrainingSet

        clean = [str(DATA / "clean" / c) for c in ("BSDS500_test", "CBSD68")]
        spec = DataSpec(paired={"rain": [str(DATA / "rain")], "haze": [str(DATA / "haze")]},
                        clean=clean)  # fmt: skip
        data = TrainingSet(spec, Recipe(batch=batch, patch=patch))
        t0 = time.perf_counter()
        batches = [data.batch(step) for step in range(count)]
        return batches, 1000 * (time.perf_counter() - t0) / count
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        target = torch.rand(batch, 3, patch, patch, generator=g)
        degraded = (target + 0.1 * torch.rand(target.shape, generator=g)).clamp(0, 1)
        batches.append((degraded, target, torch.randint(0, len(CLASSES), (batch,), generator=g)))
    return batches, None


class _Step:
    """One optimizer step of the trainer (same loss, clipping and Adam), optionally compiled."""

    def __init__(self, config: str, compiled: bool) -> None:
        torch.manual_seed(0)
        self.model = OPIR(OPIRConfig.from_name(config)).train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.loss = OPIRLoss()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4)

    def __call__(self, batch: tuple, phases: dict[str, list[float]] | None = None) -> None:
        degraded, target, labels = batch
        weights = F.one_hot(labels, len(CLASSES)).float()
        t0 = time.perf_counter()
        output = self.forward(degraded, weights)
        t1 = time.perf_counter()
        total, _ = self.loss(output, target, labels)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        t4 = time.perf_counter()
        if phases is not None:
            for name, a, b in (("forward", t0, t1), ("loss", t1, t2), ("backward", t2, t3),
                               ("optimizer", t3, t4)):  # fmt: skip
                phases.setdefault(name, []).append(1000 * (b - a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="compiled steps timed apart")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batches, data_ms = _batches(args.batch, args.patch, args.steps)
    eager, compiled = _Step(args.config, False), _Step(args.config, True)
    t0 = time.perf_counter()
    warmup = []
    for i in range(args.warmup):
        t = time.perf_counter()
        compiled(batches[i % len(batches)])
        warmup.append(1000 * (time.perf_counter() - t))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    phases: dict[str, dict[str, list[float]]] = {"eager": {}, "compiled": {}}
    for _ in range(args.rounds):
        for name, step in (("eager", eager), ("compiled", compiled)):
            for batch in batches:
                t = time.perf_counter()
                step(batch, phases[name])
                times[name].append(1000 * (time.perf_counter() - t))
    result = {
        "machine": describe_machine(),
        "config": args.config, "batch": args.batch, "patch": args.patch,
        "data": "shared training data" if data_ms is not None else "random tensors",
        "data_ms_per_batch": data_ms,
        "compile_warmup_ms": warmup,
        "median_step_ms": {k: statistics.median(v) for k, v in times.items()},
        "phases_median_ms": {k: {p: statistics.median(v) for p, v in ph.items()}
                             for k, ph in phases.items()},
        "steps_timed": {k: len(v) for k, v in times.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    med = result["median_step_ms"]
    result["compiled_speedup"] = med["eager"] / med["compiled"]

    lines = [f"# training step, `{args.config}`, batch {args.batch} of {args.patch}x{args.patch}",
             "", f"machine: {result['machine']}", "",
             "| variant | median step ms | forward | loss | backward | optimizer |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("eager", "compiled"):
        ph = result["phases_median_ms"][name]
        lines.append(f"| {name} | {med[name]:.0f} | {ph['forward']:.0f} | {ph['loss']:.0f} | "
                     f"{ph['backward']:.0f} | {ph['optimizer']:.0f} |")  # fmt: skip
    lines += ["", f"compiled speedup: {result['compiled_speedup']:.2f}x; compile warm-up steps "
              f"(ms): {', '.join(f'{w:.0f}' for w in warmup)}",
              f"data sampling: {data_ms:.1f} ms per batch ({result['data']})" if data_ms
              else "data: random tensors (no shared data found)"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = machine_tag(result["machine"])
    (RESULTS / f"train_step-{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"train_step-{tag}.md").write_text(text)


if __name__ == "__main__":
    main()
