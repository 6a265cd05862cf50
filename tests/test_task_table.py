"""The table of every held-out item under every task (`evaluation/task_table.py`, `opir eval
--every-task`): its rows against `evaluate_engine`, an oracle's and another classifier's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio
from typer.testing import CliRunner

from opir_engine.cli.app import app
from opir_engine.evaluation.scoring import TaskRow, evaluate_engine, evaluate_head
from opir_engine.evaluation.task_table import ORACLE, TaskTable, compare_rows, score_every_task
from opir_engine.inference.engine import OPIREngine
from opir_engine.model import OPIR, OPIRConfig
from opir_engine.weights import save_checkpoint


def _crop(path: Path, h: int = 48, w: int = 64) -> torch.Tensor:
    return (
        torch.from_numpy(np.array(Image.open(path).convert("RGB"))[:h, :w]).permute(2, 0, 1) / 255
    )


def _tiny(path: Path, seed: int, clean_threshold: float | None = None) -> Path:
    """A tiny model whose output depends on the task (its TAMs' output layers are not the
    identity they start as) and on the image (nor is the KPN's ending), its head leaning to
    clean; `clean_threshold` replaces the preset's."""
    torch.manual_seed(seed)
    config = OPIRConfig.from_name("tiny")
    if clean_threshold is not None:
        config = dataclasses.replace(config, clean_threshold=clean_threshold)
    model = OPIR(config)
    torch.nn.init.normal_(model.kpn.ending.weight, std=0.01)
    for tam in model.tams:
        torch.nn.init.normal_(tam.out.weight, std=0.5)
    with torch.no_grad():
        model.head.fc2.bias[0] += 2.0  # clean the likeliest class, by a little or a lot
    save_checkpoint(path, model, {"name": path.stem})
    return path


@pytest.fixture(scope="module")
def items(shared_data: Path) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """Real pairs of two rain sets and a haze set, and two clean photos (one of them a rain
    target: a photo every classifier here may call anything)."""
    rain = shared_data / "rain" / "Rain13K-subset"
    haze = shared_data / "haze" / "SOTS-indoor"
    out = []
    for stem, source in (("1", "A"), ("10", "A"), ("14", "B")):
        x, y = (_crop(rain / d / f"{stem}.jpg") for d in ("input", "target"))
        out.append(("rain", f"rain/{source}/input/{stem}.jpg", x, y))
    hazy = sorted((haze / "input").iterdir())[0]
    from opir_engine.datasets import pair_of

    pair = pair_of(hazy, "haze")
    out.append(("haze", "haze/H/input/a.png", _crop(pair.input), _crop(pair.target)))
    for k, stem in enumerate(("11", "22")):
        photo = _crop(rain / "target" / f"{stem}.jpg")
        out.append(("clean", f"clean/C/{k}.jpg", photo, photo))
    return out


def test_rows_under_auto_are_evaluate_engines(tmp_path, items, shared_data):
    """With no decisions given, each row (per task and per set) holds the figures
    `evaluate_engine` measures restoring with task auto, which mixes the tasks by the head's
    probabilities; the photos' rows hold `evaluate_head`'s accuracy. The threshold is set
    between the items' clean probabilities, so some pass through and some are restored."""
    probe = OPIREngine.from_pretrained(_tiny(tmp_path / "p.safetensors", 0), device="cpu",
                                       compile=False)  # fmt: skip
    clean = sorted(probe.classify(x)["clean"] for _, _, x, _ in items)
    threshold = (clean[2] + clean[3]) / 2
    weights = _tiny(tmp_path / "t.safetensors", 0, clean_threshold=threshold)
    engine = OPIREngine.from_pretrained(weights, device="cpu", compile=False)
    snowy = shared_data / "snow" / "real_snow_samples" / "real"
    photos = [("snow", "snow/p/a.png", _crop(sorted(snowy.iterdir())[0]))]
    table = score_every_task(engine, items, photos)
    decided = [item.auto["task"] for item in table.items]
    assert "clean" in decided[:-1] and any(d != "clean" for d in decided[:-1])
    expected = evaluate_engine(engine, items, per_set=True) + evaluate_head(engine, photos)
    rows = table.rows()
    assert [r.task for r in rows] == [r.task for r in expected]
    assert [r.task for r in rows] == ["rain", "rain/A", "rain/B", "haze", "haze/H", "clean",
                                      "clean/C", "snow_photos"]  # fmt: skip
    for got, want in zip(rows, expected, strict=True):
        for key in ("n", "head_accuracy", "identical"):
            assert getattr(got, key) == getattr(want, key), (got.task, key)
        for key in ("input_psnr", "psnr", "min_psnr", "set_psnr", "weather_left"):
            g, w = getattr(got, key), getattr(want, key)
            assert (g is None) == (w is None), (got.task, key)
            if g is not None:
                assert g == pytest.approx(w, abs=1e-9), (got.task, key)
    # the same decisions under one-hot tasks score otherwise: the auto figures are not those
    one_hot = table.rows(decided)
    assert [r.head_accuracy for r in one_hot] == [r.head_accuracy for r in rows]
    assert any(a.psnr != b.psnr for a, b in zip(one_hot, rows, strict=True) if a.psnr)


def test_oracle_and_given_decisions_score_each_items_restoration_under_that_task(tmp_path, items):
    engine = OPIREngine.from_pretrained(_tiny(tmp_path / "t.safetensors", 1), device="cpu",
                                        compile=False)  # fmt: skip
    table = score_every_task(engine, items)

    def scored(task: str, degraded: torch.Tensor, target: torch.Tensor) -> float:
        out = degraded if task == "clean" else engine.restore(degraded, task=task).image
        as_bytes = [(t * 255).round().byte().permute(1, 2, 0).numpy() for t in (out, target)]
        return peak_signal_noise_ratio(as_bytes[1], as_bytes[0], data_range=255)

    oracle = {r.task: r for r in table.rows(ORACLE)}
    rain = [scored("rain", x, y) for task, _, x, y in items if task == "rain"]
    assert oracle["rain"].psnr == pytest.approx(np.mean(rain))
    assert oracle["rain/B"].psnr == pytest.approx(rain[2])
    assert oracle["rain"].head_accuracy == 1.0
    # clean photos passed through by the oracle: identical, no PSNR
    assert oracle["clean"].identical == 1.0 and oracle["clean"].psnr is None
    # every item called snow: rain's row is each pair under snow, clean photos changed
    snowed = {r.task: r for r in table.rows(["snow"] * len(items))}
    snow = [scored("snow", x, y) for task, _, x, y in items if task == "rain"]
    assert snowed["rain"].psnr == pytest.approx(np.mean(snow))
    assert snowed["rain"].head_accuracy == 0.0
    clean = [scored("snow", x, y) for task, _, x, y in items if task == "clean"]
    assert snowed["clean"].psnr == pytest.approx(np.mean(clean))
    assert snowed["clean"].min_psnr == pytest.approx(min(clean))
    # called clean, a rain pair is scored as its input is
    kept = {r.task: r for r in table.rows(["clean"] * len(items))}
    assert kept["rain"].psnr == pytest.approx(kept["rain"].input_psnr)
    assert kept["rain"].weather_left == pytest.approx(1.0)
    with pytest.raises(ValueError, match="a class of clean, rain, snow, haze per item"):
        table.rows("snow")
    with pytest.raises(ValueError, match="1 probabilities for 6 items"):
        table.decisions([{"clean": 1.0, "rain": 0.0, "snow": 0.0, "haze": 0.0}])


def test_decisions_follow_the_auto_rule():
    """Clean only where clean is likeliest and at least the threshold, else the likeliest
    weather."""
    table = TaskTable("w", 0.5, [])
    probs = [
        {"clean": 0.6, "rain": 0.1, "snow": 0.2, "haze": 0.1},
        {"clean": 0.45, "rain": 0.2, "snow": 0.05, "haze": 0.3},
        {"clean": 0.1, "rain": 0.3, "snow": 0.5, "haze": 0.1},
    ]
    table.items = [None] * 3  # decisions read only how many there are
    assert table.decisions(probs) == ["clean", "haze", "snow"]
    assert table.decisions(probs, clean_threshold=0.7) == ["snow", "haze", "snow"]


def test_the_table_survives_a_round_trip_through_json(tmp_path, items):
    engine = OPIREngine.from_pretrained(_tiny(tmp_path / "t.safetensors", 2), device="cpu",
                                        compile=False)  # fmt: skip
    table = score_every_task(engine, items[:2] + items[-1:], source={"data": {"rain": ["x"]}})
    table.save(tmp_path / "table.json")
    again = TaskTable.load(tmp_path / "table.json")
    assert again == table
    assert again.items[-1].psnr["clean"] is None  # a clean photo as it is equals its target
    assert json.loads((tmp_path / "table.json").read_text())["source"] == {"data": {"rain": ["x"]}}


def test_eval_cli_writes_the_table_then_compares_another_classifier(tmp_path, shared_data):
    """`opir eval --weights W --data rain=DIR --every-task F` writes F; `opir eval --every-task
    F --classifier W2` reads it and prints W2's rows beside the oracle's, restoring nothing."""
    pairs = tmp_path / "rain"
    rain = shared_data / "rain" / "Rain13K-subset"
    for stem in ("1", "10"):
        for side in ("input", "target"):
            (pairs / side).mkdir(parents=True, exist_ok=True)
            crop = np.array(Image.open(rain / side / f"{stem}.jpg").convert("RGB"))[:48, :64]
            Image.fromarray(crop).save(pairs / side / f"{stem}.png")
    first, second = _tiny(tmp_path / "a.safetensors", 3), _tiny(tmp_path / "b.safetensors", 4)
    table_path = tmp_path / "table.json"
    args = ["eval", "--weights", str(first), "--data", f"rain={pairs}", "--device", "cpu",
            "--every-task", str(table_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = TaskTable.load(table_path)
    assert len(table.items) == 2 and table.source["data"] == {"rain": [str(pairs)]}
    oracle = table.rows(ORACLE)[0]
    assert f"{oracle.psnr:.2f}" in result.output
    result = CliRunner().invoke(app, ["eval", "--every-task", str(table_path), "--classifier",
                                      str(second), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "b's calls" in result.output
    other = OPIREngine.from_pretrained(second, device="cpu", compile=False)
    probs = [other.classify(item) for item in (_crop(pairs / "input" / f"{s}.png") for s in
                                                ("1", "10"))]  # fmt: skip
    decided = table.decisions(probs, other.model.config.clean_threshold)
    assert f"{table.rows(decided)[0].psnr:.2f}" in result.output
    result = CliRunner().invoke(app, ["eval", "--every-task", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "none.json" in result.output
    # a table whose items are no longer what its folders hold is not paired with new calls
    stale = json.loads(table_path.read_text())
    stale["items"][0]["name"] = "elsewhere.png"
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    result = CliRunner().invoke(app, ["eval", "--every-task", str(tmp_path / "stale.json"),
                                      "--classifier", str(second), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "no longer" in result.output
    (tmp_path / "card.json").write_text(json.dumps({"rain": {"psnr": 20.0}}))
    result = CliRunner().invoke(app, ["eval", "--every-task", str(tmp_path / "card.json")])
    assert result.exit_code == 2 and "not a table of every task" in result.output
    result = CliRunner().invoke(app, [*args, "--y"])
    assert result.exit_code == 2 and "not with --y" in result.output
    result = CliRunner().invoke(app, ["eval", "--classifier", str(second)])
    assert result.exit_code == 2 and "--every-task" in result.output
    # --against: a reference whose rain row is 1 dB better makes this table's rain rows lose
    better = json.loads(table_path.read_text())
    better["weights"] = "ref"
    for item in better["items"]:
        item["auto"]["psnr"] += 1.0
    (tmp_path / "ref.json").write_text(json.dumps(better))
    result = CliRunner().invoke(app, ["eval", "--every-task", str(table_path), "--against",
                                      str(tmp_path / "ref.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "against ref: rain loses (-1.00 dB); rain/rain loses (-1.00 dB)" in _flat(result.output)
    result = CliRunner().invoke(app, ["eval", "--every-task", str(tmp_path / "ref.json"),
                                      "--against", str(table_path)])  # fmt: skip
    assert "no row loses (2 rows)" in _flat(result.output)
    # a reference of the same weights' name is still the reference, in a column of its own
    better["weights"] = json.loads(table_path.read_text())["weights"]
    (tmp_path / "same.json").write_text(json.dumps(better))
    result = CliRunner().invoke(app, ["eval", "--every-task", str(table_path), "--against",
                                      str(tmp_path / "same.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rain loses (-1.00 dB); rain/rain loses (-1.00 dB)" in _flat(result.output)
    assert "same.json:" in _flat(result.output)
    result = CliRunner().invoke(app, ["eval", "--every-task", str(table_path), "--against",
                                      str(tmp_path / "stale.json")])  # fmt: skip
    assert result.exit_code == 2 and "holds other items" in _flat(result.output)
    result = CliRunner().invoke(app, ["eval", "--against", str(table_path)])
    assert result.exit_code == 2 and "--against compares tables" in result.output


def _flat(text: str) -> str:
    return " ".join(text.split())


def _row(task: str, psnr: float | None, min_psnr: float | None = None) -> TaskRow:
    return TaskRow(task, 2, 20.0, None, psnr, None, "-", None, None, 1.0, 0.0,
                   min_psnr=psnr if min_psnr is None else min_psnr)  # fmt: skip


def test_compare_rows_is_the_shipping_rule():
    """A weather row loses below the reference's PSNR (outputs equal to their targets, None,
    are infinitely good); a clean row only when a photo it changed is under 40 dB, whatever the
    reference did; photo rows are not judged; a reference without the row is refused."""
    reference = [_row("rain", 24.0), _row("rain/A", 22.0), _row("haze", None),
                 _row("clean", 45.0), _row("snow_photos", None)]  # fmt: skip
    candidate = [_row("rain", 24.5), _row("rain/A", 21.9), _row("haze", 30.0),
                 _row("clean", 41.0, min_psnr=39.5), _row("snow_photos", None)]  # fmt: skip
    verdicts = compare_rows(candidate, reference)
    assert [(v.task, v.loses) for v in verdicts] == [
        ("rain", False), ("rain/A", True), ("haze", True), ("clean", True),
    ]  # fmt: skip
    assert verdicts[1].why == "-0.10 dB" and verdicts[3].why == "a photo at 39.50 dB, under 40"
    assert not compare_rows([_row("clean", 41.0, min_psnr=40.2)], reference)[0].loses
    assert not compare_rows([_row("clean", None)], reference)[0].loses  # nothing changed
    with pytest.raises(ValueError, match="the reference has no row 'snow'"):
        compare_rows([_row("snow", 25.0)], reference)
