"""`opir eval`, the classical baselines and `opir synth`, on real photos read in place."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from typer.testing import CliRunner

from opir_engine.cli.app import app
from opir_engine.evaluation.baselines import dehaze_dark_channel, median_filter
from opir_engine.evaluation.scoring import (
    EvaluationError,
    evaluate_clean_under_weather,
    evaluate_engine,
    evaluate_folders,
    row_groups,
    row_order,
    rows_to_card,
    set_psnr,
    source_set,
)


@pytest.fixture(scope="module")
def rain(shared_data: Path) -> Path:
    """Rain13K's paired sample folder (input/, target/) in the shared data."""
    return shared_data / "rain" / "Rain13K-subset"


def _load(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture()
def folders(tmp_path: Path, rain: Path) -> tuple[Path, Path, Path]:
    """restored/ (targets plus seeded noise, saved as PNG), target/, input/ for three real pairs."""
    restored, target, degraded = (tmp_path / n for n in ("restored", "target", "input"))
    for folder in (restored, target, degraded):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("1", "10", "11"):
        tgt = _load(rain / "target" / f"{stem}.jpg")
        Image.fromarray(tgt).save(target / f"{stem}.png")
        shutil.copy(rain / "input" / f"{stem}.jpg", degraded / f"{stem}.jpg")
        noisy = np.clip(tgt.astype(int) + rng.integers(-6, 7, tgt.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(restored / f"{stem}.png")
    return restored, target, degraded


def test_evaluate_folders_matches_scikit_image(folders):
    restored, target, degraded = folders
    scores = evaluate_folders(restored, target, degraded)
    assert [s.name for s in scores] == ["1", "10", "11"]
    for s in scores:
        out, tgt = _load(restored / f"{s.name}.png"), _load(target / f"{s.name}.png")
        inp = _load(degraded / f"{s.name}.jpg")
        assert s.psnr == pytest.approx(peak_signal_noise_ratio(tgt, out, data_range=255), abs=1e-6)
        ref_ssim = structural_similarity(
            tgt, out, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        assert s.ssim == pytest.approx(ref_ssim, abs=1e-6)
        assert s.input_psnr == pytest.approx(peak_signal_noise_ratio(tgt, inp, data_range=255))


def test_evaluate_folders_y_channel_differs_from_rgb(folders):
    restored, target, _ = folders
    rgb = evaluate_folders(restored, target)
    y = evaluate_folders(restored, target, y_channel=True)
    # Y averages the channels' independent noise: higher PSNR than RGB.
    assert all(sy.psnr > sr.psnr + 1.0 for sy, sr in zip(y, rgb, strict=True))


def test_evaluate_folders_unmatched_stem_is_an_error(folders):
    restored, target, _ = folders
    (restored / "10.png").rename(restored / "99.png")
    with pytest.raises(EvaluationError, match="unmatched stems: 10, 99"):
        evaluate_folders(restored, target)


def test_eval_cli_prints_means_and_writes_csv(folders, tmp_path):
    restored, target, degraded = folders
    csv_path = tmp_path / "scores.csv"
    result = CliRunner().invoke(
        app, ["eval", str(restored), str(target), "--input", str(degraded), "--csv", str(csv_path)]
    )
    assert result.exit_code == 0, result.output
    assert "mean" in result.output
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("name,psnr,ssim,input_psnr")
    assert len(lines) == 4
    expected = evaluate_folders(restored, target)[0].psnr
    assert float(lines[1].split(",")[1]) == pytest.approx(expected)


def test_eval_cli_without_folders_or_weights_is_usage_error():
    result = CliRunner().invoke(app, ["eval"])
    assert result.exit_code == 2
    assert "RESTORED_DIR TARGET_DIR" in result.output


def test_dark_channel_prior_removes_synthetic_haze(rain):
    """Haze made with Eq. 4 from a real photo (constant t, grey A): the DCP recovers most of it."""
    clean = torch.from_numpy(_load(rain / "target" / "1.jpg")).permute(2, 0, 1).float() / 255
    t, airlight = 0.5, torch.tensor([0.85, 0.85, 0.85]).view(3, 1, 1)
    hazy = clean * t + airlight * (1 - t)
    restored = dehaze_dark_channel(hazy)
    err_in = (hazy - clean).abs().mean()
    err_out = (restored - clean).abs().mean()
    # The prior assumes dark pixels in every patch; this photo has bright flat areas, so it gets
    # about 58% of the way (measured 0.212 -> 0.123), not all of it.
    assert err_out < 0.65 * err_in


def test_median_filter_removes_isolated_streak_pixels():
    image = torch.full((3, 20, 20), 0.3)
    streaky = image.clone()
    streaky[:, 5, 5] = 1.0
    streaky[:, 12, 3] = 1.0
    assert torch.equal(median_filter(streaky), image)


def _expected_psnr(target: np.ndarray, output: np.ndarray) -> object:
    """scikit-image's PSNR of 8-bit (H, W, 3) arrays, as a row reports it: None when the
    output equals its target (an infinite PSNR leaves a task's mean)."""
    with np.errstate(divide="ignore"):
        value = peak_signal_noise_ratio(target, output, data_range=255)
    return pytest.approx(value, abs=1e-4) if math.isfinite(value) else None


def test_evaluate_engine_rows_and_card(tmp_path, rain):
    """A tiny model through the engine: one row per task, its figures those of the engine's
    output and decision computed here (scikit-image, `classify` and `auto_task`), a card entry."""
    from opir_engine.inference.engine import OPIREngine
    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.safetensors", OPIR(OPIRConfig.from_name("tiny")), {"name": "t"})
    engine = OPIREngine.from_pretrained(tmp_path / "t.safetensors", device="cpu", compile=False)
    pair = [_load(rain / d / "1.jpg")[:64, :80] for d in ("input", "target")]
    x, y = (torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in pair)
    items = [("rain", "a", x, y), ("haze", "b", x, y), ("clean", "c", y, y)]
    rows = evaluate_engine(engine, items)
    assert [r.task for r in rows] == ["rain", "haze", "clean"]
    assert all(r.n == 1 for r in rows)
    arrays = {"rain": pair, "haze": pair, "clean": [pair[1], pair[1]]}  # (degraded, target)
    for row, (task, _name, degraded, _target) in zip(rows, items, strict=True):
        assert row.head_accuracy == float(engine.auto_task(engine.classify(degraded)) == task)
        restored = engine.restore(degraded, task="auto").image  # as the user's 8-bit file holds it
        out = (restored * 255).round().byte().permute(1, 2, 0).numpy()
        inp, tgt = arrays[task]
        assert row.input_psnr == _expected_psnr(tgt, inp)
        assert row.psnr == _expected_psnr(tgt, out)
    assert rows[0].baseline == "median 5x5" and rows[1].baseline == "dark channel prior"
    assert rows[0].set_psnr == pytest.approx(rows[0].psnr)  # one image: its own PSNR
    assert rows[0].min_psnr == rows[0].psnr  # and its own worst
    card = rows_to_card(rows, y_channel=False)
    assert card["rain"]["gain"] == pytest.approx(rows[0].psnr - rows[0].input_psnr)
    assert card["clean"]["set_psnr"] == rows[2].set_psnr
    json.dumps(card)  # the card entry is plain JSON


def test_clean_photos_under_each_weather_task(tmp_path, rain):
    """`clean_under_weather`: every clean photo restored under rain, snow, haze in turn, scored
    against itself as the 8-bit file; its lowest PSNR is the worst of them. Weather items are
    not read; none clean, no row."""
    from opir_engine.inference.engine import OPIREngine
    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import save_checkpoint

    torch.manual_seed(0)
    model = OPIR(OPIRConfig.from_name("tiny"))
    torch.nn.init.normal_(model.kpn.ending.weight, std=0.01)  # not the identity it starts as
    save_checkpoint(tmp_path / "t.safetensors", model, {"name": "t"})
    engine = OPIREngine.from_pretrained(tmp_path / "t.safetensors", device="cpu", compile=False)
    photos = [
        torch.from_numpy(_load(rain / "target" / f"{stem}.jpg")[:48, :64]).permute(2, 0, 1) / 255
        for stem in ("1", "10", "1", "10")
    ]
    items = [("clean", f"c{i}", p, p) for i, p in enumerate(photos)]
    items.insert(1, ("rain", "r", photos[0], photos[1]))  # not a clean photo: not scored
    row, *per_task = evaluate_clean_under_weather(engine, items)
    expected = []
    for photo, task in zip(photos, ("rain", "snow", "haze", "rain"), strict=True):
        out = (engine.restore(photo, task=task).image * 255).round().byte().permute(1, 2, 0)
        target = (photo * 255).round().byte().permute(1, 2, 0).numpy()
        expected.append(peak_signal_noise_ratio(target, out.numpy(), data_range=255))
    assert all(math.isfinite(p) for p in expected)
    assert row.task == "clean_under_weather" and row.n == 4 and row.identical == 0.0
    assert row.psnr == pytest.approx(np.mean(expected))
    assert row.min_psnr == pytest.approx(min(expected))
    assert row.head_accuracy is None
    # and a row per task: rain's two photos, snow's and haze's one each
    assert [(r.task, r.n) for r in per_task] == [
        ("clean_under_weather/rain", 2), ("clean_under_weather/snow", 1),
        ("clean_under_weather/haze", 1),
    ]  # fmt: skip
    assert per_task[0].psnr == pytest.approx((expected[0] + expected[3]) / 2)
    assert per_task[2].min_psnr == pytest.approx(expected[2])
    assert evaluate_clean_under_weather(engine, items[1:2]) == []
    card = rows_to_card([row, *per_task], y_channel=False)
    assert card["clean_under_weather"]["min_psnr"] == row.min_psnr
    assert card["head_accuracy"] == 0.0  # a given task counts for no class's accuracy


def test_source_set_names_the_folder_of_each_item():
    assert source_set("rain/GT-RAIN-webcam/input/s003_r009.png") == "GT-RAIN-webcam"
    assert source_set("/data/haze/SOTS-indoor/input/1405_6.png") == "SOTS-indoor"
    assert source_set("clean/CBSD68/123074.png") == "CBSD68"
    assert source_set("synthetic:clean/CBSD68/123074.png") == "synthetic"


def test_per_set_rows_split_a_task_and_leave_its_row_and_accuracy_alone(tmp_path, rain):
    """Two rain sets: their rows follow the task's row, their sizes and PSNRs make up the
    task's own, and the card's head accuracy counts each image once."""
    from opir_engine.inference.engine import OPIREngine
    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.safetensors", OPIR(OPIRConfig.from_name("tiny")), {"name": "t"})
    engine = OPIREngine.from_pretrained(tmp_path / "t.safetensors", device="cpu", compile=False)
    items = []
    for stem, source in (("1", "A"), ("10", "A"), ("14", "B")):
        x, y = (torch.from_numpy(_load(rain / d / f"{stem}.jpg")[:48, :64]).permute(2, 0, 1)
                .float() / 255 for d in ("input", "target"))  # fmt: skip
        items.append(("rain", f"rain/{source}/input/{stem}.jpg", x, y))
    clean = items[0][3]
    items.append(("clean", "clean/C/1.jpg", clean, clean))
    plain = evaluate_engine(engine, items)
    rows = evaluate_engine(engine, items, per_set=True)
    assert [r.task for r in rows] == ["rain", "rain/A", "rain/B", "clean", "clean/C"]
    assert [r.n for r in rows] == [3, 2, 1, 1, 1]
    assert rows[0] == plain[0] and rows[3] == plain[1]
    assert rows[0].psnr == pytest.approx((2 * rows[1].psnr + rows[2].psnr) / 3)
    assert rows[0].baseline_psnr == pytest.approx(
        (2 * rows[1].baseline_psnr + rows[2].baseline_psnr) / 3
    )
    card = rows_to_card(rows, y_channel=False)
    assert card["head_accuracy"] == rows_to_card(plain, y_channel=False)["head_accuracy"]
    assert card["rain/B"]["n"] == 1


def test_an_item_outside_any_set_folder_counts_once_in_its_task_row():
    assert row_groups("rain", "rain/A/input/1.jpg", per_set=True) == [("rain", ""), ("rain", "A")]
    assert row_groups("rain", "1.jpg", per_set=True) == [("rain", "")]
    assert row_groups("rain", "rain/A/input/1.jpg", per_set=False) == [("rain", "")]
    keys = [("clean", ""), ("rain", "B"), ("snow_photos", ""), ("rain", ""), ("haze", "A")]
    assert sorted(keys, key=row_order) == [
        ("rain", ""), ("rain", "B"), ("haze", "A"), ("clean", ""), ("snow_photos", ""),
    ]  # fmt: skip


def test_per_set_rows_of_items_without_a_set_folder(tmp_path, rain):
    """`opir eval --per-set --data rain=DIR` on a folder of bare pairs: the task row counts
    each image once, the same row as without --per-set."""
    from opir_engine.inference.engine import OPIREngine
    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.safetensors", OPIR(OPIRConfig.from_name("tiny")), {"name": "t"})
    engine = OPIREngine.from_pretrained(tmp_path / "t.safetensors", device="cpu", compile=False)
    items = []
    for stem in ("1", "10"):
        x, y = (torch.from_numpy(_load(rain / d / f"{stem}.jpg")[:48, :64]).permute(2, 0, 1)
                .float() / 255 for d in ("input", "target"))  # fmt: skip
        items.append(("rain", f"{stem}.jpg", x, y))
    rows = evaluate_engine(engine, items, per_set=True, baselines=False)
    assert [(r.task, r.n) for r in rows] == [("rain", 2)]
    assert rows == evaluate_engine(engine, items, baselines=False)


def test_synth_cli_writes_pairs_and_parameters(tmp_path, rain):
    clean = tmp_path / "clean"
    clean.mkdir()
    for stem in ("1", "10"):
        Image.fromarray(_load(rain / "target" / f"{stem}.jpg")[:96, :128]).save(
            clean / f"{stem}.png"
        )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["synth", str(clean), str(out), "--kind", "mixed", "--count", "3", "--seed", "7"]
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "input").iterdir())) == 3 == len(list((out / "target").iterdir()))
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all("params" in r or "kind" in r for r in records)


def test_synth_cli_rejects_unknown_kind(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path), str(tmp_path / "o"), "--kind", "fog",
                                      "--count", "1"])  # fmt: skip
    assert result.exit_code == 2
    assert "--kind must be rain, snow, haze or mixed" in result.output


@pytest.mark.parametrize("radius", [1, 4, 12])
def test_box_filter_equals_average_pooling(radius):
    from opir_engine.evaluation.baselines import _box

    x = torch.rand(1, 2, 37, 45, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    expected = torch.nn.functional.avg_pool2d(padded, 2 * radius + 1, stride=1)
    torch.testing.assert_close(_box(x, radius), expected, atol=1e-12, rtol=0)


def test_set_psnr_pools_the_mse_by_hand():
    # 30 dB is an MSE of 1e-3 and 40 dB of 1e-4: their mean 5.5e-4 is 32.596 dB.
    assert set_psnr([30.0, 40.0]) == pytest.approx(-10 * math.log10(5.5e-4))
    assert set_psnr([30.0, 40.0]) == pytest.approx(32.5964, abs=1e-4)
    # An identical output adds an MSE of 0: nine identical and one at 30 dB give 40 dB.
    assert set_psnr([math.inf] * 9 + [30.0]) == pytest.approx(40.0)
    assert set_psnr([math.inf, math.inf]) == math.inf
    assert set_psnr([]) is None


def test_set_psnr_matches_psnr_of_the_stacked_images():
    """The set PSNR of same-sized images is the PSNR of the images side by side."""
    from opir_engine.evaluation.metrics import psnr

    gen = torch.Generator().manual_seed(0)
    targets = [torch.rand(3, 16, 24, generator=gen) for _ in range(3)]
    outputs = [(t + 0.05 * k * torch.randn(3, 16, 24, generator=gen)).clamp(0, 1)
               for k, t in enumerate(targets)]  # fmt: skip
    outputs[0] = targets[0].clone()  # one passed through unchanged
    per_image = [psnr(o, t) for o, t in zip(outputs, targets, strict=True)]
    together = psnr(torch.cat(outputs, dim=2), torch.cat(targets, dim=2))
    assert per_image[0] == math.inf
    assert set_psnr(per_image) == pytest.approx(together, rel=1e-6)


def test_eval_cli_with_weights_prints_and_writes_the_engines_table(tmp_path, rain):
    """`opir eval --weights W --data rain=DIR --json F`: the CLI's JSON holds the same figures
    as `evaluate_engine` run here on the same pairs with the same checkpoint."""
    from opir_engine.inference.engine import OPIREngine
    from opir_engine.model import OPIR, OPIRConfig
    from opir_engine.weights import save_checkpoint

    torch.manual_seed(0)
    weights = tmp_path / "t.safetensors"
    model = OPIR(OPIRConfig.from_name("tiny"))
    torch.nn.init.normal_(model.kpn.ending.weight, std=0.01)  # not the identity it starts as
    save_checkpoint(weights, model, {"name": "t"})
    pairs = tmp_path / "rain"
    items = []
    for stem in ("1", "10"):
        crops = []
        for side in ("input", "target"):
            (pairs / side).mkdir(parents=True, exist_ok=True)
            crop = _load(rain / side / f"{stem}.jpg")[:48, :72]
            Image.fromarray(crop).save(pairs / side / f"{stem}.png")
            crops.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 255)
        items.append(("rain", stem, *crops))
    out = tmp_path / "table.json"
    result = CliRunner().invoke(app, ["eval", "--weights", str(weights), "--data", f"rain={pairs}",
                                      "--device", "cpu", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rain" in result.output  # the table (rich wraps its headers at 80 columns)
    card = json.loads(out.read_text())
    engine = OPIREngine.from_pretrained(weights, device="cpu", compile=False)
    (row,) = evaluate_engine(engine, items)
    assert card["rain"]["n"] == 2
    for key in ("input_psnr", "psnr", "ssim", "baseline_psnr", "set_psnr", "head_accuracy"):
        assert card["rain"][key] == pytest.approx(getattr(row, key), abs=1e-9)
    # --per-set adds a row for the folder the pairs came from, here all of them
    args = ["eval", "--weights", str(weights), "--data", f"rain={pairs}", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--per-set"])
    assert result.exit_code == 0, result.output
    per_set = json.loads(out.read_text())
    assert per_set["rain/rain"]["n"] == 2
    assert per_set["rain/rain"]["psnr"] == pytest.approx(card["rain"]["psnr"], abs=1e-9)
    # --precision bf16 scores the engine as `opir restore --precision bf16` runs it: other
    # figures than fp32's, the same as a bf16 engine's here
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output
    bf16 = json.loads(out.read_text())
    engine = OPIREngine.from_pretrained(weights, device="cpu", precision="bf16", compile=False)
    (row,) = evaluate_engine(engine, items)
    assert bf16["rain"]["psnr"] == pytest.approx(row.psnr, abs=1e-9)
    assert bf16["rain"]["psnr"] != card["rain"]["psnr"]
    result = CliRunner().invoke(app, [*args, "--precision", "fp64"])
    assert result.exit_code == 2
    assert "precision must be auto, fp32, fp16 or bf16, got 'fp64'" in result.output


def test_eval_cli_split_needs_data_root(tmp_path):
    split = tmp_path / "split.json"
    split.write_text('{"validation": {}}')
    result = CliRunner().invoke(app, ["eval", "--weights", "w", "--split", str(split)])
    assert result.exit_code == 2
    assert "--split needs --data-root" in result.output
