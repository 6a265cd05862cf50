"""Classifier training: a trunk classifier trained on the engine's view of whole images.

The data is a handful of small crops of real pairs, real snowy photos and clean photos from the
shared data, written as PNG into pytest's tmp folder; the split tests read the real folders.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from opir_engine.cli.app import app
from opir_engine.datasets import class_index, make_split
from opir_engine.evaluation.scoring import TaskRow, evaluate_head, photo_items, rows_to_card
from opir_engine.inference.engine import OPIREngine, classification_view
from opir_engine.model import CLASSES, OPIR, OPIRConfig, auto_decision
from opir_engine.training.classifier import (
    CLEAN_THRESHOLDS,
    ClassifierData,
    ClassifierRecipe,
    ViewPool,
    choose_clean_threshold,
    render_pool,
    split_accuracy,
    train_classifier,
    with_trunk_classifier,
)
from opir_engine.weights import load_checkpoint, save_checkpoint

SPLIT = Path(__file__).resolve().parents[1] / "splits" / "validation.json"

_FILES = [
    ("rain/Rain13K-subset/input/1.jpg", "rain/input/r1.png"),
    ("rain/Rain13K-subset/target/1.jpg", "rain/target/r1.png"),
    ("rain/Rain13K-subset/input/2.jpg", "rain/input/r2.png"),
    ("rain/Rain13K-subset/target/2.jpg", "rain/target/r2.png"),
    ("haze/SOTS-indoor/input/1400_1.png", "haze/input/h1.png"),
    ("haze/SOTS-indoor/target/1400_1.png", "haze/target/h1.png"),
    ("snow/real_snow_samples/real/dgsa_413.tif", "snowy/s1.png"),
    ("snow/real_snow_samples/real/jstasr_testImg_1.tif", "snowy/s2.png"),
    ("clean/CBSD68/101085.png", "clean/c1.png"),
    ("clean/CBSD68/101087.png", "clean/c2.png"),
    ("clean/CBSD68/102061.png", "clean/c3.png"),
]
_HELD_OUT = {
    "rain": ["rain/input/r2.png"],
    "clean": ["clean/c3.png"],
    "snow_photos": ["snowy/s2.png"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_root(crop_data: Callable[..., Path]) -> Path:
    return crop_data(_FILES, _HELD_OUT)


def _data(root: Path) -> ClassifierData:
    return ClassifierData(
        paired={"rain": [str(root / "rain")], "haze": [str(root / "haze")]},
        photos={"snow": [str(root / "snowy")]},
        clean=[str(root / "clean")],
        split=str(root / "split.json"),
        data_root=str(root),
    )


def _tiny() -> OPIR:
    torch.manual_seed(0)
    return OPIR(OPIRConfig.from_name("tiny")).eval()


# ---------------------------------------------------------------------------------------------
# The view and the pool
# ---------------------------------------------------------------------------------------------


def test_engine_classifies_through_classification_view(weights: Path) -> None:
    """What the classifier trains on is what `--task auto` reads: the engine's probabilities
    are softmax(classify(classification_view(image)))."""
    model, _ = load_checkpoint(weights)
    trunk = with_trunk_classifier(model, width=8, seed=0)
    engine = OPIREngine(trunk, {"name": "trunk"}, torch.device("cpu"), torch.float32, False)
    image = torch.rand(3, 700, 530, generator=torch.Generator().manual_seed(0))
    view = classification_view(image, trunk.multiple_of)
    assert view.shape[-2:] == (512, 388)  # long side 512, short side padded to the multiple
    with torch.inference_mode():
        expected = torch.softmax(trunk.classify(view), dim=1)[0]
    got = torch.tensor([engine.classify(image)[c] for c in CLASSES])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_pool_is_seeded_balanced_and_never_reads_the_split(data_root: Path) -> None:
    data = _data(data_root)
    recipe = ClassifierRecipe(views_per_class=6, holdout=0.5, max_side=64, seed=1)
    first = render_pool(data, recipe, multiple=4)
    again = render_pool(data, recipe, multiple=4)
    assert all(torch.equal(a, b) for a, b in zip(first.views, again.views, strict=True))
    assert all(v.dtype == torch.uint8 and v.shape[-1] % 4 == 0 for v in first.views)
    assert first.labels.tolist() == [c for c in range(len(CLASSES)) for _ in range(6)]
    assert {k: sum(v.values()) for k, v in first.counts.items()} == dict.fromkeys(CLASSES, 6)
    assert first.counts["snow"]["real"] > 0 and first.counts["snow"]["synthetic"] > 0
    assert first.counts["clean"]["pair_targets"] > 0
    other = render_pool(data, ClassifierRecipe(views_per_class=6, max_side=64, seed=2), 4)
    assert not all(torch.equal(a, b) for a, b in zip(first.views, other.views, strict=True))

    # only held-in photos are sources: the held-out rain pair, clean photo and snowy photo
    # never are
    from opir_engine.training.classifier import _Sources

    sources = _Sources(data, recipe)
    keys = {s.key for group in (sources.clean, sources.targets, *sources.real.values())
            for s in group}  # fmt: skip
    names = {Path(k).name for k in keys}
    assert names == {"r1.png", "h1.png", "s1.png", "c1.png", "c2.png"}  # pairs keyed by target
    assert len(sources.targets) == 2 and len(sources.real["snow"]) == 1


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _stripes_pool(n: int, seed: int) -> ViewPool:
    """Views whose class is plain to see: flat (clean), vertical stripes (rain), dots (snow),
    a bright veil (haze), with noise, at varied sizes."""
    g = torch.Generator().manual_seed(seed)
    views, labels = [], []
    for i in range(n):
        label = i % 4
        h, w = 32 + 4 * int(torch.randint(0, 5, (1,), generator=g)), 40
        x = 0.3 + 0.1 * torch.rand(3, h, w, generator=g)
        if label == 1:
            x[:, :, ::4] += 0.5
        elif label == 2:
            x[:, ::5, ::5] += 0.6
        elif label == 3:
            x = 0.3 * x + 0.6
        views.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(label)
    held = torch.zeros(n, dtype=torch.bool)
    held[-n // 4 :] = True
    return ViewPool(views, torch.tensor(labels), held, {})


def test_auto_decision_passes_through_only_confident_clean() -> None:
    probs = torch.tensor(
        [
            [0.95, 0.02, 0.02, 0.01],  # confident clean: unchanged
            [0.60, 0.10, 0.25, 0.05],  # clean, unsure: restored as the likeliest weather (snow)
            [0.10, 0.20, 0.10, 0.60],  # haze
            [0.30, 0.40, 0.20, 0.10],  # rain
        ]
    )
    assert auto_decision(probs, 0.9).tolist() == [0, 2, 3, 1]
    assert auto_decision(probs, 0.5).tolist() == [0, 0, 3, 1]


def test_choose_clean_threshold_balances_the_classes() -> None:
    """Clean photos at 0.95 and 0.70 confidence, a rainy one the classifier calls clean at 0.62:
    every threshold in (0.62, 0.70] gets all four right; the lowest of them is kept."""
    probs = torch.tensor(
        [[0.95, 0.05, 0, 0], [0.70, 0.30, 0, 0], [0.10, 0.90, 0, 0], [0.62, 0.38, 0, 0]]
    )
    labels = torch.tensor([0, 0, 1, 1])
    threshold, scores, error = choose_clean_threshold(probs, labels)
    assert threshold == 0.65 and error == 0.0
    assert scores["0.70"] == scores["0.65"] == 1.0
    assert scores["0.75"] == 0.75  # the 0.70 clean photo is restored
    assert scores["0.60"] == 0.75  # the rainy photo is passed through
    # Without clean views (or without weather ones) there is no trade-off to measure.
    assert choose_clean_threshold(probs[2:], labels[2:]) == (None, {}, None)
    assert choose_clean_threshold(probs[:2], labels[:2]) == (None, {}, None)


def _views(rain_fooled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """40 clean views (38 at 0.97, 2 the classifier calls snow) and 40 rainy ones, of which
    `rain_fooled` look clean at 0.62 (passed through for thresholds up to 0.60)."""
    clean = [[0.97, 0.01, 0.01, 0.01]] * 38 + [[0.40, 0.05, 0.55, 0.0]] * 2
    rain = [[0.05, 0.95, 0.0, 0.0]] * (40 - rain_fooled) + [[0.62, 0.38, 0.0, 0.0]] * rain_fooled
    return torch.tensor(clean + rain), torch.tensor([0] * 40 + [1] * 40)


def test_choose_clean_threshold_moves_only_for_a_gain_beyond_the_noise() -> None:
    # One fooled rainy view: 0.9625 up to 0.60, 0.975 from 0.65. The best's standard error is
    # sqrt(0.95 * 0.05 / 40 + 1 * 0 / 40) / 2 = 0.0172, so 0.9625 is within it: keep 0.30.
    threshold, scores, error = choose_clean_threshold(*_views(1))
    assert scores["0.30"] == scores["0.60"] == 0.9625 and scores["0.65"] == scores["0.95"] == 0.975
    assert error == pytest.approx(0.0172, abs=1e-4)
    assert threshold == 0.30
    # Four fooled: 0.925 up to 0.60, below 0.975 - 0.0172, so the threshold rises to 0.65.
    threshold, scores, _ = choose_clean_threshold(*_views(4))
    assert scores["0.60"] == 0.925 and scores["0.65"] == 0.975
    assert threshold == 0.65


def test_train_classifier_learns_and_touches_nothing_else() -> None:
    model = _tiny()
    pool = _stripes_pool(80, seed=0)
    recipe = ClassifierRecipe(width=8, steps=120, batch=16, patch=32, lr=3e-3, eval_every=40)
    trained, report = train_classifier(model, pool, recipe)
    assert trained.config.classifier == "trunk" and model.config.classifier == "bottleneck"
    assert report["held_out"]["views"] == 20
    assert report["held_out"]["accuracy"] >= 0.9
    assert [h["step"] for h in report["history"]] == [40, 80, 120]
    assert report["held_out"]["step"] in (40, 80, 120)
    chosen = report["clean_threshold"]
    scores = chosen["balanced_accuracy"]
    assert chosen["chosen_on"] == "held-out views" and set(scores) == {
        f"{t:.2f}" for t in CLEAN_THRESHOLDS
    }
    floor = max(scores.values()) - chosen["standard_error"]
    assert chosen["value"] == min(float(t) for t, v in scores.items() if v >= floor - 1e-4)
    assert trained.config.clean_threshold == chosen["value"]
    assert model.config.clean_threshold == 0.9  # the input model is left as it was
    with torch.inference_mode():
        logits = torch.cat([trained.classify(v[None].float() / 255) for v in pool.views[-20:]])
    assert (logits.argmax(1) == pool.labels[-20:]).float().mean() >= 0.9
    before, after = model.state_dict(), trained.state_dict()
    assert {k for k in after if k.startswith("classifier.")}
    assert not any(k.startswith("head.") for k in after)
    for key, value in after.items():
        if not key.startswith("classifier."):
            assert torch.equal(before[key], value), key


def test_train_classifier_is_seeded() -> None:
    pool = _stripes_pool(24, seed=1)
    recipe = ClassifierRecipe(width=8, steps=6, batch=4, patch=32, eval_every=3)
    first, _ = train_classifier(_tiny(), pool, recipe)
    again, _ = train_classifier(_tiny(), pool, recipe)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------
# The command and the split
# ---------------------------------------------------------------------------------------------


def test_cli_writes_a_checkpoint_the_engine_loads(
    tmp_path: Path, data_root: Path, weights: Path
) -> None:
    out = tmp_path / "with-classifier.safetensors"
    args = ["train-classifier", str(weights), "--out", str(out),
            "--data", f"rain={data_root / 'rain'}", "--data", f"haze={data_root / 'haze'}",
            "--photos", f"snow={data_root / 'snowy'}", "--clean", str(data_root / "clean"),
            "--split", str(data_root / "split.json"), "--data-root", str(data_root),
            "--views", "4", "--steps", "3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "views: clean 4, rain 4, snow 4, haze 4" in result.output
    model, card = load_checkpoint(out)
    assert model.config.classifier == "trunk" and card["config"]["classifier"] == "trunk"
    report = card["classifier_training"]
    assert report["source"] == str(weights)
    # snow: synthesized from the held-out clean photo, as `opir eval --split` does
    assert set(report["split_accuracy"]) == {"rain", "clean", "snow", "snow_photos"}
    assert report["split_accuracy"]["snow_photos"]["n"] == 1
    # the same figure again from the written file
    with Image.open(data_root / "snowy" / "s2.png") as im:
        image = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) / 255
    again = split_accuracy(model, [("snow_photos", "snow", image)])
    assert again["snow_photos"] == report["split_accuracy"]["snow_photos"]
    original, _ = load_checkpoint(weights)
    assert torch.equal(original.kpn.intro.weight, model.kpn.intro.weight)
    engine = OPIREngine.from_pretrained(out, device="cpu", compile=False)
    assert engine.restore(image).task in CLASSES
    # the split's figure is what `--task auto` decides, clean_threshold included
    assert again["snow_photos"]["accuracy"] == float(engine.restore(image).task == "snow")

    # --recalibrate chooses the threshold again on the donor's held-out views, rendered again.
    # Which photos are held out hangs on a hash of their paths (here under tmp_path), so the
    # donor's card is given a holdout that leaves none, then one that keeps every view.
    recalibrated = tmp_path / "recalibrated.safetensors"
    args = ["train-classifier", str(weights), "--out", str(recalibrated), "--from", str(out),
            "--recalibrate"]  # fmt: skip
    card_file = out.with_suffix(".json")
    for holdout in (0.0, 1.0):
        donor_card = json.loads(card_file.read_text())
        donor_card["classifier_training"]["recipe"]["holdout"] = holdout
        card_file.write_text(json.dumps(donor_card))
        result = CliRunner().invoke(app, args)
        if holdout == 0.0:
            assert result.exit_code == 2
            assert "the donor's recipe holds out no views to calibrate on" in result.output
            assert not recalibrated.exists()
    assert result.exit_code == 0, result.output
    assert "the donor's, as recorded" not in " ".join(result.output.split())  # this copy's
    report = donor_card["classifier_training"]
    recipe = ClassifierRecipe(**report["recipe"])
    held = render_pool(ClassifierData(**report["data"]), recipe, model.multiple_of)
    keep = held.held_out.nonzero().flatten().tolist()
    assert keep, "the fixture holds out some views"
    with torch.inference_mode():
        probs = torch.cat([model.classify(held.views[i][None].float() / 255) for i in keep])
    expected, scores, _ = choose_clean_threshold(probs.softmax(dim=1), held.labels[keep])
    model2, card2 = load_checkpoint(recalibrated)
    chosen = card2["classifier_training"]["clean_threshold"]
    assert chosen["recalibrated"] and chosen["balanced_accuracy"] == scores
    assert model2.config.clean_threshold == expected == chosen["value"]
    assert set(card2["classifier_training"]["split_accuracy"]) == set(report["split_accuracy"])


def test_cli_from_copies_a_trained_classifier(tmp_path: Path, weights: Path) -> None:
    """--from: newer restoration weights keep a trained classifier (it reads the image alone)."""
    base, _ = load_checkpoint(weights)
    trained, report = train_classifier(
        base, _stripes_pool(16, seed=2), ClassifierRecipe(width=8, steps=4, batch=4, patch=32)
    )
    donor = tmp_path / "donor.safetensors"
    save_checkpoint(donor, trained, {"name": "donor", "classifier_training": report})
    newer = _tiny()  # other restoration weights (seed 0, no noise)
    newer_path = tmp_path / "newer.safetensors"
    save_checkpoint(newer_path, newer, {"name": "newer"})
    out = tmp_path / "combined.safetensors"
    result = CliRunner().invoke(
        app, ["train-classifier", str(newer_path), "--out", str(out), "--from", str(donor)]
    )
    assert result.exit_code == 0, result.output
    # without --recalibrate the printed figures are the donor's record, and it says so
    assert "the figures above and below are the donor's" in " ".join(result.output.split())
    combined, card = load_checkpoint(out)
    assert card["name"] == "newer"
    assert card["classifier_training"]["transplanted_from"] == str(donor)
    assert combined.config.clean_threshold == trained.config.clean_threshold
    assert card["config"]["clean_threshold"] == trained.config.clean_threshold
    for key, value in combined.state_dict().items():
        source = trained if key.startswith("classifier.") else newer
        assert torch.equal(value, source.state_dict()[key]), key
    # a checkpoint without a trained classifier is no donor
    result = CliRunner().invoke(
        app, ["train-classifier", str(newer_path), "--out", str(out), "--from", str(weights)]
    )
    assert result.exit_code == 2
    assert "has no classifier trained by train-classifier" in " ".join(result.output.split())


def test_cli_recalibrate_needs_from(tmp_path: Path, weights: Path) -> None:
    args = ["train-classifier", str(weights), "--out", str(tmp_path / "o.safetensors"),
            "--recalibrate"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "needs --from DONOR" in " ".join(result.output.split())
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_refuses_to_overwrite_its_input(tmp_path: Path, weights: Path) -> None:
    copy = tmp_path / "w.safetensors"
    copy.write_bytes(weights.read_bytes())
    before = copy.read_bytes()
    result = CliRunner().invoke(app, ["train-classifier", str(copy), "--out", str(copy)])
    assert result.exit_code == 2
    assert "refusing to overwrite the input checkpoint" in result.output
    assert copy.read_bytes() == before


def test_committed_split_is_what_make_split_gives(shared_data: Path) -> None:
    written = json.loads(SPLIT.read_text())
    committed = written["validation"]
    assert committed == make_split(shared_data, paired_sets=written["paired_sets"])
    # a paired set added to the data later enters no split until one is made anew
    every_set = make_split(shared_data)
    assert all(set(committed[task]) <= set(every_set[task]) for task in committed)
    assert len(committed["snow_photos"]) == 5


@pytest.mark.slow  # five full-size photos through the engine, twice: about 20 s
def test_real_snow_photos_are_scored_by_the_classifier_alone(
    weights: Path, shared_data: Path
) -> None:
    engine = OPIREngine.from_pretrained(weights, device="cpu", compile=False)
    photos = photo_items(SPLIT, shared_data)
    assert [t for t, _n, _i in photos] == ["snow"] * 5
    rows = evaluate_head(engine, photos)
    assert [r.task for r in rows] == ["snow_photos"] and rows[0].n == 5
    # counted as task auto decides: what restore() reports as the task it used
    hits = [engine.restore(i, task="auto").task == "snow" for _t, _n, i in photos]
    assert rows[0].head_accuracy == sum(hits) / 5
    # the card's overall head accuracy counts the four classes only
    clean = TaskRow(task="clean", n=3, input_psnr=None, input_ssim=None, psnr=None, ssim=None,
                    baseline="-", baseline_psnr=None, baseline_ssim=None, head_accuracy=1.0,
                    identical=1.0)  # fmt: skip
    card = rows_to_card([clean, *rows], y_channel=False)
    assert card["head_accuracy"] == 1.0
    assert card["snow_photos"]["n"] == 5


# ---------------------------------------------------------------------------------------------
# Transplanted rain layers and varied snow
# ---------------------------------------------------------------------------------------------


def _layered(root: Path) -> ClassifierData:
    data = _data(root)
    data.rain_layers = [str(root / "rain")]
    return data


def test_pool_draws_transplanted_rain_seeded_from_held_in_pairs_only(data_root: Path) -> None:
    from opir_engine.training.classifier import _is_held_out, _Sources

    data = _layered(data_root)
    recipe = ClassifierRecipe(views_per_class=8, real_ratio=0.0, holdout=0.5, max_side=64,
                              transplant_ratio=1.0, seed=3)  # fmt: skip
    first = render_pool(data, recipe, multiple=4)
    again = render_pool(data, recipe, multiple=4)
    assert all(torch.equal(a, b) for a, b in zip(first.views, again.views, strict=True))
    assert torch.equal(first.layers, again.layers)
    # every synthetic rain view is a transplant, and only rain views carry a layer
    rain = first.labels == class_index("rain")
    assert first.counts["rain"] == {"real": 0, "pair_targets": 0, "synthetic": 0, "transplant": 8}
    assert bool((first.layers[rain] >= 0).all()) and bool((first.layers[~rain] == -1).all())
    assert first.layer_pairs == 1
    # the split holds out the pair r2: only r1 lends its rain
    sources = _Sources(data, recipe)
    assert [Path(k).name for k in sources.layer_keys] == ["r1.png"]
    # a held-in view shows neither a held-out photo nor a held-out layer
    for i in torch.nonzero(~first.held_out & (first.layers >= 0)).flatten().tolist():
        assert not _is_held_out(sources.layer_keys[int(first.layers[i])], recipe)
    # the layer is laid on: the views differ from the same photos without transplant
    plain = render_pool(data, dataclasses.replace(recipe, transplant_ratio=0.0), multiple=4)
    i = int(rain.nonzero()[0])
    assert not torch.equal(first.views[i], plain.views[i])
    assert first.counts["rain"]["synthetic"] == 0 and plain.counts["rain"]["synthetic"] == 8


@pytest.mark.parametrize("option", ["snow_variety", "snow_sparse"])
def test_snow_options_change_only_synthetic_snow_views(data_root: Path, option: str) -> None:
    data = _data(data_root)
    recipe = ClassifierRecipe(views_per_class=6, real_ratio=0.0, max_side=64, seed=4)
    plain = render_pool(data, recipe, multiple=4)
    changed = render_pool(data, dataclasses.replace(recipe, **{option: 1.0}), multiple=4)
    for label, a, b in zip(plain.labels.tolist(), plain.views, changed.views, strict=True):
        assert torch.equal(a, b) == (label != class_index("snow")), CLASSES[label]


def test_sparse_snow_thins_the_views_not_drawn_varied(data_root: Path) -> None:
    from opir_engine.training.classifier import _Source, _synthesize

    data = _data(data_root)
    recipe = ClassifierRecipe(views_per_class=6, real_ratio=0.0, max_side=64, seed=4)
    # varied snow is drawn first; the sparse share applies to the other views only
    both = render_pool(data, dataclasses.replace(recipe, snow_variety=1.0, snow_sparse=1.0), 4)
    varied = render_pool(data, dataclasses.replace(recipe, snow_variety=1.0), multiple=4)
    assert all(torch.equal(a, b) for a, b in zip(both.views, varied.views, strict=True))
    # on one real photo, sparse snow changes far less of it than the renderer's own draws
    photo = torch.from_numpy(np.array(Image.open(next((data_root / "clean").iterdir()))))
    photo = photo.permute(2, 0, 1).float() / 255
    change = {True: 0.0, False: 0.0}
    for thin in change:
        for seed in range(8):
            source = _Source("snow", photo, "k", synth="snow", sparse=thin)
            out = _synthesize(photo, source, np.random.default_rng(seed))
            change[thin] += float((out - photo).abs().mean())
    assert change[True] < 0.4 * change[False]


def test_rain_veil_greys_only_synthetic_rain_views(data_root: Path) -> None:
    """Veiled rain views have less contrast than plain ones; the other classes' views are
    unchanged."""
    data = _data(data_root)
    recipe = ClassifierRecipe(views_per_class=6, real_ratio=0.0, max_side=64, seed=4)
    plain = render_pool(data, recipe, multiple=4)
    veiled = render_pool(data, dataclasses.replace(recipe, rain_veil=1.0), multiple=4)
    ratios = []
    for label, a, b in zip(plain.labels.tolist(), plain.views, veiled.views, strict=True):
        assert torch.equal(a, b) == (label != class_index("rain")), CLASSES[label]
        if label == class_index("rain") and a.float().std() > 1:
            ratios.append(float(b.float().std() / a.float().std()))
    # t <= 0.95 scales every deviation from the mean; the option's own draw moves the crops
    # and the rain, so the views are compared as a group
    assert len(ratios) >= 4 and float(np.median(ratios)) < 0.85


def test_bad_option_values_are_refused_with_their_values() -> None:
    from opir_engine.training.classifier import ClassifierTrainingError

    for field, value in [("transplant_ratio", 1.5), ("snow_variety", -0.1), ("holdout", 2.0),
                         ("rain_veil", 1.1), ("snow_sparse", 1.5)]:  # fmt: skip
        message = re.escape(f"{field} {value}: expected a share")
        with pytest.raises(ClassifierTrainingError, match=message):
            ClassifierRecipe(**{field: value})
    with pytest.raises(ClassifierTrainingError, match=re.escape("steps 0: expected >= 1")):
        ClassifierRecipe(steps=0)
    with pytest.raises(ClassifierTrainingError, match=re.escape("lr 0.0: expected > 0")):
        ClassifierRecipe(lr=0.0)


def test_cli_explains_bad_transplant_options(
    tmp_path: Path, data_root: Path, weights: Path
) -> None:
    out = tmp_path / "o.safetensors"
    base = ["train-classifier", str(weights), "--out", str(out), "--clean",
            str(data_root / "clean"), "--views", "2", "--steps", "1"]  # fmt: skip
    cases = [
        (["--transplant-ratio", "1.2"], "transplant_ratio 1.2: expected a share in [0, 1]"),
        (["--snow-variety", "-1"], "snow_variety -1.0: expected a share in [0, 1]"),
        (["--transplant-ratio", "0.5"], "a transplant ratio of 0.5 needs rain pairs to lend "
                                        "layers; none in []"),
        (["--transplant-ratio", "0.5", "--rain-layers", str(data_root / "clean")],
         "no input/ and target/ folders found"),  # after "rain layers: DIR" (wrapped)
        (["--start-from", str(weights)], "not a trained trunk"),
        (["--start-from", str(tmp_path / "missing.safetensors")], "checkpoint not found"),
    ]  # fmt: skip
    for extra, message in cases:
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()


def test_start_from_continues_a_trained_classifier(tmp_path: Path, weights: Path) -> None:
    base, _ = load_checkpoint(weights)
    donor, _ = train_classifier(
        base, _stripes_pool(16, seed=2), ClassifierRecipe(width=8, steps=4, batch=4, patch=32)
    )
    # a learning rate too small to move anything: the start's classifier comes through as is,
    # at its own width (8), not the recipe's (24)
    recipe = ClassifierRecipe(steps=2, batch=4, patch=32, lr=1e-12, eval_every=1, seed=5)
    again, _ = train_classifier(base, _stripes_pool(16, seed=3), recipe, start=donor)
    assert again.config.classifier_width == 8
    for key, value in again.classifier.state_dict().items():
        torch.testing.assert_close(value, donor.classifier.state_dict()[key], msg=key)


def test_cli_trains_on_transplanted_rain_and_records_it(
    tmp_path: Path, data_root: Path, weights: Path
) -> None:
    out = tmp_path / "layered.safetensors"
    args = ["train-classifier", str(weights), "--out", str(out),
            "--data", f"rain={data_root / 'rain'}", "--clean", str(data_root / "clean"),
            "--split", str(data_root / "split.json"), "--data-root", str(data_root),
            "--rain-layers", str(data_root / "rain"), "--transplant-ratio", "1",
            "--snow-variety", "0.5", "--snow-sparse", "0.25",
            "--views", "4", "--steps", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = load_checkpoint(out)[1]["classifier_training"]
    assert report["recipe"]["transplant_ratio"] == 1.0 and report["recipe"]["snow_variety"] == 0.5
    assert report["recipe"]["snow_sparse"] == 0.25
    assert report["data"]["rain_layers"] == [str(data_root / "rain")]
    assert report["rain_layer_pairs"] == 1  # r1; the split holds r2 out
    assert report["views"]["rain"]["transplant"] > 0
