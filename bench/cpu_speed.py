"""The CPU speed-ups against the code paths they replaced, side by side in one process: the TAM
tabulated against the TAM evaluated directly (kernels/tam_modulation.py), and the KPN on
channels-last maps against the plain layout (model/kpn.py), alone and together; then with the
NAFBlock's residual, LayerNorm and gate in native kernels (kernels/layer_norm.py, gate.py)
against PyTorch's, and that with bfloat16 (the model in bf16 for a forward, as `opir restore
--precision bf16` runs it; bf16 autocast for a training step); per module, per image through
the shipped model, and per training step.

    python bench/cpu_speed.py                        # sizes 256,512,1024; 5 rounds
    python bench/cpu_speed.py --train-steps 200      # also compare 200 training steps' losses

Each measurement alternates the variants round by round, so a load change on a shared machine
hits all of them; medians are reported. The whole-model figure is issue 20's yardstick: the
model's analytic FLOPs per second as a share of this machine's fp32 matmul rate, measured in
the same run. All of it runs with freed memory kept for reuse, as the engine and the trainer
run (`keep_freed_memory`; bench/allocator.py measures that setting itself). Results go to
bench/results/cpu_speed-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)

from opir_engine.devices import keep_freed_memory
from opir_engine.model import CLASSES, OPIR, OPIRConfig, OPIRLoss
from opir_engine.model.flops import count_opir_flops
from opir_engine.weights import load_checkpoint
from opir_kernels.nafblock_native import native_nafblock
from opir_kernels.tam_modulation import tam_form

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FORMS = ("direct", "tabulated")
# name: (TAM form, KPN on channels-last maps, bf16, the NAFBlock's native norm and gate
# (kernels/layer_norm.py, kernels/gate.py), the TAM table's points (None: sized by the image,
# `table_points`)); "before" is the code as it was. "now, bf16" is now with the model in
# bfloat16 (`opir restore --precision bf16`: bf16 parameters, so PyTorch's norm and gate run)
# for a forward; for a training step, under bf16 autocast as `opir train --precision bf16` runs
# it (weights, gradients and Adam in fp32; the native norm and gate on bf16 maps)
FULL = 4097  # the one table size before tables were sized by the image
VARIANTS = {
    "before": ("direct", False, False, False, None),
    "tabulated TAM": ("tabulated", False, False, False, FULL),
    "channels-last KPN": ("direct", True, False, False, None),
    "both": ("tabulated", True, False, False, FULL),
    "both, native NAFBlock": ("tabulated", True, False, True, FULL),
    "now (+ TAM table sized by the image)": ("tabulated", True, False, True, None),
    "now, bf16": ("tabulated", True, True, True, None),
}
NOW, BF16 = "now (+ TAM table sized by the image)", "now, bf16"


@contextlib.contextmanager
def _variant(name: str, models: list[OPIR]) -> Iterator[None]:
    """Inside the block, `models` run as `name` says (a TAM form alone where `name` is one)."""
    form, channels_last, _, native_norm, points = VARIANTS.get(
        name, (name, True, False, True, None)
    )
    for model in models:
        model.kpn.channels_last = channels_last
    try:
        with tam_form(form, points), native_nafblock(native_norm):
            yield
    finally:
        for model in models:
            model.kpn.channels_last = True


def _interleaved(
    runs: dict[str, Callable[[], object]], rounds: int, models: list[OPIR]
) -> dict[str, float]:
    """Median ms of each callable, run alternately `rounds` times after one warm-up each, each
    under the variant it is named after."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        with _variant(name, models):
            run()
    for _ in range(rounds):
        for name, run in runs.items():
            with _variant(name, models):
                t = time.perf_counter()
                run()
                times[name].append(1000 * (time.perf_counter() - t))
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_gflops(rounds: int) -> float:
    """This machine's fp32 matmul rate (2048^2 by 2048^2, best of `rounds`), GFLOP/s."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(rounds))
    return 2 * 2048**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def module_alone(model: OPIR, sizes: list[int], rounds: int) -> dict[str, dict[str, float]]:
    """The stage-1 TAM on the shipped KPN's kernel of a real photo, per size, forward only."""
    from opir_engine.image_io import read_image

    photo = read_image(ROOT / "samples" / "rocket_haze.jpg").rgb[None]
    task = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    out = {}
    for size in sizes:
        image = F.interpolate(photo, size=(size, size), mode="bilinear")
        with torch.no_grad():
            kernel = model.kpn(image, None).kernel
            runs = {form: (lambda k=kernel: model.tams[0](k, task)) for form in FORMS}
            out[f"{size}x{size}"] = _interleaved(runs, rounds, [model])
    return out


def whole_model(model: OPIR, size: int, rounds: int) -> tuple[dict[str, float], float]:
    """Median ms of the shipped model's forward (task rain) on one (1, 3, size, size) image per
    variant, and the PSNR of the bf16 output against the fp32 one."""
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    task = F.one_hot(torch.tensor([CLASSES.index("rain")]), len(CLASSES)).float()
    half = copy.deepcopy(model).to(torch.bfloat16)
    image16, task16 = image.to(torch.bfloat16), task.to(torch.bfloat16)

    def forward(name: str) -> Callable[[], torch.Tensor]:
        if VARIANTS[name][2]:
            return lambda: half(image16, task16).restored
        return lambda: model(image, task).restored

    with torch.no_grad():
        runs = {name: forward(name) for name in VARIANTS}
        times = _interleaved(runs, rounds, [model, half])
        error = (runs[BF16]().float() - runs[NOW]()).square().mean()
    return times, float(-10 * torch.log10(error))


def training(steps: int, batch: int, patch: int, rounds: int) -> dict:
    """Median ms of a training step (small config, same loss, clipping and Adam as the trainer)
    per variant, and the losses of `steps` steps from the same init and batches before and
    now."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(max(steps, 4)):
        target = torch.rand(batch, 3, patch, patch, generator=g)
        degraded = (0.7 * target + 0.3 * torch.rand(target.shape, generator=g)).clamp(0, 1)
        batches.append((degraded, target, torch.randint(0, len(CLASSES), (batch,), generator=g)))
    loss_fn = OPIRLoss()

    def trainer() -> tuple[OPIR, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = OPIR(OPIRConfig.from_name("small")).train()
        return model, torch.optim.Adam(model.parameters(), lr=2e-4)

    def step(model: OPIR, optimizer: torch.optim.Optimizer, i: int, bf16: bool = False) -> float:
        degraded, target, labels = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = model(degraded, F.one_hot(labels, len(CLASSES)).float())
        total, _ = loss_fn(output.in_fp32(), target, labels)  # as the trainer does
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return total.item()

    timing = {name: trainer() for name in VARIANTS}
    counter = dict.fromkeys(VARIANTS, 0)

    def timed_step(name: str) -> Callable[[], float]:
        def run() -> float:
            counter[name] += 1
            return step(*timing[name], counter[name], VARIANTS[name][2])

        return run

    models = [model for model, _ in timing.values()]
    runs = {name: timed_step(name) for name in VARIANTS}
    result: dict = {"median_step_ms": _interleaved(runs, rounds, models)}
    if steps:
        losses = {}
        for name in ("before", NOW, BF16):
            model, optimizer = trainer()
            with _variant(name, [model]):
                losses[name] = [step(model, optimizer, i, VARIANTS[name][2]) for i in range(steps)]
        result["loss_curves"] = losses
        result["max_loss_difference"] = {
            name: max(abs(a - b) for a, b in zip(losses["before"], losses[name], strict=True))
            for name in (NOW, BF16)
        }
        result["final_losses"] = {name: curve[-1] for name, curve in losses.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=0, help="steps of the loss check")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    sizes = [int(s) for s in args.sizes.split(",")]
    model, _ = load_checkpoint(ROOT / "weights" / "opir-small-allinone.safetensors")
    model.eval()
    t0 = time.perf_counter()
    rate = matmul_gflops(args.rounds)
    forward_ms, bf16_psnr = whole_model(model, 512, args.rounds)
    flops = count_opir_flops(model.config, 512, 512).total
    result = {
        "machine": describe_machine(),
        "fp32_matmul_gflops": rate,
        "tam_forward_ms": module_alone(model, sizes, args.rounds),
        "model_512_forward_ms": forward_ms,
        "model_512_bf16_psnr_vs_fp32": bf16_psnr,
        "model_512_gflop": flops / 1e9,
        "training_small_batch8_128": training(args.train_steps, 8, 128, args.rounds),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    model_ms = result["model_512_forward_ms"]
    share = {name: flops / (ms / 1000) / 1e9 / rate for name, ms in model_ms.items()}
    train = result["training_small_batch8_128"]
    lines = [
        "# CPU speed-ups against the code paths they replaced", "",
        f"machine: `{json.dumps(result['machine'])}`", "",
        f"fp32 matmul rate measured in the same run: {rate:.0f} GFLOP/s", "",
        "| TAM alone | direct (ms) | tabulated (ms) | speed-up |", "|---|---|---|---|",
    ]  # fmt: skip
    for size, t in result["tam_forward_ms"].items():
        lines.append(f"| forward {size} | {t['direct']:.1f} | {t['tabulated']:.1f} | "
                     f"{t['direct'] / t['tabulated']:.2f}x |")  # fmt: skip
    names = list(VARIANTS)
    lines += ["", "| median ms | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, t in (
        ("shipped model forward 512x512", model_ms),
        ("training step, small, batch 8 of 128x128", train["median_step_ms"]),
    ):
        cells = [f"{t[n]:.0f} ({t['before'] / t[n]:.2f}x)" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += [
        "",
        f"Shipped model at 512x512: {flops / 1e9:.2f} GFLOP per image; share of the "
        "matmul rate: " + ", ".join(f"{n} {100 * s:.1f}%" for n, s in share.items()),
        "",
        f"The bf16 model's output against the fp32 one on that image: {bf16_psnr:.1f} dB PSNR.",
    ]
    if "max_loss_difference" in train:
        final = train["final_losses"]
        diff = train["max_loss_difference"]
        lines += ["", f"Loss over {args.train_steps} training steps from one init and the same "
                  f"batches, largest difference from before: now {diff[NOW]:.2e}, bf16 "
                  f"autocast {diff[BF16]:.2e}; final loss {final['before']:.5f} before, "
                  f"{final[NOW]:.5f} now, {final[BF16]:.5f} bf16."]  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"cpu_speed-{machine_tag(result['machine'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
