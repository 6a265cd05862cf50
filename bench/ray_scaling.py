"""Throughput of `opir restore --backend ray` with 1 and 2 workers against the local backend.

    OMP_NUM_THREADS=1 python bench/ray_scaling.py              # results in bench/results/
    OMP_NUM_THREADS=1 python bench/ray_scaling.py --images 32 --size 512x384 --config small

Weights: a seeded random model of `--config` (default tiny; the compute does not depend on the
weights' values). Inputs: `--images` real photos from the shared data folder (BSDS500 test),
downscaled to `--size` and saved as PNG in a temporary folder; outputs PNG, eager, fp32, CPU.

Each setting restores the same folder into a fresh output folder:
- `local`: `OPIREngine.from_pretrained` then `batch.run_jobs`, torch with 1 thread.
- `ray-N`: `ray_backend.restore_with_ray` with N workers of 1 CPU each (1 torch thread), on a
  local Ray instance it starts (N CPUs) and shuts down.
Two figures each: end-to-end images/s (wall time of the whole call: Ray start, actor and model
start-up, restoring, shutdown) and steady images/s (files finished after the first one, over
the time from the record a quarter of the way in to the last), which is what a long run
approaches; and the mean time per image inside `restore_file` (read, restore, write) as each
worker saw it, which grows when workers compete for cores and memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_machine, machine_tag  # bench/machine.py (the script's folder)
from PIL import Image

from opir_engine.batch.ray_backend import restore_with_ray
from opir_engine.batch.runner import FileRecord, RestoreOptions, plan_jobs, run_jobs
from opir_engine.inference.engine import OPIREngine
from opir_engine.model import OPIR, OPIRConfig
from opir_engine.weights import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OPIR_DATA", ROOT.parent / "shared" / "data"))


def make_inputs(folder: Path, count: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True)
    sources = sorted((DATA / "clean" / "BSDS500_test").glob("*.jpg"))
    if len(sources) < count:
        raise SystemExit(f"{DATA}: need {count} BSDS500 test photos, found {len(sources)}")
    for i, src in enumerate(sources[:count]):
        with Image.open(src) as im:
            im.convert("RGB").resize(size, Image.Resampling.BOX).save(folder / f"{i:03d}.png")


def measure(name: str, run, count: int) -> dict:  # type: ignore[no-untyped-def]
    stamps: list[float] = []
    ms: list[float] = []

    def on_record(record: FileRecord) -> None:
        assert record.status == "done", record
        stamps.append(time.perf_counter())
        ms.append(record.ms or 0.0)

    t0 = time.perf_counter()
    run(on_record)
    wall = time.perf_counter() - t0
    # Records can arrive in bunches (Ray Data hands rows over in bundles), so the steady rate
    # counts from the record a quarter of the way in, not from the first one.
    k = len(stamps) // 4
    steady = (len(stamps) - 1 - k) / (stamps[-1] - stamps[k]) if len(stamps) > k + 1 else None
    result = {
        "setting": name,
        "images": count,
        "wall_s": round(wall, 2),
        "end_to_end_images_per_s": round(count / wall, 3),
        "first_record_s": round(stamps[0] - t0, 2),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "mean_ms_per_image": round(sum(ms) / len(ms), 1),  # inside restore_file, per worker
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="256x192", help="WxH of the inputs")
    parser.add_argument("--config", default="tiny", help="tiny, small or paper (random init)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    torch.set_num_threads(1)
    import ray

    machine = {**describe_machine(torch.device("cpu")), "ray": ray.__version__,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = tmp / f"bench-{args.config}.safetensors"
        torch.manual_seed(0)
        save_checkpoint(weights, OPIR(OPIRConfig.from_name(args.config)), {"name": args.config})
        make_inputs(tmp / "in", args.images, (w, h))
        engine_args = dict(name_or_path=str(weights), device="cpu", precision="fp32",
                           compile=False, tile=512, tile_overlap=32)  # fmt: skip
        options = RestoreOptions()
        results = []

        def local(on_record):  # type: ignore[no-untyped-def]
            engine = OPIREngine.from_pretrained(**engine_args)
            run_jobs(engine, plan_jobs(tmp / "in", tmp / "out-local"), options, on_record)

        results.append(measure("local", local, args.images))
        for n in args.workers:

            def on_ray(on_record, n=n):  # type: ignore[no-untyped-def]
                jobs = plan_jobs(tmp / "in", tmp / f"out-ray{n}")
                restore_with_ray(jobs, options, engine_args, on_record, workers=n)

            results.append(measure(f"ray-{n}", on_ray, args.images))

        def local_again(on_record):  # type: ignore[no-untyped-def]
            engine = OPIREngine.from_pretrained(**engine_args)
            run_jobs(engine, plan_jobs(tmp / "in", tmp / "out-local2"), options, on_record)

        # Once more at the end: on a shared machine the load drifts during the run.
        results.append(measure("local (again)", local_again, args.images))
    setup = {"config": args.config, "init": "random (seed 0)", "images": args.images,
             "size": args.size, "format": "png", "device": "cpu", "precision": "fp32",
             "compile": False, "torch_threads_per_worker": 1}  # fmt: skip
    tag = machine_tag(machine)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine, "setup": setup, "results": results}
    (args.out / f"ray-{tag}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        f"# opir restore --backend ray: scaling on {tag}",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} cores, load average at start "
        f"{machine.get('load_average_1min')}; torch {machine['torch']}, ray {machine['ray']}.",
        f"Setup: {args.config} config, random init; {args.images} BSDS500 photos at {args.size} "
        "PNG; CPU fp32 eager; 1 torch thread per worker (local: 1 thread).",
        "",
        "| setting | wall s | end-to-end img/s | first result s | steady img/s | ms/image |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['setting']} | {r['wall_s']} | {r['end_to_end_images_per_s']} | "
                     f"{r['first_record_s']} | {r['steady_images_per_s']} | "
                     f"{r['mean_ms_per_image']} |")  # fmt: skip
    (args.out / f"ray-{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'ray-{tag}.md'}")


if __name__ == "__main__":
    main()
