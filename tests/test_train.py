"""The trainer: learning-rate schedule, bit-exact resume, run directory, CLI, validation split.

Training data for the runs here is a handful of small crops of real pairs and photos from the
shared data, written as PNG into pytest's tmp folder; the split test reads the real folders.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from opir_engine.cli.app import app
from opir_engine.cli.reproduce import train_command
from opir_engine.devices import DeviceError
from opir_engine.evaluation.contact_sheet import CROP, LABEL
from opir_engine.evaluation.metrics import psnr
from opir_engine.model import CLASSES, OPIR, OPIRConfig
from opir_engine.model.padding import crop_to, pad_to_multiple
from opir_engine.synthesis import (
    DAYLIT_MIST,
    DENSE_FOG,
    DIM_SCENE,
    RAIN_VEIL,
    apply_veil,
    sample_veil_params,
    synthesize,
)
from opir_engine.training.recipe import DataSpec, Recipe, TrainingError, lineage
from opir_engine.training.sampler import TrainingSet, step_batches
from opir_engine.training.trainer import Trainer
from opir_engine.training.validation import ValidationSet, evaluate
from opir_engine.weights import load_checkpoint

SPLIT = Path(__file__).resolve().parents[1] / "splits" / "validation.json"
OPIR_SCRIPT = Path(sys.executable).parent / "opir"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# (source file relative to the shared data, file written under the fixture root); crops are 46x62 so
# validation has to pad them to the model's multiple of 4.
_FIXTURE_FILES = [
    ("rain/Rain13K-subset/input/1.jpg", "rain/input/r1.png"),
    ("rain/Rain13K-subset/target/1.jpg", "rain/target/r1.png"),
    ("rain/Rain13K-subset/input/2.jpg", "rain/input/r2.png"),
    ("rain/Rain13K-subset/target/2.jpg", "rain/target/r2.png"),
    ("haze/SOTS-indoor/input/1400_1.png", "haze/input/h1.png"),
    ("haze/SOTS-indoor/target/1400_1.png", "haze/target/h1.png"),
    ("haze/SOTS-indoor/input/1401_2.png", "haze/input/h2.png"),
    ("haze/SOTS-indoor/target/1401_2.png", "haze/target/h2.png"),
    ("clean/CBSD68/101085.png", "clean/c1.png"),
    ("clean/CBSD68/101087.png", "clean/c2.png"),
    ("clean/CBSD68/102061.png", "clean/c3.png"),
]
_HELD_OUT = {
    "rain": ["rain/input/r2.png"],
    "haze": ["haze/input/h2.png"],
    "clean": ["clean/c3.png"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_root(crop_data: Callable[..., Path]) -> Path:
    """Small crops of real pairs and photos, plus a split holding one of each aside."""
    return crop_data(_FIXTURE_FILES, _HELD_OUT)


def _spec(root: Path, split: bool = False) -> DataSpec:
    return DataSpec(
        paired={"rain": [str(root / "rain")], "haze": [str(root / "haze")]},
        clean=[str(root / "clean")],
        split=str(root / "split.json") if split else None,
        data_root=str(root) if split else None,
    )


def _recipe(**overrides: object) -> Recipe:
    base = dict(config="tiny", steps=6, batch=2, patch=32, max_side=64, seed=3, val_every=1000,
                ckpt_every=1000, log_every=1)  # fmt: skip
    return Recipe(**{**base, **overrides})  # type: ignore[arg-type]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_is_cosine_from_lr_to_lr_min() -> None:
    r = Recipe(steps=100, lr=2e-4, lr_min=1e-7)
    assert r.lr_at(0) == pytest.approx(2e-4, rel=1e-12)
    assert r.lr_at(100) == 1e-7
    assert r.lr_at(250) == 1e-7  # clamped after the schedule ends
    assert r.lr_at(50) == pytest.approx((2e-4 + 1e-7) / 2, rel=1e-12)
    quarter = 1e-7 + 0.5 * (2e-4 - 1e-7) * (1 + math.cos(math.pi / 4))
    assert r.lr_at(25) == pytest.approx(quarter, rel=1e-12)
    lrs = [r.lr_at(s) for s in range(101)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    # cosine: slow at both ends, fastest in the middle
    drops = np.diff(lrs)
    assert abs(drops[0]) < abs(drops[50]) and abs(drops[-1]) < abs(drops[50])


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


def test_recipe_seed_fixes_initial_weights(tmp_path: Path, data_root: Path) -> None:
    a = Trainer(tmp_path / "a", _recipe(), _spec(data_root)).model.state_dict()
    torch.rand(10)  # the global generator's state must not matter
    b = Trainer(tmp_path / "b", _recipe(), _spec(data_root)).model.state_dict()
    c = Trainer(tmp_path / "c", _recipe(seed=4), _spec(data_root)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_is_bit_exact(tmp_path: Path, data_root: Path) -> None:
    recipe, spec = _recipe(), _spec(data_root)
    training_set = TrainingSet(spec, recipe)
    assert training_set.counts() == {"rain": 2, "haze": 2, "clean": 3}

    straight = Trainer(tmp_path / "straight", recipe, spec)
    straight.train(training_set, None)
    assert straight.step == 6

    first = Trainer(tmp_path / "split", recipe, spec)
    first.train(training_set, None, stop_step=3)
    assert first.step == 3
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.step == 3 and resumed.recipe == recipe and resumed.data == spec
    resumed.train(training_set, None)
    assert resumed.step == 6

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for idx, entries in opt_a["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, opt_b["state"][idx][name]), (idx, name)
    losses = [entry["loss"] for entry in _log(tmp_path / "straight")]
    assert len(losses) == 6
    assert losses == [entry["loss"] for entry in _log(tmp_path / "split")]


def test_the_weight_average_is_checkpointed_and_training_unchanged(
    tmp_path: Path, data_root: Path
) -> None:
    """With `ema`, the checkpoints hold a_1 = w_1, a_k = d a_(k-1) + (1 - d) w_k of the trained
    weights w_k, which follow the run without it step for step; a resume continues both."""
    spec, decay = _spec(data_root), 0.75
    training_set = TrainingSet(spec, _recipe())
    plain = Trainer(tmp_path / "plain", _recipe(), spec)
    expected: dict[str, torch.Tensor] = {}
    for step in range(1, 5):  # the trained weights after each step, averaged by hand
        plain.train(training_set, None, stop_step=step)
        w = {k: v.clone() for k, v in plain.model.state_dict().items()}
        expected = w if step == 1 else {k: decay * expected[k] + (1 - decay) * w[k] for k in w}

    averaged = Trainer(tmp_path / "ema", _recipe(ema=decay), spec)
    averaged.train(training_set, None, stop_step=2)
    averaged = Trainer.resume(tmp_path / "ema")
    averaged.train(training_set, None, stop_step=4)
    trained = averaged.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in plain.model.state_dict().items())
    written, card = load_checkpoint(tmp_path / "ema" / "last.safetensors")
    assert card["recipe"]["ema"] == decay and card["steps"] == 4
    for k, v in written.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(trained[k], expected[k]) for k in expected)
    with pytest.raises(TrainingError, match=r"ema decay must be in \[0, 1\); got 1.0"):
        _recipe(ema=1.0)


def test_bf16_autocast_training_follows_fp32(tmp_path: Path, data_root: Path) -> None:
    """The same run under bf16 autocast: each step's loss within bf16 rounding of the fp32
    run's, and not equal to it (the forward did run in bf16); the weights stay fp32."""
    spec = _spec(data_root)
    runs = {}
    for precision in ("fp32", "bf16"):
        recipe = _recipe(precision=precision)
        runs[precision] = Trainer(tmp_path / precision, recipe, spec)
        runs[precision].train(TrainingSet(spec, recipe), None)
    fp32, bf16 = ([e["loss"] for e in _log(tmp_path / p)] for p in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 6
    assert all(abs(a - b) < 0.03 * a for a, b in zip(fp32, bf16, strict=True))
    assert fp32 != bf16
    assert all(v.dtype == torch.float32 for v in runs["bf16"].model.state_dict().values())
    with pytest.raises(TrainingError, match="precision must be fp32 or bf16; got 'fp16'"):
        _recipe(precision="fp16")


def test_a_non_finite_loss_stops_the_run_before_any_weight_moves(
    tmp_path: Path, data_root: Path
) -> None:
    """A NaN loss raises before Adam's step: the weights, the optimizer and the saved state
    stay as they were, and the error names the step."""
    spec, recipe = _spec(data_root), _recipe()
    trainer = Trainer(tmp_path / "run", recipe, spec)
    with torch.no_grad():
        trainer.model.kpn.intro.bias[0] = math.nan  # every output pixel turns NaN
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"^step 1: the loss is nan, its gradient norm nan; "
                       r"the step was not applied and the run is saved at step 0$"):  # fmt: skip
        trainer.train(TrainingSet(spec, recipe), None)
    assert trainer.step == 0 and not trainer.optimizer.state
    saved = load_file(str(tmp_path / "run" / "state" / "model.safetensors"))
    for name, value in before.items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, equal_nan=True)
        torch.testing.assert_close(saved[name], value, equal_nan=True)
    assert json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())["step"] == 0


def test_a_compiled_bf16_step_on_the_cpu_is_refused(tmp_path: Path, data_root: Path) -> None:
    spec, recipe = _spec(data_root), _recipe(precision="bf16")
    trainer = Trainer(tmp_path / "run", recipe, spec)
    with pytest.raises(TrainingError, match="a compiled bf16 step on the CPU computes NaN"):
        trainer.train(TrainingSet(spec, recipe), None, compile_step=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_weight_average_started_on_resume_starts_from_the_weights(
    tmp_path: Path, data_root: Path
) -> None:
    spec = _spec(data_root)
    run = Trainer(tmp_path / "run", _recipe(), spec)
    run.train(TrainingSet(spec, _recipe()), None, stop_step=2)
    resumed = Trainer.resume(tmp_path / "run", changes={"ema": 0.5})
    assert resumed.recipe_changes == [{"step": 2, "ema": 0.5, "was": {"ema": 0.0}}]
    at_resume = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    assert all(torch.equal(resumed.checkpointed.state_dict()[k], v) for k, v in at_resume.items())
    resumed.train(TrainingSet(spec, resumed.recipe), None, stop_step=3)
    # the first update takes the weights of step 3 as they are
    written = load_checkpoint(tmp_path / "run" / "last.safetensors")[0].state_dict()
    assert all(torch.equal(written[k], v) for k, v in resumed.model.state_dict().items())


def test_resume_of_a_run_made_before_task_weights(tmp_path: Path, data_root: Path) -> None:
    """runs/small-allinone's run.json has no task_weights: it resumes with equal weights."""
    recipe = _recipe()
    Trainer(tmp_path / "run", recipe, _spec(data_root)).train(
        TrainingSet(_spec(data_root), recipe), None, stop_step=1
    )
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["recipe"]["task_weights"] == [1.0, 1.0, 1.0]
    del info["recipe"]["task_weights"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    resumed = Trainer.resume(tmp_path / "run")
    assert resumed.recipe == recipe and resumed.step == 1


def test_a_resume_changes_what_is_drawn_only(tmp_path: Path, data_root: Path) -> None:
    spec = _spec(data_root)
    Trainer(tmp_path / "run", _recipe(), spec).train(TrainingSet(spec, _recipe()), None,
                                                     stop_step=2)  # fmt: skip
    with pytest.raises(TrainingError, match=r"can change only .*; not lr, steps"):
        Trainer.resume(tmp_path / "run", changes={"lr": 1.0, "steps": 9})
    with pytest.raises(TrainingError, match=r"clean ratio must be in \[0, 1\]; got 2"):
        Trainer.resume(tmp_path / "run", changes={"clean_ratio": 2})
    resumed = Trainer.resume(tmp_path / "run", changes={"task_weights": [1, 0, 0]})
    assert resumed.recipe == _recipe(task_weights=(1, 0, 0)) and resumed.step == 2
    was = {"task_weights": (1.0, 1.0, 1.0)}
    assert resumed.recipe_changes == [{"step": 2, "task_weights": (1, 0, 0), "was": was}]
    assert resumed.card(None)["recipe_changes"] == resumed.recipe_changes


def test_resume_of_a_non_run_directory(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="not a resumable run directory"):
        Trainer.resume(tmp_path)


def test_a_step_draws_nothing_from_torch_generators(tmp_path: Path, data_root: Path) -> None:
    """Why the saved state holds no RNG state: batches come from numpy generators seeded by the
    step and the model has no dropout, so resuming needs none (on the CPU or CUDA)."""
    recipe = _recipe()
    trainer = Trainer(tmp_path / "run", recipe, _spec(data_root))
    before = torch.get_rng_state()
    trainer.train(TrainingSet(_spec(data_root), recipe), None, stop_step=2)
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# Devices and batch-drawing workers
# ---------------------------------------------------------------------------------------------


def _states_equal(a: Trainer, b: Trainer) -> bool:
    ma, mb = a.model.state_dict(), b.model.state_dict()
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    return all(torch.equal(ma[k], mb[k].to(ma[k].device)) for k in ma) and all(
        torch.equal(v, ob[i][name].to(v.device)) for i, e in oa.items() for name, v in e.items()
    )


def test_device_is_recorded_and_resumed(tmp_path: Path, data_root: Path) -> None:
    recipe, spec = _recipe(), _spec(data_root)
    training_set = TrainingSet(spec, recipe)
    straight = Trainer(tmp_path / "straight", recipe, spec, device="cpu")
    straight.train(training_set, None)

    first = Trainer(tmp_path / "run", recipe, spec, device="auto")
    first.train(training_set, None, stop_step=2)
    run_json = tmp_path / "run" / "run.json"
    assert json.loads(run_json.read_text())["device"] == "auto"  # as given: re-resolved on resume
    resumed = Trainer.resume(tmp_path / "run")
    assert resumed.device_name == "auto" and resumed.step == 2
    assert resumed.device.type == ("cuda" if torch.cuda.is_available() else "cpu")

    resumed = Trainer.resume(tmp_path / "run", "cpu")  # an explicit device wins, and is recorded
    resumed.train(training_set, None, stop_step=4)
    assert json.loads(run_json.read_text())["device"] == "cpu"
    assert Trainer.resume(tmp_path / "run").device == torch.device("cpu")

    info = json.loads(run_json.read_text())  # runs made before the option trained on the CPU
    del info["device"]
    run_json.write_text(json.dumps(info))
    resumed = Trainer.resume(tmp_path / "run")
    assert resumed.device == torch.device("cpu") and resumed.step == 4
    resumed.train(training_set, None)
    if not torch.cuda.is_available():  # all of it on the CPU: the straight run's bits
        assert _states_equal(straight, resumed)


def test_workers_draw_the_batches_of_a_serial_run(tmp_path: Path, data_root: Path) -> None:
    recipe, spec = _recipe(), _spec(data_root)
    training_set = TrainingSet(spec, recipe)
    drawn = list(step_batches(training_set, 2, 6, torch.device("cpu"), workers=2))
    assert len(drawn) == 4
    for step, batch in zip(range(2, 6), drawn, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch, training_set.batch(step), strict=True))

    serial = Trainer(tmp_path / "serial", recipe, spec)
    serial.train(training_set, None, workers=0)
    ahead = Trainer(tmp_path / "ahead", recipe, spec)
    ahead.train(training_set, None, stop_step=3, workers=2)  # stopped and resumed mid-stream
    ahead = Trainer.resume(tmp_path / "ahead")
    ahead.train(training_set, None, workers=2)
    assert ahead.step == 6 and _states_equal(serial, ahead)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", "cpu:cuda"])
def test_bad_devices_are_refused(tmp_path: Path, data_root: Path, name: str) -> None:
    with pytest.raises(DeviceError, match=re.escape(repr(name))):
        Trainer(tmp_path / "run", _recipe(), _spec(data_root), device=name)
    assert not (tmp_path / "run").exists()


@needs_cuda
def test_a_cuda_run_resumes_on_the_cpu_and_back(tmp_path: Path, data_root: Path) -> None:
    """State and checkpoints are CPU tensors: a run moves between devices at any saved step,
    on the batches a CPU run draws."""
    recipe, spec = _recipe(), _spec(data_root)
    training_set = TrainingSet(spec, recipe)
    run = tmp_path / "run"
    cuda = Trainer(run, recipe, spec, device="cuda")
    assert cuda.device.type == "cuda" and next(cuda.model.parameters()).is_cuda
    before = torch.cuda.get_rng_state(cuda.device)
    cuda.train(training_set, None, stop_step=3, workers=2)
    assert torch.equal(before, torch.cuda.get_rng_state(cuda.device))  # no RNG state to save
    info = json.loads((run / "run.json").read_text())
    assert info["device"] == "cuda" and "cuda:0" in info["machine"]
    _, card = load_checkpoint(run / "last.safetensors")  # on the CPU
    assert card["steps"] == 3 and "cuda" in card["machine"]

    on_cpu = Trainer.resume(run, "cpu")
    assert on_cpu.step == 3 and _states_equal(cuda, on_cpu)
    assert all(not p.is_cuda for p in on_cpu.model.parameters())
    assert all(not v.is_cuda for e in on_cpu.optimizer.state.values() for v in e.values())
    on_cpu.train(training_set, None, stop_step=4)
    back = Trainer.resume(run)  # the recorded device is now cpu; back to CUDA explicitly
    assert back.device.type == "cpu"
    back = Trainer.resume(run, "cuda")
    back.train(training_set, None)
    assert back.step == 6

    cpu_run = Trainer(tmp_path / "cpu", recipe, spec, device="cpu")  # the same batches
    cpu_run.train(training_set, None, stop_step=3)
    cuda_losses = [e["loss"] for e in _log(run)][:3]
    cpu_losses = [e["loss"] for e in _log(tmp_path / "cpu")]
    assert cuda_losses == pytest.approx(cpu_losses, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Task weights
# ---------------------------------------------------------------------------------------------


def _labels(spec: DataSpec, steps: range, **overrides: object) -> list[str]:
    # synth_ratio 0: rain and haze come from the real pairs (fast); snow has none, so synthesized
    training_set = TrainingSet(spec, _recipe(batch=16, synth_ratio=0.0, **overrides))
    return [CLASSES[i] for step in steps for i in training_set.batch(step)[2].tolist()]


def test_task_weights_choose_how_often_each_weather_is_drawn(data_root: Path) -> None:
    spec = _spec(data_root)
    only_haze = _labels(spec, range(4), task_weights=(0.0, 0.0, 1.0))
    assert set(only_haze) == {"clean", "haze"} and only_haze.count("haze") > 48
    only_rain = _labels(spec, range(4), task_weights=(5.0, 0.0, 0.0))
    assert set(only_rain) == {"clean", "rain"}
    # 3:1 rain to haze, no snow: over 480 samples (~430 weather) the share is near 0.75
    leaning = _labels(spec, range(30), task_weights=(3.0, 0.0, 1.0))
    rain, haze = leaning.count("rain"), leaning.count("haze")
    assert leaning.count("snow") == 0 and 0.68 < rain / (rain + haze) < 0.82


def test_equal_task_weights_draw_exactly_as_before(data_root: Path) -> None:
    """Any equal weights take the uniform draw of runs made before the option, so those runs
    resume on the same batches."""
    spec = _spec(data_root)
    a = TrainingSet(spec, _recipe(batch=6)).batch(5)
    b = TrainingSet(spec, _recipe(batch=6, task_weights=(2.5, 2.5, 2.5))).batch(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(_labels(spec, range(6))) == {"clean", "rain", "snow", "haze"}


@pytest.fixture(scope="module")
def two_rain_sets(crop_data: Callable[..., Path]) -> Path:
    """rain/big: three pairs; rain/small: one (a folder of sets, as the shared rain folder)."""
    files = [(f"rain/Rain13K-subset/{d}/{i}.jpg", f"rain/big/{d}/{i}.png")
             for i in (1, 2, 3) for d in ("input", "target")]  # fmt: skip
    files += [(f"rain/DDN-samples/{d}/{name}", f"rain/small/{d}/s.png")
              for d, name in (("input", "1.jpg"), ("target", "1.jpg"))]  # fmt: skip
    files += [("clean/CBSD68/101085.png", "clean/c1.png")]
    return crop_data(files, {})


def test_veils_mists_and_dense_fog_draw_over_the_weather_when_asked(data_root: Path) -> None:
    """--rain-veil lays a veil from RAIN_VEIL over the synthesized rain, --rain-mist one from
    DAYLIT_MIST above the scene's grey level, --dense-fog draws haze as fog of even depth from
    DENSE_FOG, --haze-mist (drawn after it) as DAYLIT_MIST alone; off, the crops are the weather
    drawn before them."""
    spec = _spec(data_root)
    crop = TrainingSet(spec, _recipe()).clean[0][:, :32, :32].float() / 255

    def drawn(task: str, seed: int, **options: float) -> torch.Tensor:
        training_set = TrainingSet(spec, _recipe(**options))
        return training_set._synthesize(crop, task, 1.0, np.random.default_rng(seed))

    for seed in range(4):
        rng = np.random.default_rng(seed)
        rain = synthesize(crop, "rain", int(rng.integers(0, 2**62)))[0].clamp(0, 1)
        assert torch.equal(drawn("rain", seed), rain)  # off: the rain of earlier runs
        rng.random()  # the option's draw
        veiled = apply_veil(rain, sample_veil_params(rng, RAIN_VEIL)).clamp(0, 1)
        assert torch.equal(drawn("rain", seed, rain_veil=1.0), veiled)
        assert not torch.equal(veiled, rain)
        fog = drawn("haze", seed, dense_fog=1.0)
        t = np.polyfit(crop.flatten().numpy(), fog.flatten().numpy(), 1)[0]
        assert DENSE_FOG.transmission[0] - 1e-3 <= t <= DENSE_FOG.transmission[1] + 1e-3
        assert torch.equal(drawn("haze", seed, rain_veil=1.0), drawn("haze", seed))
        rng = np.random.default_rng(seed)
        rng.integers(0, 2**62)
        rng.random()  # the option's draw
        misted = apply_veil(rain, sample_veil_params(rng, DAYLIT_MIST, float(crop.mean())))
        assert torch.equal(drawn("rain", seed, rain_mist=1.0), misted.clamp(0, 1))
        assert not torch.equal(misted, rain) and misted.mean() > crop.mean() + 0.01
        assert torch.equal(drawn("rain", seed, haze_mist=1.0), rain)
        for fog_share in (0.0, 0.5):  # the mist's draw follows --dense-fog's when that is on
            rng = np.random.default_rng(seed)
            if fog_share and rng.random() < fog_share:
                continue  # dense fog taken, as above
            rng.random()  # the option's draw
            mist = apply_veil(crop, sample_veil_params(rng, DAYLIT_MIST, float(crop.mean())))
            assert torch.equal(drawn("haze", seed, dense_fog=fog_share, haze_mist=1.0), mist)
            t, offset = np.polyfit(crop.flatten().numpy(), mist.flatten().numpy(), 1)
            assert DAYLIT_MIST.transmission[0] - 1e-3 <= t <= DAYLIT_MIST.transmission[1] + 1e-3
            assert offset / (1 - t) > float(crop.mean())  # A above the scene: it brightens
    with pytest.raises(TrainingError, match=r"rain veil must be in \[0, 1\]; got -0.1"):
        _recipe(rain_veil=-0.1)
    with pytest.raises(TrainingError, match=r"haze mist must be in \[0, 1\]; got 2"):
        _recipe(haze_mist=2)


def test_haze_dim_lays_synthesized_haze_on_a_dimmed_crop_when_asked(data_root: Path) -> None:
    """--haze-dim scales the clean crop (the target) by an exposure from DIM_SCENE before the
    haze is drawn on it; the crop, and every draw of another weather, stay those of before."""
    spec = _spec(data_root)

    def drawn(seed: int, weights: tuple[float, float, float], **options: float) -> tuple:
        recipe = _recipe(clean_ratio=0.0, synth_ratio=1.0, task_weights=weights, **options)
        return TrainingSet(spec, recipe)._sample(np.random.default_rng(seed))

    haze = (0.0, 0.0, 1.0)
    for seed in range(4):
        bright = drawn(seed, haze)[1]
        veiled, dim, label, task = drawn(seed, haze, haze_dim=1)
        factor = float(dim.sum() / bright.sum())
        assert DIM_SCENE[0] <= factor <= DIM_SCENE[1]
        torch.testing.assert_close(dim, bright * factor)  # the same crop, dimmed
        assert label == task == CLASSES.index("haze")
        assert veiled.mean() > dim.mean() + 0.02  # the bright haze is on the dim crop
        rain, rain_with_option = drawn(seed, (1.0, 0.0, 0.0)), drawn(seed, (1, 0, 0), haze_dim=1)
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                   for a, b in zip(rain, rain_with_option, strict=True))  # fmt: skip
    with pytest.raises(TrainingError, match=r"haze dim must be in \[0, 1\]; got 1.5"):
        _recipe(haze_dim=1.5)


def test_source_balance_draws_each_set_evenly_when_asked(two_rain_sets: Path) -> None:
    spec = DataSpec(paired={"rain": [str(two_rain_sets / "rain")]},
                    clean=[str(two_rain_sets / "clean")])  # fmt: skip

    def small_share(balance: float) -> float:
        training_set = TrainingSet(spec, _recipe(source_balance=balance))
        assert training_set.sources["rain"] == [[0, 1, 2], [3]]  # big, then small
        rng = np.random.default_rng(0)
        return np.mean([training_set._real_index("rain", rng) == 3 for _ in range(4000)])

    assert small_share(0.0) == pytest.approx(0.25, abs=0.03)  # one pair of four
    assert small_share(1.0) == pytest.approx(0.5, abs=0.03)  # one set of two
    assert small_share(0.5) == pytest.approx(0.375, abs=0.03)
    # without the option, the draw is the one runs made before it: one integer per pair drawn
    training_set = TrainingSet(spec, _recipe())
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [training_set._real_index("rain", a) for _ in range(50)] == [
        int(b.integers(4)) for _ in range(50)
    ]
    with pytest.raises(TrainingError, match=r"source balance must be in \[0, 1\]; got 1.5"):
        _recipe(source_balance=1.5)


def test_transplanted_rain_is_drawn_only_when_asked(data_root: Path) -> None:
    plain = _spec(data_root)
    with_layers = dataclasses.replace(plain, rain_layers=[str(data_root / "rain")])
    # layers loaded but ratio 0: the batches of a run without them, draw for draw
    a = TrainingSet(plain, _recipe(batch=6)).batch(3)
    b = TrainingSet(with_layers, _recipe(batch=6)).batch(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # ratio 1, synthesized rain only: every rain sample is a target under the pairs' rain layer
    recipe = _recipe(batch=16, synth_ratio=1.0, clean_ratio=0.0, task_weights=(1.0, 0.0, 0.0),
                     transplant_ratio=1.0)  # fmt: skip
    training_set = TrainingSet(with_layers, recipe)
    assert training_set.counts()["rain_layers"] == 2
    degraded, target, labels, tasks = training_set.batch(0)
    assert set(labels.tolist()) == {CLASSES.index("rain")} and torch.equal(tasks, labels)
    assert (degraded >= target - 1e-6).all()  # rain only brightens
    assert float((degraded - target).mean()) > 0.01
    again = TrainingSet(with_layers, recipe).batch(0)
    assert torch.equal(again[0], degraded)


def test_clean_crops_under_a_weather_task_are_drawn_only_when_asked(data_root: Path) -> None:
    spec = _spec(data_root)
    # share 0: the batches of a run made before the option, draw for draw
    a = TrainingSet(spec, _recipe(batch=6)).batch(4)
    b = TrainingSet(spec, _recipe(batch=6, clean_under_weather=0.0)).batch(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(a[3], a[2])  # every crop is shown under its own class
    # clean crops only, all under a weather: labelled clean (the head's target), shown as rain
    # or haze (the weights), and their target is the crop itself
    recipe = _recipe(batch=16, clean_ratio=1.0, clean_under_weather=1.0,
                     task_weights=(1.0, 0.0, 1.0))  # fmt: skip
    degraded, target, labels, tasks = TrainingSet(spec, recipe).batch(0)
    assert set(labels.tolist()) == {CLASSES.index("clean")}
    assert set(tasks.tolist()) == {CLASSES.index("rain"), CLASSES.index("haze")}
    assert torch.equal(degraded, target)
    # half of them: some crops keep the clean task, some take a weather's
    _, _, labels, tasks = TrainingSet(spec, _recipe(batch=32, clean_ratio=1.0,
                                                    clean_under_weather=0.5)).batch(1)  # fmt: skip
    shown = tasks.tolist()
    assert set(labels.tolist()) == {0} and 0 in shown and set(shown) - {0}
    with pytest.raises(TrainingError, match=r"clean under weather must be in \[0, 1\]; got -0.1"):
        _recipe(clean_under_weather=-0.1)


def test_transplant_without_layers_is_refused(data_root: Path) -> None:
    with pytest.raises(TrainingError, match="needs rain-layer folders with pairs"):
        TrainingSet(_spec(data_root), _recipe(transplant_ratio=0.5))
    with pytest.raises(TrainingError, match=r"transplant ratio must be in \[0, 1\]; got 1.5"):
        _recipe(transplant_ratio=1.5)


@pytest.mark.parametrize("weights", [(0.0, 0.0, 0.0), (1.0, -1.0, 1.0), (1.0, math.nan, 1.0)])
def test_bad_task_weights_are_refused(weights: tuple[float, float, float]) -> None:
    with pytest.raises(TrainingError, match=r"task weights must be three finite numbers >= 0"):
        Recipe(task_weights=weights)


# ---------------------------------------------------------------------------------------------
# Run directory and validation
# ---------------------------------------------------------------------------------------------


def test_run_directory_and_validation(tmp_path: Path, data_root: Path) -> None:
    recipe, spec = _recipe(steps=4, val_every=2), _spec(data_root, split=True)
    training_set = TrainingSet(spec, recipe)
    assert training_set.counts() == {"rain": 1, "haze": 1, "clean": 2}
    validation = ValidationSet.from_split(data_root / "split.json", data_root)
    tasks = [task for task, *_ in validation.items]
    assert sorted(tasks) == ["clean", "haze", "rain", "snow"]  # snow: synthesized from clean

    run = tmp_path / "run"
    trainer = Trainer(run, recipe, spec)
    trainer.train(training_set, validation, keep_validated=True)

    assert {p.name for p in run.iterdir()} >= {
        "run.json", "state", "log.jsonl", "last.safetensors", "last.json",
        "best.safetensors", "best.json",
    }  # fmt: skip
    assert {p.name for p in (run / "state").iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "trainer.json",
    }  # fmt: skip
    info = json.loads((run / "run.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(dataclasses.asdict(recipe)))
    assert info["data"] == dataclasses.asdict(spec)
    assert info["counts"] == training_set.counts()
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == 4

    last = json.loads((run / "last.json").read_text())
    assert last["steps"] == 4
    assert last["recipe"] == info["recipe"] and last["data"] == info["data"]
    assert isinstance(last["wall_time_hours"], float) and last["wall_time_hours"] >= 0
    assert last["config"]["width"] == 8  # the tiny preset
    model, card = load_checkpoint(run / "last.safetensors")
    assert card["steps"] == 4
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)

    log = _log(run)
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all({"charbonnier", "edge", "fft", "ce", "lr"} <= e.keys() for e in steps)
    validations = [e for e in log if "validation" in e]
    assert [e["step"] for e in validations] == [2, 4]
    for entry in validations:
        metrics = entry["validation"]
        for task in ("rain", "haze", "snow", "clean"):
            assert metrics[task]["n"] == 1
            assert {"psnr", "ssim", "in_psnr", "in_ssim", "acc"} <= metrics[task].keys()
        assert math.isfinite(metrics["mean_gain"])
        assert 0.0 <= metrics["head_accuracy"] <= 1.0
        # per source set, with the weather left where there is weather to leave
        sources = metrics["sources"]
        assert set(sources) == {"rain/rain", "haze/haze", "snow/synthetic", "clean/clean"}
        assert sources["rain/rain"]["left"] >= 0.0 and sources["clean/clean"]["left"] is None
        assert sources["rain/rain"]["psnr"] == metrics["rain"]["psnr"]  # its only pair
    # and a contact sheet per validation: a row (label, then input | output | target) per source
    sheets = sorted(p.name for p in (run / "contact").iterdir())
    assert sheets == ["step-000002.jpg", "step-000004.jpg"]
    with Image.open(run / "contact" / sheets[0]) as sheet:
        assert sheet.size[1] == 4 * (LABEL + CROP) and sheet.size[0] >= 3 * 46
    best = json.loads((run / "best.json").read_text())
    assert best["steps"] in (2, 4)
    best_val = next(e["validation"] for e in validations if e["step"] == best["steps"])
    assert best["validation"]["mean_gain"] == best_val["mean_gain"]
    assert best_val["mean_gain"] == max(e["validation"]["mean_gain"] for e in validations)
    load_checkpoint(run / "best.safetensors")
    # keep_validated: every validation's weights with its card; the last ones are last.*
    kept = sorted(p.name for p in (run / "validated").glob("*.safetensors"))
    assert kept == ["step-000002.safetensors", "step-000004.safetensors"]
    for entry in validations:
        _, card = load_checkpoint(run / "validated" / f"step-{entry['step']:06d}.safetensors")
        assert card["steps"] == entry["step"] and card["validation"] == entry["validation"]
    at_4, _ = load_checkpoint(run / "validated" / "step-000004.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in at_4.state_dict().items())


def test_validation_restores_clean_photos_under_a_weather_task(data_root: Path) -> None:
    """`clean_under_weather`: the split's one clean photo, under rain's task (the first of the
    turn), scored as the 8-bit file against the photo itself."""
    validation = ValidationSet.from_split(data_root / "split.json", data_root)
    torch.manual_seed(0)
    model = OPIR(OPIRConfig.from_name("tiny"))
    with torch.no_grad():  # far from the init, which returns any photo as it is
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    under = evaluate(model, validation)["clean_under_weather"]
    ((_, _, photo, target),) = [item for item in validation.items if item[0] == "clean"]
    padded, size = pad_to_multiple(photo[None].float(), model.multiple_of)
    rain = F.one_hot(torch.tensor([CLASSES.index("rain")]), len(CLASSES)).float()
    with torch.no_grad():
        out = crop_to(model(padded, rain).restored, size)[0].clamp(0, 1)
    expected = psnr((out * 255).round() / 255, target.float())
    assert math.isfinite(expected)
    assert under["n"] == 1 and under["unchanged"] == 0.0
    assert under["per_task"] == {"rain": pytest.approx(expected)}
    assert under["psnr"] == pytest.approx(expected) == under["min_psnr"]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _flat(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _train_args(run: Path, root: Path) -> list[str]:
    return ["train", "--out", str(run), "--config", "tiny", "--data", f"rain={root / 'rain'}",
            "--data", f"haze={root / 'haze'}", "--clean", str(root / "clean"), "--steps", "4",
            "--batch", "2", "--patch", "32"]  # fmt: skip


@pytest.mark.slow  # a fresh process imports torch twice: about 20-30 s
@pytest.mark.skipif(
    not OPIR_SCRIPT.is_file(), reason=f"console script not installed: {OPIR_SCRIPT}"
)
def test_cli_train_then_resume(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def opir(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(OPIR_SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    started = opir(*_train_args(run, data_root), "--stop-at", "2", "--task-weight", "rain=2",
                   "--task-weight", "snow=0.5", "--max-side", "48")  # fmt: skip
    assert started.returncode == 0, started.stderr
    recipe = json.loads((run / "run.json").read_text())["recipe"]
    assert recipe["task_weights"] == [2.0, 0.5, 1.0] and recipe["max_side"] == 48
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == 2
    assert "stopped at step 2" in _flat(started.stderr)

    resumed = opir("train", "--out", str(run), "--resume", "--stop-at", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == 3
    assert json.loads((run / "run.json").read_text())["recipe"]["config"] == "tiny"
    assert Trainer.resume(run).recipe.task_weights == (2.0, 0.5, 1.0)
    assert json.loads((run / "run.json").read_text())["recipe_changes"] == []

    # the sampling options given on a resume change the draw from that step on, on record
    changed = opir("train", "--out", str(run), "--resume", "--clean-under-weather", "0.25",
                   "--task-weight", "haze=3")  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["recipe"]["clean_under_weather"] == 0.25
    assert info["recipe"]["task_weights"] == [1.0, 1.0, 3.0]
    record = [{"step": 3, "clean_under_weather": 0.25, "task_weights": [1.0, 1.0, 3.0],
               "was": {"clean_under_weather": 0.0, "task_weights": [2.0, 0.5, 1.0]}}]  # fmt: skip
    assert info["recipe_changes"] == record
    card = load_checkpoint(run / "last.safetensors")[1]
    assert card["steps"] == 4 and card["recipe_changes"] == record
    assert json.loads((run / "last.json").read_text())["steps"] == 4


def _last_logged_step(run: Path) -> int:
    """The last step in the run's log.jsonl so far (0 before the first)."""
    if not (run / "log.jsonl").exists():
        return 0
    lines = (run / "log.jsonl").read_text().splitlines()
    # a line still being written does not end the JSON object yet
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


@pytest.mark.slow  # a fresh process imports torch twice: about 20-30 s
@pytest.mark.skipif(
    not OPIR_SCRIPT.is_file(), reason=f"console script not installed: {OPIR_SCRIPT}"
)
def test_cli_ctrl_c_stops_at_a_step_boundary_and_resumes(tmp_path: Path, data_root: Path) -> None:
    """SIGINT mid-run, sent once the run has logged step 25 (the CLI's log interval): the step
    in progress finishes, everything is saved at that step, exit 0, and --resume carries on
    from it."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = [*_train_args(run, data_root)]
    args[args.index("--steps") + 1] = "100000"
    logged = Recipe().log_every
    with open(tmp_path / "stderr.txt", "w+") as stderr_file:  # a pipe left unread could fill
        proc = subprocess.Popen(
            [str(OPIR_SCRIPT), *args], env=env, cwd=tmp_path, stderr=stderr_file, text=True
        )
        try:
            deadline = time.monotonic() + 300
            while _last_logged_step(run) < logged:
                assert proc.poll() is None, "the run ended before it was interrupted"
                assert time.monotonic() < deadline, f"step {logged} not logged in 300 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr_file.seek(0)
        stderr = stderr_file.read()
    assert proc.returncode == 0, stderr
    assert "stopping after this step" in _flat(stderr)
    step = json.loads((run / "state" / "trainer.json").read_text())["step"]
    assert logged <= step < 100000
    assert json.loads((run / "last.json").read_text())["steps"] == step
    assert f"stopped at step {step}" in _flat(stderr)
    resumed = subprocess.run(
        [str(OPIR_SCRIPT), "train", "--out", str(run), "--resume", "--stop-at", str(step + 2)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == step + 2


def test_cli_train_then_resume_on_an_explicit_cpu(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [*_train_args(run, data_root), "--stop-at", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["device"] == "auto"  # the default
    resumed = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    assert "step 2 of 4 on cpu" in _flat(resumed.output)
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == 4
    assert json.loads((run / "run.json").read_text())["device"] == "cpu"
    assert load_checkpoint(run / "last.safetensors")[1]["steps"] == 4


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", "unknown device 'gpu'"),
        ("meta", "training devices are auto, cpu, cuda or cuda:N, got 'meta'"),
    ]
    + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]),
)
def test_cli_bad_device_is_a_one_line_error(
    tmp_path: Path, data_root: Path, name: str, message: str
) -> None:
    result = CliRunner().invoke(app, [*_train_args(tmp_path / "run", data_root), "--device", name])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: --device: ") and message in result.output
    assert not (tmp_path / "run").exists()


def test_cli_refuses_to_overwrite_a_run(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    result = CliRunner().invoke(app, _train_args(run, data_root))
    assert result.exit_code == 2
    assert "already holds a run; pass --resume to continue it" in _flat(result.output)
    assert list((run / "state").iterdir()) == []


def test_cli_bad_data_tag_is_a_usage_error(tmp_path: Path, data_root: Path) -> None:
    args = _train_args(tmp_path / "run", data_root)
    args[args.index(f"rain={data_root / 'rain'}")] = f"fog={data_root / 'rain'}"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "Invalid value for --data" in out and "expected rain=DIR, snow=DIR or haze=DIR" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["fog=2", "rain=lots", "rain"])
def test_cli_bad_task_weight_is_a_usage_error(tmp_path: Path, data_root: Path, value: str) -> None:
    result = CliRunner().invoke(app, [*_train_args(tmp_path / "run", data_root),
                                      "--task-weight", value])  # fmt: skip
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "Invalid value for --task-weight" in out and f"'{value}': expected rain=W" in out
    assert not (tmp_path / "run").exists()


def test_cli_split_without_data_root(tmp_path: Path, data_root: Path) -> None:
    args = [*_train_args(tmp_path / "run", data_root), "--split", str(data_root / "split.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "a validation split needs --data-root" in _flat(result.output)


# ---------------------------------------------------------------------------------------------
# The validation split is never trained on
# ---------------------------------------------------------------------------------------------


def test_training_set_never_loads_validation_files(shared_data: Path) -> None:
    split = json.loads(SPLIT.read_text())["validation"]
    held_out = {name for names in split.values() for name in names}
    folders = {"rain": ["rain/Rain13K-subset", "rain/DDN-samples"], "haze": ["haze/HSTS-synthetic"]}
    spec = DataSpec(
        paired={task: [str(shared_data / f) for f in fs] for task, fs in folders.items()},
        clean=[str(shared_data / "clean" / "CBSD68")],
        split=str(SPLIT),
        data_root=str(shared_data),
    )
    training_set = TrainingSet(spec, Recipe(config="tiny", max_side=16))
    loaded = {str(p.relative_to(shared_data)) for p in training_set.paths}
    assert len(loaded) == len(training_set.paths)
    assert not loaded & held_out

    # the split does hold files of these folders, and exactly those (with their targets) are
    # the files on disk that were not loaded
    for folder in (*folders["rain"], *folders["haze"], "clean/CBSD68"):
        on_disk = {
            str(p.relative_to(shared_data))
            for p in (shared_data / folder).rglob("*")
            if p.suffix.lower() in {".png", ".jpg", ".jpeg"}
        }
        held = {n for n in held_out if n.startswith(folder + "/")}
        assert held, folder
        held_stems = {Path(n).stem for n in held}
        targets = {n for n in on_disk if "/target/" in n and Path(n).stem in held_stems}
        assert len(targets) == len(held) or folder.startswith("clean/"), folder
        assert on_disk - loaded == held | targets, folder
    held_rain = sum(n.startswith(tuple(f + "/" for f in folders["rain"])) for n in held_out)
    assert training_set.counts()["rain"] == 38 + 3 - held_rain
    assert len(training_set.clean) == 68 - len(
        [n for n in held_out if n.startswith("clean/CBSD68/")]
    )


def test_split_without_data_root_is_refused(data_root: Path) -> None:
    spec = _spec(data_root, split=True)
    spec.data_root = None
    with pytest.raises(TrainingError, match=r"split\.json: a validation split needs a data root"):
        TrainingSet(spec, _recipe())


# ---------------------------------------------------------------------------------------------
# Where weights came from: --init lineage, and the command that reproduces a run
# ---------------------------------------------------------------------------------------------


def test_init_records_the_weights_it_started_from(tmp_path: Path, data_root: Path) -> None:
    recipe, spec = _recipe(steps=2), _spec(data_root)
    training_set = TrainingSet(spec, recipe)
    first = Trainer(tmp_path / "first", recipe, spec)
    first.train(training_set, None)
    assert first.card(None)["init"] is None

    tuned_recipe = _recipe(steps=3, lr=1e-4, task_weights=(2.0, 1.0, 1.0))
    weights = tmp_path / "first" / "last.safetensors"
    second = Trainer(tmp_path / "second", tuned_recipe, spec, init=weights)
    second.train(training_set, None, stop_step=1)
    record = json.loads((tmp_path / "second" / "run.json").read_text())["init"]
    assert record["weights"] == str(weights) and record["steps"] == 2 and record["init"] is None
    assert record["recipe"] == json.loads(json.dumps(dataclasses.asdict(recipe)))
    assert record["data"] == dataclasses.asdict(spec)

    resumed = Trainer.resume(tmp_path / "second")  # the record survives a resume
    resumed.train(training_set, None)
    _, card = load_checkpoint(tmp_path / "second" / "last.safetensors")
    assert card["init"] == record and card["steps"] == 3

    third = Trainer(tmp_path / "third", _recipe(steps=1), spec,
                    init=tmp_path / "second" / "last.safetensors")  # fmt: skip
    third.train(training_set, None)
    stages = lineage(load_checkpoint(tmp_path / "third" / "last.safetensors")[1])
    assert [s["steps"] for s in stages] == [2, 3, 1]
    assert [s["init_weights"] for s in stages] == [
        None, str(weights), str(tmp_path / "second" / "last.safetensors"),
    ]  # fmt: skip
    assert stages[1]["recipe"]["task_weights"] == [2.0, 1.0, 1.0]


def test_train_command_reproduces_the_recipe(tmp_path: Path, data_root: Path) -> None:
    """The card's `reproduce` command, run through the CLI, makes a run with the same recipe,
    data and init."""
    first = Trainer(tmp_path / "first", _recipe(steps=1), _spec(data_root))
    first.train(TrainingSet(_spec(data_root), first.recipe), None)
    init = str(tmp_path / "first" / "last.safetensors")
    recipe = Recipe(config="tiny", steps=2, batch=2, patch=32, lr=1.5e-4, synth_ratio=0.45,
                    clean_ratio=0.2, task_weights=(2.0, 1.0, 0.5), max_side=48, seed=5,
                    val_every=7, precision="bf16", source_balance=0.5, rain_veil=0.3,
                    rain_mist=0.25, dense_fog=0.2, haze_dim=0.3)  # fmt: skip
    spec = _spec(data_root, split=True)
    command = train_command(recipe, spec, init, out="RUN")
    assert "DATA/rain" in command and str(data_root) not in command  # the root is an alias
    assert "--task-weight rain=2.0" in command and "--task-weight snow" not in command
    args = [str(data_root) + a[4:] if a.startswith("DATA") else a for a in shlex.split(command)]
    args = [str(tmp_path / "again") if a == "RUN" else a for a in args]
    args = [a.replace("=DATA", f"={data_root}") for a in args]
    result = CliRunner().invoke(app, args[1:])  # without the leading `opir`
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "again" / "run.json").read_text())
    assert Recipe.from_dict(info["recipe"]) == recipe
    assert DataSpec(**info["data"]) == spec
    assert info["init"]["weights"] == init and info["init"]["steps"] == 1


def test_ship_weights_names_every_stages_folders_under_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent stage that recorded its folders absolute, as a working directory joined to the
    relative root (`/work/main/../shared/data/rain`), gets its reproduce line under DATA, as
    the last stage does."""
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "ship_weights.py"
    spec = importlib.util.spec_from_file_location("ship_weights", script)
    assert spec is not None and spec.loader is not None
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")

    def data(root: str) -> dict:
        folders = {"paired": {"rain": [f"{root}/rain"]}, "clean": [f"{root}/clean"]}
        return {**folders, "rain_layers": [f"{root}/rain"], "split": "s.json",
                "data_root": "../data"}  # fmt: skip

    stage = {"steps": 5, "wall_time_hours": 0.1, "recipe": dataclasses.asdict(Recipe())}
    parent = {**stage, "data": data(f"{tmp_path}/repo/../data")}
    card = {**stage, "data": data("../data"), "init": {"weights": "p.safetensors", **parent}}
    stages = ship.training_stages(card)
    commands = [train_command(Recipe.from_dict(s["recipe"]), DataSpec(**s["data"]),
                              s["init_weights"]) for s in stages]  # fmt: skip
    for command in commands:
        assert "--data rain=DATA/rain --clean DATA/clean --rain-layers DATA/rain" in command
        assert str(tmp_path) not in command
    assert "--init p.safetensors" in commands[1]


def test_train_command_replays_the_changes_made_on_resume(tmp_path: Path, data_root: Path) -> None:
    """A run changed on resume is reproduced as its start, stopped at each change and resumed
    with it: the commands, run through the CLI, end with the same recipe and record."""
    spec = dataclasses.replace(_spec(data_root), rain_layers=[str(data_root / "rain")])
    recipe = _recipe(steps=3, task_weights=(2.0, 1.0, 1.0), transplant_ratio=0.5)
    Trainer(tmp_path / "run", recipe, spec).train(TrainingSet(spec, recipe), None, stop_step=1)
    changes = {"clean_under_weather": 0.5, "task_weights": [1.0, 1.0, 1.0], "ema": 0.9,
               "precision": "bf16"}  # fmt: skip
    resumed = Trainer.resume(tmp_path / "run", changes=changes)
    resumed.train(TrainingSet(spec, resumed.recipe), None, stop_step=2)
    resumed = Trainer.resume(tmp_path / "run", changes={"clean_ratio": 0.3})
    resumed.train(TrainingSet(spec, resumed.recipe), None)
    card = load_checkpoint(tmp_path / "run" / "last.safetensors")[1]
    command = train_command(Recipe.from_dict(card["recipe"]), DataSpec(**card["data"]),
                            out="RUN", changes=card["recipe_changes"])  # fmt: skip
    parts = command.split(" && ")
    assert len(parts) == 3 and "--stop-at 1" in parts[0] and "--stop-at 2" in parts[1]
    assert "--transplant-ratio 0.5" in parts[0] and "--clean-under-weather" not in parts[0]
    assert "--task-weight rain=1.0 --task-weight snow=1.0 --task-weight haze=1.0" in parts[1]
    assert parts[2] == "opir train --out RUN --resume --clean-ratio 0.3"
    for part in parts:
        args = [a.replace("DATA", str(data_root)) for a in shlex.split(part)]
        args = [str(tmp_path / "again") if a == "RUN" else a for a in args]
        result = CliRunner().invoke(app, args[1:])
        assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    first = json.loads((tmp_path / "run" / "run.json").read_text())
    logging = ("ckpt_every", "log_every")  # not options of `opir train`
    assert {k: v for k, v in again["recipe"].items() if k not in logging} == {
        k: v for k, v in first["recipe"].items() if k not in logging
    }
    assert again["data"] == first["data"]
    assert again["recipe_changes"] == first["recipe_changes"]
    assert json.loads((tmp_path / "again" / "state" / "trainer.json").read_text())["step"] == 3
