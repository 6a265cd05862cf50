"""Tests for the Ray backend of `opir restore` on a real local Ray instance with 2 CPUs.

Inputs are real photos of the shared data folder, downscaled into tmp_path; the weights are a
tiny seeded OPIR moved away from its identity init. Ray starts once for the module; every run
uses --no-compile, fp32 and PNG outputs, so the two backends must agree byte for byte.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from opir_engine.batch.ray_backend import restore_with_ray  # noqa: E402
from opir_engine.batch.runner import FileRecord, RestoreOptions, plan_jobs, run_jobs  # noqa: E402
from opir_engine.cli.app import app  # noqa: E402
from opir_engine.inference.engine import OPIREngine  # noqa: E402

# Each actor runs torch on its 1-CPU share; the local reference must too (conftest's
# one_thread), since a convolution split over more threads rounds differently and can flip an
# 8-bit level. Slow: each test takes 10-25 s on 2 idle cores.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_instance():  # type: ignore[no-untyped-def]
    """One local Ray with 2 CPUs for the whole module; restore_with_ray reuses it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> Callable[[Path, int, tuple[int, int]], list[Path]]:
    """`photos(folder, count, size)`: the first `count` BSDS500 test photos, downscaled to
    size = (W, H), saved as PNG in folder."""

    def write(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        sources = sorted((shared_data / "clean" / "BSDS500_test").glob("*.jpg"))[:count]
        paths = []
        for i, src in enumerate(sources):
            with Image.open(src) as im:
                small = im.convert("RGB").resize(size, Image.Resampling.BOX)
            path = folder / f"{i:02d}_{src.stem}.png"
            small.save(path)
            paths.append(path)
        return paths

    return write


def _engine_args(weights: Path) -> dict:
    return dict(name_or_path=str(weights), device="cpu", precision="fp32", tile=128,
                tile_overlap=16, compile=False)  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_ray_and_local_backends_write_identical_files(photos, ray_instance, weights, tmp_path):  # type: ignore[no-untyped-def]
    photos(tmp_path / "in", 6, (96, 72))
    local_jobs = plan_jobs(tmp_path / "in", tmp_path / "local")
    ray_jobs = plan_jobs(tmp_path / "in", tmp_path / "ray")
    engine = OPIREngine.from_pretrained(**_engine_args(weights))
    local = run_jobs(engine, local_jobs, RestoreOptions())
    seen: list[FileRecord] = []
    records = restore_with_ray(
        ray_jobs, RestoreOptions(), _engine_args(weights), seen.append, workers=2
    )
    assert [r.status for r in records] == ["done"] * 6
    assert sorted(r.input for r in seen) == sorted(r.input for r in records)
    assert [r.input for r in records] == [str(j.input) for j in ray_jobs]  # job order
    assert [(r.task, r.width, r.height, r.flops) for r in records] == [
        (r.task, r.width, r.height, r.flops) for r in local
    ]
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert len(_files(tmp_path / "ray")) == 6


def test_bad_file_fails_alone_and_rerun_skips(photos, ray_instance, weights, tmp_path):  # type: ignore[no-untyped-def]
    photos(tmp_path / "in", 4, (64, 48))
    (tmp_path / "in" / "01_zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out")
    records = restore_with_ray(jobs, RestoreOptions(), _engine_args(weights), workers=2)
    failed = [r for r in records if r.status == "failed"]
    assert len(failed) == 1 and failed[0].input.endswith("01_zz_broken.png")
    assert failed[0].error  # the reason, printed after the path by the CLI
    assert [r.status for r in records].count("done") == 4
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert len(before) == 4
    again = restore_with_ray(jobs, RestoreOptions(), _engine_args(weights), workers=2)
    assert sorted(r.status for r in again) == ["failed"] + ["skipped"] * 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


def _actor_pids() -> list[int]:
    """PIDs of this process's Ray Data actors (their process title names the MapWorker)."""
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "MapWorker" not in cmdline:
                continue
            # Only ours: a worker descends from the raylet this test process started.
            pid = int(entry.name)
            while pid > 1 and pid != me:
                stat = (Path("/proc") / str(pid) / "stat").read_text()
                pid = int(re.sub(r"^.*\) ", "", stat, flags=re.S).split()[1])
            if pid == me:
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def test_killed_worker_is_retried_without_duplicate_or_partial_output(  # type: ignore[no-untyped-def]
    photos, ray_instance, weights, tmp_path
):
    photos(tmp_path / "in", 10, (192, 144))
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out")
    killed: list[int] = []

    def kill_one_actor(record: FileRecord) -> None:
        # After the first file comes back, the other actor is mid-file (or about to start
        # one): SIGKILL it, a real process death with no chance to clean up.
        if not killed:
            pids = _actor_pids()
            assert len(pids) == 2
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    records = restore_with_ray(
        jobs, RestoreOptions(), _engine_args(weights), kill_one_actor, workers=2
    )
    assert killed and killed[0] not in _actor_pids()
    assert [r.input for r in records] == [str(j.input) for j in jobs]  # one record per file
    assert all(r.status in ("done", "skipped") for r in records)
    outputs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outputs] == sorted(j.output.name for j in jobs)  # no .part left
    reference = OPIREngine.from_pretrained(**_engine_args(weights))
    run_jobs(reference, plan_jobs(tmp_path / "in", tmp_path / "ref"), RestoreOptions())
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")  # every output complete


def test_cli_ray_backend_matches_local_summary(photos, ray_instance, weights, tmp_path):  # type: ignore[no-untyped-def]
    photos(tmp_path / "in", 3, (64, 48))
    common = ["--weights", str(weights), "--no-compile", "--precision", "fp32",
              "--tile", "128", "--tile-overlap", "16"]  # fmt: skip
    runner = CliRunner()
    ray_run = runner.invoke(
        app, ["restore", str(tmp_path / "in"), str(tmp_path / "ray"), "--backend", "ray",
              "--workers", "2", "--report", str(tmp_path / "ray.json"), *common],
    )  # fmt: skip
    local_run = runner.invoke(
        app, ["restore", str(tmp_path / "in"), str(tmp_path / "local"), *common]
    )
    assert ray_run.exit_code == 0, ray_run.output
    assert local_run.exit_code == 0, local_run.output
    assert "3 done, 0 skipped, 0 failed" in ray_run.output
    assert "on ray (2 workers" in ray_run.output
    assert "3 done, 0 skipped, 0 failed" in local_run.output
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert '"status": "done"' in (tmp_path / "ray.json").read_text()
    bad = runner.invoke(
        app, ["restore", str(tmp_path / "in"), str(tmp_path / "x"), "--backend", "spark"]
    )
    assert bad.exit_code == 2
