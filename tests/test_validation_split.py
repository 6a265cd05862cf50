"""The written-down validation splits: v2 is what make_split gives, holds out everything v1
did plus pairs of other rain renderers, keeps benchmark copies of clean photos on one side, and
training refuses a held-out photo under another name or encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from opir_engine.datasets import (
    HeldOut,
    kept_images,
    kept_pairs,
    make_split,
    pair_of,
    pixel_digest,
)
from opir_engine.evaluation.scoring import (
    DUSK_EXPOSURE,
    TRANSPLANT,
    source_set,
    validation_items,
)
from opir_engine.image_io import read_image
from opir_engine.synthesis import field_seed
from opir_engine.synthesis.degrade import apply_params, synthesize
from opir_engine.synthesis.params import HazeParams
from opir_engine.synthesis.transplant import fit_layer, lay_rain, rain_layer

SPLITS = Path(__file__).resolve().parents[1] / "splits"
V1, V2 = SPLITS / "validation.json", SPLITS / "validation-v2.json"
V3, V4 = SPLITS / "validation-v3.json", SPLITS / "validation-v4.json"
STREAK_SETS = ("Rain13K-subset", "DDN-samples", "HeavyRain-OutdoorRain-samples",
               "JORDER-E-RainTrainH-samples")  # fmt: skip


@pytest.mark.slow  # make_split decodes every clean photo and target: about 20 s
def test_committed_v2_split_is_what_make_split_gives(shared_data: Path) -> None:
    written = json.loads(V2.read_text())
    again = make_split(shared_data, paired_sets=written["paired_sets"],
                       fractions=written["fractions"])  # fmt: skip
    assert again == written["validation"]


def test_v2_holds_out_all_of_v1_and_enough_streak_pairs() -> None:
    v1, v2 = (json.loads(p.read_text())["validation"] for p in (V1, V2))
    assert all(set(v1[task]) <= set(v2[task]) for task in v1)
    streaks = [n for n in v2["rain"] if n.split("/")[1] in STREAK_SETS]
    assert len(streaks) >= 12
    assert len({n.split("/")[1] for n in streaks}) == 4  # four renderers, none of them ours
    layers = json.loads(V2.read_text())["rain_layers"]
    assert sorted(layers) == sorted(streaks)


def test_benchmark_copies_of_clean_photos_follow_them(shared_data: Path) -> None:
    v2 = json.loads(V2.read_text())["validation"]
    folder = shared_data / "rain" / "JORDER-E-RainTrainH-samples"
    held_clean = {pixel_digest(shared_data / n) for n in v2["clean"]}
    all_clean = {pixel_digest(p) for p in (shared_data / "clean" / "CBSD68").iterdir()}
    copies = 0
    for target in sorted((folder / "target").iterdir()):
        digest = pixel_digest(target)
        if digest in all_clean:
            copies += 1
            held = f"rain/{folder.name}/input/{target.name}" in v2["rain"]
            assert held == (digest in held_clean), target.name
    assert copies == 9  # the data README lists nine CBSD68 targets


def test_training_refuses_a_held_out_photo_under_another_name(
    tmp_path: Path, shared_data: Path
) -> None:
    v1 = json.loads(V1.read_text())["validation"]
    held = next(n for n in v1["clean"] if n.startswith("clean/CBSD68/"))
    kept = next(p for p in sorted((shared_data / "clean" / "CBSD68").iterdir())
                if f"clean/CBSD68/{p.name}" not in v1["clean"])  # fmt: skip
    folder = tmp_path / "photos"
    folder.mkdir()
    with Image.open(shared_data / held) as im:  # another name, another encoder (lossless)
        im.save(folder / "renamed.tiff")
    with Image.open(kept) as im:
        im.save(folder / "fine.png")
    held_out = HeldOut.from_split(V1, shared_data)
    assert kept_images([str(folder)], held_out, shared_data) == [folder / "fine.png"]
    # a pair whose target is a held-out photo is refused too, its input never read as rain
    (tmp_path / "pairs" / "input").mkdir(parents=True)
    (tmp_path / "pairs" / "target").mkdir()
    with Image.open(shared_data / held) as im:
        im.save(tmp_path / "pairs" / "target" / "a.png")
        im.save(tmp_path / "pairs" / "input" / "a.png")
    with Image.open(kept) as im:
        im.save(tmp_path / "pairs" / "target" / "b.png")
        im.save(tmp_path / "pairs" / "input" / "b.png")
    pairs = kept_pairs([str(tmp_path / "pairs")], "rain", held_out, shared_data)
    assert [p.input.name for p in pairs] == ["b.png"]


@pytest.mark.slow  # decodes the whole v2 validation: about 40 s
def test_v2_validation_has_transplant_rows_of_held_out_rain(shared_data: Path) -> None:
    items = validation_items(V2, shared_data)
    sources = {source_set(name) for task, name, _d, _t in items if task == "rain"}
    assert {"transplant-light", "transplant-heavy", *STREAK_SETS, "GT-RAIN-webcam"} <= sources
    transplants = [(n, d, t) for task, n, d, t in items if n.startswith("transplant-")]
    assert len(transplants) >= 24
    v2 = json.loads(V2.read_text())["validation"]
    for name, degraded, target in transplants:
        _kind, layer, photo = name.split(":")
        assert photo in v2["clean"]  # a held-out photo under held-out rain
        assert any(Path(n).stem == layer for n in v2["rain"])
        assert degraded.shape == target.shape and (degraded >= target - 1e-6).all()
        assert torch.equal(degraded, (degraded * 255).round() / 255)  # an 8-bit file's levels
    light = [float((d - t).mean()) for n, d, t in transplants if n.startswith("transplant-light")]
    heavy = [float((d - t).mean()) for n, d, t in transplants if n.startswith("transplant-heavy")]
    assert sum(heavy) / len(heavy) > 1.5 * sum(light) / len(light)
    # each row is exactly its held-out layer laid on its photo, at its kind's strength
    name, degraded, target = transplants[1]
    kind, stem, photo = name.split(":")
    pair = pair_of(shared_data / next(n for n in v2["rain"] if Path(n).stem == stem), "rain")
    layer = rain_layer(read_image(pair.input).rgb, read_image(pair.target).rgb)
    strength = dict(TRANSPLANT)[kind.removeprefix("transplant-")]
    again = lay_rain(target, fit_layer(layer, *target.shape[-2:]), strength)
    assert torch.equal((again * 255).round() / 255, degraded)


def test_v3_is_v2_plus_rain_of_our_own_renderer(shared_data: Path) -> None:
    """v3 holds out v2's files exactly and scores every fourth clean photo under our own rain
    too (`rain/synthetic`); every v2 item is unchanged, so v2's figures stay comparable."""
    v2, v3 = (json.loads(p.read_text()) for p in (V2, V3))
    assert v3["validation"] == v2["validation"] and v3["rain_layers"] == v2["rain_layers"]
    assert v3["synthetic_rain"] is True and "synthetic_rain" not in v2
    old, new = validation_items(V2, shared_data), validation_items(V3, shared_data)
    ours = [(n, d, t) for task, n, d, t in new if task == "rain" and n.startswith("synthetic:")]
    rest = [item for item in new if not (item[0] == "rain" and item[1].startswith("synthetic:"))]
    assert [(t, n) for t, n, _d, _t in rest] == [(t, n) for t, n, _d, _t in old]
    for a, b in zip(rest, old, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    clean = v3["validation"]["clean"]
    assert len(ours) == len(clean[3::4]) >= 12
    assert {name.removeprefix("synthetic:") for name, _d, _t in ours} == set(clean[3::4])
    assert {source_set(name) for name, _d, _t in ours} == {"synthetic"}
    name, degraded, target = ours[0]
    photo = name.removeprefix("synthetic:")
    assert torch.equal(target, read_image(shared_data / photo).rgb)
    rainy, params = synthesize(target, "rain", seed=3000 + clean.index(photo))
    assert params.kind == "rain"
    assert torch.equal(degraded, (rainy.clamp(0, 1) * 255).round() / 255)
    assert float((degraded - target).abs().mean()) > 0.005  # rain is there to remove


def test_v4_is_v3_plus_haze_of_our_own_renderer_on_daylit_and_dusk_photos(
    shared_data: Path,
) -> None:
    """v4 holds out v3's files exactly and scores the second of every four clean photos under
    our own haze (`haze/synthetic`) and under the same haze on the photo at half its exposure
    (`haze/synthetic-dusk`); every v3 item is unchanged."""
    v3, v4 = (json.loads(p.read_text()) for p in (V3, V4))
    assert v4["validation"] == v3["validation"] and v4["rain_layers"] == v3["rain_layers"]
    assert v4["synthetic_haze"] is True and v4["synthetic_rain"] is True
    assert "synthetic_haze" not in v3
    old, new = validation_items(V3, shared_data), validation_items(V4, shared_data)
    ours = [item for item in new if item[0] == "haze" and ":" in item[1]]
    rest = [item for item in new if not (item[0] == "haze" and ":" in item[1])]
    assert [(t, n) for t, n, _d, _t in rest] == [(t, n) for t, n, _d, _t in old]
    for a, b in zip(rest, old, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    clean = v4["validation"]["clean"]
    rows = {kind: {n.split(":", 1)[1]: (d, t) for _task, n, d, t in ours if n.startswith(kind)}
            for kind in ("synthetic:", "synthetic-dusk:")}  # fmt: skip
    daylit, dusk = rows["synthetic:"], rows["synthetic-dusk:"]
    assert list(daylit) == list(dusk) == clean[1::4] and len(clean[1::4]) >= 12
    assert {source_set(n) for _task, n, _d, _t in ours} == {"synthetic", "synthetic-dusk"}
    photo = clean[1]
    target = read_image(shared_data / photo).rgb
    hazy, params = synthesize(target, "haze", seed=4001)
    assert isinstance(params, HazeParams)
    assert torch.equal(daylit[photo][1], target)
    assert torch.equal(daylit[photo][0], (hazy.clamp(0, 1) * 255).round() / 255)
    degraded, dimmed = dusk[photo]
    assert torch.equal(dimmed, (target * DUSK_EXPOSURE * 255).round() / 255)
    again = apply_params(dimmed, params, field_seed(4001))  # the daylit row's haze
    assert torch.equal(degraded, (again.clamp(0, 1) * 255).round() / 255)
    for x, y in (*daylit.values(), *dusk.values()):
        assert float(x.mean() - y.mean()) > 0.02  # a bright veil to take away
    # the same veil weighs more on the dim photo: its input is further from its target
    gaps = [float((dusk[p][0] - dusk[p][1]).mean() - (daylit[p][0] - daylit[p][1]).mean())
            for p in daylit]  # fmt: skip
    assert min(gaps) > 0
