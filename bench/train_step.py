"""Benchmark one training step of `opir train`: eager against torch.compile, in fp32 and under
bf16 autocast, and where the time goes (data, forward, loss, backward, optimizer).

    python bench/train_step.py                      # small config, batch 8 of 128x128
    python bench/train_step.py --threads 1 --rounds 4 --steps 5

The variants alternate in rounds (a block of steps each) inside one process, so a load change on
a shared machine hits all of them; the compiled variants' first steps (compilation) are timed
apart, and each variant's last loss is recorded: a compiled bf16 step on the CPU computed NaN
with torch 2.13 (which is why `opir train` refuses that combination there).

Batches come from the real training data when ../shared/data is present (the
sampling cost is measured too), else from seeded random tensors of the same shape. Results go
to bench/results/train_step-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

from opir_engine.devices import keep_freed_memory
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


# name: (compiled, bf16 autocast)
VARIANTS = {
    "eager": (False, False),
    "eager, bf16": (False, True),
    "compiled": (True, False),
    "compiled, bf16": (True, True),
}


class _Step:
    """One optimizer step of the trainer (same autocast, loss, clipping and Adam), optionally
    compiled."""

    def __init__(self, config: str, compiled: bool, bf16: bool) -> None:
        torch.manual_seed(0)
        self.model = OPIR(OPIRConfig.from_name(config)).train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.bf16 = bf16
        self.loss = OPIRLoss()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        self.last_loss = math.nan

    def __call__(self, batch: tuple, phases: dict[str, list[float]] | None = None) -> None:
        degraded, target, labels, *shown = batch  # the task shown under, where the batch has it
        weights = F.one_hot(shown[0] if shown else labels, len(CLASSES)).float()
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            output = self.forward(degraded, weights)
        t1 = time.perf_counter()
        total, _ = self.loss(output.in_fp32(), target, labels)
        self.last_loss = float(total.detach())
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

    keep_freed_memory()  # as the trainer runs
    batches, data_ms = _batches(args.batch, args.patch, args.steps)
    steps = {name: _Step(args.config, *flags) for name, flags in VARIANTS.items()}
    t0 = time.perf_counter()
    warmup: dict[str, list[float]] = {}
    failed: dict[str, str] = {}  # variant: the first line of its error
    for name, step in list(steps.items()):
        if VARIANTS[name][0]:
            warmup[name] = []
            for i in range(args.warmup):
                t = time.perf_counter()
                try:
                    step(batches[i % len(batches)])
                except RuntimeError as e:  # inductor's generated code checks its indices
                    failed[name] = str(e).splitlines()[0]
                    del steps[name]
                    break
                warmup[name].append(1000 * (time.perf_counter() - t))
    times: dict[str, list[float]] = {name: [] for name in steps}
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
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
        "last_loss": {name: step.last_loss for name, step in steps.items()},
        "failed": failed,
        "steps_timed": {k: len(v) for k, v in times.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    med = result["median_step_ms"]

    lines = [f"# training step, `{args.config}`, batch {args.batch} of {args.patch}x{args.patch}",
             "", f"machine: {result['machine']}", "",
             "| variant | median step ms | vs eager fp32 | forward | loss | backward | optimizer "
             "| last loss |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in steps:
        ph = result["phases_median_ms"][name]
        lines.append(f"| {name} | {med[name]:.0f} | {med['eager'] / med[name]:.2f}x | "
                     f"{ph['forward']:.0f} | {ph['loss']:.0f} | {ph['backward']:.0f} | "
                     f"{ph['optimizer']:.0f} | {result['last_loss'][name]:.4f} |")  # fmt: skip
    lines += [f"| {name} | failed: {error} | | | | | | |" for name, error in failed.items()]
    lines += ["", "compile warm-up steps (ms): " + "; ".join(
                  f"{n}: {', '.join(f'{w:.0f}' for w in ws)}" for n, ws in warmup.items()),
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
