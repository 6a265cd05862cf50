"""Physics (paper Eq. 2-4) and determinism of `opir_engine.synthesis`, on real clean photos."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from opir_engine import image_io
from opir_engine import synthesis as syn
from opir_engine.synthesis import (
    KINDS,
    FlakeLayer,
    HazeParams,
    RainParams,
    SnowParams,
    StreakLayer,
    WeatherSynthesizer,
    apply_haze,
    apply_params,
    apply_rain,
    apply_snow,
    field_seed,
    params_from_dict,
    read_clean_image,
    regenerate,
    render_rain_streaks,
    render_snow_mask,
    synthesize,
    synthesize_folder,
)

DATA = SHARED_DATA
CLEAN = DATA / "clean"
needs_data = pytest.mark.skipif(
    not (CLEAN / "CBSD68").is_dir(), reason=f"real clean photos not found under {CLEAN}"
)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """(3, 160, 224) crop of a real clean photo."""
    if not (CLEAN / "CBSD68").is_dir():
        pytest.skip(f"real clean photos not found under {CLEAN}")
    rgb = read_clean_image(sorted((CLEAN / "CBSD68").iterdir())[0])
    return _tensor(rgb[40:200, 60:284])


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """(3, 3, 96, 128) crops of three real clean photos."""
    if not (CLEAN / "CBSD68").is_dir():
        pytest.skip(f"real clean photos not found under {CLEAN}")
    files = sorted((CLEAN / "CBSD68").iterdir())[1:4]
    return torch.stack([_tensor(read_clean_image(f)[:96, :128]) for f in files])


def _rain(density: float = 40.0, intensity: float = 0.3, veil: float = 0.0) -> RainParams:
    layers = (
        StreakLayer(angle_deg=10.0, length=20.0, width=0.8, density=density, intensity=intensity,
                    jitter=0.5),
        StreakLayer(angle_deg=8.0, length=8.0, width=0.5, density=density, intensity=intensity,
                    jitter=0.0),
    )  # fmt: skip
    return RainParams(layers=layers, veil=veil)


def _snow(density: float = 30.0, opacity: float = 0.8, veil: float = 0.0) -> SnowParams:
    layers = (
        FlakeLayer(size=1.0, blur=0.7, motion=0.0, angle_deg=0.0, density=density,
                   opacity=opacity, jitter=0.0),
        FlakeLayer(size=3.0, blur=1.5, motion=4.0, angle_deg=20.0, density=density / 10,
                   opacity=opacity, jitter=0.3),
    )  # fmt: skip
    return SnowParams(layers=layers, colour=(0.92, 0.94, 0.97), veil=veil)


HAZE = HazeParams(beta=1.2, airlight=(0.85, 0.87, 0.9))


# ---------------------------------------------------------------------------------- haze, Eq. 4


def test_haze_with_beta_zero_returns_clean_exactly(photo: torch.Tensor) -> None:
    out = apply_haze(photo, dataclasses.replace(HAZE, beta=0.0), seed=3)
    assert torch.equal(out, photo)


def test_haze_change_grows_with_beta(photo: torch.Tensor) -> None:
    changes = [
        (apply_haze(photo, dataclasses.replace(HAZE, beta=b), seed=3) - photo).abs().mean().item()
        for b in (0.1, 0.3, 0.6, 1.2, 2.4, 4.8)
    ]
    assert all(a < b for a, b in itertools.pairwise(changes)), changes


def test_haze_lies_between_clean_and_airlight(photos: torch.Tensor) -> None:
    for seed in range(5):
        params = syn.sample_haze_params(np.random.default_rng(seed))
        out = apply_haze(photos, params, seed)
        a = torch.tensor(params.airlight).view(1, 3, 1, 1)
        assert (out >= torch.minimum(photos, a) - 1e-6).all()
        assert (out <= torch.maximum(photos, a) + 1e-6).all()


def test_haze_with_given_depth_follows_eq4(photo: torch.Tensor) -> None:
    # Depth 0 on the left half, 2 (normalized to 1) on the right: t = 1 and t = exp(-beta).
    h, w = photo.shape[1:]
    depth = torch.zeros(h, w)
    depth[:, w // 2 :] = 2.0
    out = apply_haze(photo, HAZE, seed=0, depth=depth)
    t = float(np.exp(-HAZE.beta))
    a = torch.tensor(HAZE.airlight).view(3, 1, 1)
    expected_right = photo[:, :, w // 2 :] * t + a * (1 - t)
    assert torch.equal(out[:, :, : w // 2], photo[:, :, : w // 2])
    torch.testing.assert_close(out[:, :, w // 2 :], expected_right, atol=1e-6, rtol=0)


@pytest.mark.parametrize("veil", [syn.RAIN_VEIL, syn.DENSE_FOG], ids=["rain", "fog"])
def test_veil_is_eq4_at_even_depth(veil: syn.VeilRange, photo: torch.Tensor) -> None:
    """A veil draws t and a grey A inside its range; applied, I = J t + A (1 - t) everywhere,
    which a least-squares fit of the output on the input recovers."""
    rng = np.random.default_rng(7)
    drawn = [syn.sample_veil_params(rng, veil) for _ in range(200)]
    ts = np.array([np.exp(-p.beta) for p in drawn])
    grey = np.array([np.mean(p.airlight) for p in drawn])
    assert veil.transmission[0] <= ts.min() and ts.max() <= veil.transmission[1]
    assert ts.max() - ts.min() > 0.8 * (veil.transmission[1] - veil.transmission[0])
    assert veil.airlight[0] - 0.03 <= grey.min() and grey.max() <= veil.airlight[1] + 0.03
    assert all(max(p.airlight) - min(p.airlight) <= 0.06 for p in drawn)  # a grey, lightly cast
    params = drawn[0]
    t = float(np.exp(-params.beta))
    out = syn.apply_veil(photo, params)
    a = torch.tensor(params.airlight).view(3, 1, 1)
    torch.testing.assert_close(out, photo * t + a * (1 - t), atol=1e-6, rtol=0)
    fit = np.polyfit(photo[1].flatten().numpy(), out[1].flatten().numpy(), 1)
    assert fit[0] == pytest.approx(t, abs=1e-4)
    assert params_from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_mist_is_drawn_above_the_scene_and_stops_at_white() -> None:
    """DAYLIT_MIST's airlight is an offset above the grey level it is given, capped at white;
    without a level it is refused (an absolute draw would be a different veil)."""
    mist = syn.DAYLIT_MIST
    for level in (0.1, 0.45, 0.8):
        rng = np.random.default_rng(3)
        drawn = [syn.sample_veil_params(rng, mist, scene_level=level) for _ in range(200)]
        grey = np.array([np.mean(p.airlight) for p in drawn])
        low, high = level + mist.airlight[0], min(1.0, level + mist.airlight[1])
        assert low - 0.03 <= grey.min() and grey.max() <= high + 0.03
        assert grey.max() - grey.min() > 0.6 * (high - low)
        ts = np.array([np.exp(-p.beta) for p in drawn])
        assert mist.transmission[0] <= ts.min() and ts.max() <= mist.transmission[1]
    assert all(max(p.airlight) <= 1.0 for p in drawn)  # at 0.8 most draws reach white
    with pytest.raises(syn.InvalidParamsError, match="scene_level: a veil drawn above the scene"):
        syn.sample_veil_params(np.random.default_rng(0), mist)


def test_haze_depth_proxy_is_far_at_the_top_and_normalized(photos: torch.Tensor) -> None:
    params = HazeParams(beta=1.0, airlight=(0.9, 0.9, 0.9), field_weight=0.0, dark_weight=0.0)
    d = syn.make_depth_proxy(photos, params, seed=0)
    assert d.shape == (3, 1, 96, 128)
    assert d.amax().item() == pytest.approx(1.0)
    assert d[:, :, 0].mean() > d[:, :, -1].mean()  # ground plane: near at the bottom row
    assert d[:, :, -1].mean().item() == pytest.approx(params.near, abs=0.02)


# ---------------------------------------------------------------------------------- rain, Eq. 2


def test_rain_with_zero_density_or_intensity_returns_clean(photo: torch.Tensor) -> None:
    assert torch.equal(apply_rain(photo, _rain(density=0.0), seed=1), photo)
    assert torch.equal(apply_rain(photo, _rain(intensity=0.0), seed=1), photo)


def test_rain_only_adds_light(photos: torch.Tensor) -> None:
    for seed in range(5):
        params = syn.sample_rain_params(np.random.default_rng(seed))
        out = apply_rain(photos, params, seed)
        assert (out >= photos).all()
        assert (out > photos + 0.05).any()


def test_rain_sampler_leans_both_ways_and_draws_downpours() -> None:
    # What scripts/measure_rain.py reads on the paired sets: rain leaning 30-45 degrees
    # (Outdoor-Rain) either way, near-vertical rain (RainTrainH), and RainTrainH's thick veil
    draws = [syn.sample_rain_params(np.random.default_rng(seed)) for seed in range(400)]
    winds = np.array([np.mean([x.angle_deg for x in p.layers]) for p in draws])
    assert (winds > 30).mean() > 0.1 and (winds < -30).mean() > 0.1
    assert (np.abs(winds) < 10).mean() > 0.25
    for p in draws:  # one photo's rain falls one way
        angles = [x.angle_deg for x in p.layers]
        assert max(angles) - min(angles) < 20
    veils = np.array([p.veil for p in draws])
    assert 0.1 < (veils > 0.2).mean() < 0.3 and veils.max() < 0.35


def test_rain_is_clean_plus_streak_layers(photos: torch.Tensor) -> None:
    params = _rain()
    streaks = render_rain_streaks(3, 96, 128, params, seed=5)
    assert (streaks >= 0).all() and streaks.max() > 0.2
    expected = (photos + streaks).clamp(0, 1)
    torch.testing.assert_close(apply_rain(photos, params, seed=5), expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------- snow, Eq. 3


def test_snow_with_zero_density_returns_clean(photo: torch.Tensor) -> None:
    assert torch.equal(apply_snow(photo, _snow(density=0.0), seed=1), photo)


def test_snow_is_mask_composite_of_colour_over_clean(photos: torch.Tensor) -> None:
    params = _snow()
    m = render_snow_mask(3, 96, 128, params, seed=2)
    s = torch.tensor(params.colour).view(1, 3, 1, 1)
    expected = m * s + (1 - m) * photos
    torch.testing.assert_close(apply_snow(photos, params, seed=2), expected, atol=1e-7, rtol=0)


def test_opaque_snow_shows_snow_colour_where_mask_is_one(photo: torch.Tensor) -> None:
    params = _snow(density=80.0, opacity=1.0)
    m = render_snow_mask(1, *photo.shape[1:], params, seed=4)[0, 0]
    out = apply_snow(photo, params, seed=4)
    full, empty = m == 1.0, m == 0.0
    assert full.any() and empty.any()
    colour = torch.tensor(params.colour).view(3, 1)
    torch.testing.assert_close(out[:, full], colour.expand(3, int(full.sum())))
    assert torch.equal(out[:, empty], photo[:, empty])


def test_snow_veil_blends_towards_snow_colour(photo: torch.Tensor) -> None:
    params = _snow(density=0.0, veil=0.25)
    s = torch.tensor(params.colour).view(3, 1, 1)
    torch.testing.assert_close(apply_snow(photo, params, seed=0), 0.75 * photo + 0.25 * s)


def test_thin_snow_keeps_a_share_of_the_flakes_and_the_veil() -> None:
    dense = syn.sample_snow_params(np.random.default_rng(3), scale=1.0)
    thin = syn.thin_snow(dense, 0.1)
    for a, b in zip(dense.layers, thin.layers, strict=True):
        assert b.density == pytest.approx(0.1 * a.density)
        assert dataclasses.replace(b, density=a.density) == a  # nothing else changes
    assert thin.veil == pytest.approx(0.1 * dense.veil) and thin.colour == dense.colour
    # rendered: about a tenth of the mask's mass (the flakes are placed at random)
    mass = [float(render_snow_mask(1, 256, 256, p, seed=5).sum()) for p in (dense, thin)]
    assert 0.03 < mass[1] / mass[0] < 0.25
    with pytest.raises(syn.InvalidParamsError, match=r"thin_snow factor 0: expected a share"):
        syn.thin_snow(dense, 0)


# ---------------------------------------------------------------------------------- shapes, seeds


@pytest.mark.parametrize("kind", [*KINDS, "mixed"])
def test_output_range_shape_and_dtype(kind: str, photo: torch.Tensor) -> None:
    for image in (photo, photo[:, :17, :23], photo.unsqueeze(0).expand(2, -1, -1, -1)):
        out, _ = synthesize(image, kind, seed=11)
        assert out.shape == image.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
    out64, _ = synthesize(photo.double(), kind, seed=11)
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
def test_batch_shares_params_but_not_fields(kind: str, photo: torch.Tensor) -> None:
    batch = photo.unsqueeze(0).expand(2, -1, -1, -1).contiguous()
    out, params = synthesize(batch, kind, seed=8)
    assert not torch.equal(out[0], out[1])  # each image gets its own streaks/flakes/depth field
    single, same_params = synthesize(photo, kind, seed=8)
    assert same_params == params
    # The first image's fields are drawn first, so they are the same draws; a batched inverse
    # FFT may round differently (rain: 1e-6, a 4000th of an 8-bit step).
    torch.testing.assert_close(single, out[0], rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("kind", [*KINDS, "mixed"])
def test_same_seed_same_output_other_seed_other_output(kind: str, photos: torch.Tensor) -> None:
    a, pa = synthesize(photos, kind, seed=123)
    b, pb = synthesize(photos, kind, seed=123)
    c, _ = synthesize(photos, kind, seed=124)
    assert torch.equal(a, b) and pa == pb
    assert not torch.equal(a, c)


def test_mixed_picks_every_kind_and_records_it(photo: torch.Tensor) -> None:
    seen = set()
    for seed in range(30):
        out, params = synthesize(photo[:, :32, :32], "mixed", seed)
        seen.add(params.kind)
        assert torch.equal(apply_params(photo[:, :32, :32], params, field_seed(seed)), out)
    assert seen == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_params_round_trip_through_json(kind: str) -> None:
    for seed in range(10):
        params = syn.sample_params(kind, np.random.default_rng(seed), scale=1.5)
        d = json.loads(json.dumps(params.to_dict()))
        assert d["kind"] == kind
        assert type(params).from_dict(d) == params
        assert params_from_dict(d) == params


def test_bad_inputs_raise_their_own_errors(photo: torch.Tensor) -> None:
    with pytest.raises(syn.UnknownKindError, match="fog"):
        synthesize(photo, "fog", seed=0)
    with pytest.raises(syn.InvalidImageError, match=r"\(4, 8, 8\)"):
        synthesize(torch.zeros(4, 8, 8), "rain", seed=0)
    with pytest.raises(syn.InvalidImageError, match="float"):
        synthesize(torch.zeros(3, 8, 8, dtype=torch.uint8), "rain", seed=0)
    with pytest.raises(syn.InvalidSeedError):
        synthesize(photo, "rain", seed=-1)
    with pytest.raises(syn.InvalidParamsError, match="veil"):
        params_from_dict({k: v for k, v in _rain().to_dict().items() if k != "veil"})
    with pytest.raises(syn.InvalidParamsError, match="hail"):
        params_from_dict({"kind": "hail"})
    with pytest.raises(syn.InvalidImageError, match="depth"):
        apply_haze(photo, HAZE, seed=0, depth=torch.ones(5, 5))


def test_weather_synthesizer_is_reproducible_from_the_generator(photo: torch.Tensor) -> None:
    synth = WeatherSynthesizer()
    for kind in [*KINDS, "mixed"]:
        a = synth(photo, kind, np.random.default_rng(9))
        b = synth(photo, kind, np.random.default_rng(9))
        assert torch.equal(a, b) and a.shape == photo.shape
        assert not torch.equal(a, photo)
    with pytest.raises(syn.UnknownKindError):
        WeatherSynthesizer(kinds=("rain", "fog"))


# ---------------------------------------------------------------------------------- folders


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@needs_data
def test_synthesize_folder_is_byte_reproducible(tmp_path: Path) -> None:
    src = CLEAN / "CBSD68"
    first = synthesize_folder(src, tmp_path / "a", "mixed", count=4, seed=7)
    synthesize_folder(src, tmp_path / "b", "mixed", count=4, seed=7)
    synthesize_folder(src, tmp_path / "c", "mixed", count=4, seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 9 and a == b
    assert a["pairs.jsonl"] != c["pairs.jsonl"]
    lines = a["pairs.jsonl"].decode().splitlines()
    assert [json.loads(x) for x in lines] == first
    for r in first:
        target = np.asarray(Image.open(tmp_path / "a" / r["target"]))
        assert np.array_equal(target, read_clean_image(Path(r["source"])))
        degraded = np.asarray(Image.open(tmp_path / "a" / r["input"]))
        assert degraded.shape == target.shape and not np.array_equal(degraded, target)
        assert r["requested_kind"] == "mixed" and r["kind"] == r["params"]["kind"]


@needs_data
def test_regenerate_rebuilds_each_pair_byte_for_byte(tmp_path: Path) -> None:
    synthesize_folder(CLEAN / "CBSD68", tmp_path / "out", "rain", count=2, seed=1)
    synthesize_folder(CLEAN / "CBSD68", tmp_path / "out", "haze", count=1, seed=2)
    lines = (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the second run appended its line
    for line in lines:  # in the order written, so a reused stem ends with the same pair
        regenerate(json.loads(line), tmp_path / "again")
    written, rebuilt = _files(tmp_path / "out"), _files(tmp_path / "again")
    for name, data in rebuilt.items():
        assert written[name] == data, name


def _make_clean_dir(root: Path, n: int) -> Path:
    root.mkdir()
    grid = np.linspace(0, 255, 40 * 56).reshape(40, 56)
    for i in range(n):
        rgb = np.stack([grid, grid[::-1], np.full_like(grid, 40 * i)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / f"img{i}.png")
    return root


def test_folder_cycles_sources_with_unique_stems(tmp_path: Path) -> None:
    clean = _make_clean_dir(tmp_path / "clean", 2)
    records = synthesize_folder(clean, tmp_path / "out", "snow", count=5, seed=3)
    sources = [Path(r["source"]).name for r in records]
    assert sorted(set(sources)) == ["img0.png", "img1.png"]
    assert sources[:2].count("img0.png") == 1  # each pass uses every image once
    assert len({r["stem"] for r in records}) == 5
    assert len(list((tmp_path / "out" / "input").iterdir())) == 5


def test_regenerate_refuses_a_changed_source(tmp_path: Path) -> None:
    clean = _make_clean_dir(tmp_path / "clean", 1)
    (record,) = synthesize_folder(clean, tmp_path / "out", "haze", count=1, seed=0)
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(clean / "img0.png")
    with pytest.raises(syn.SourceChangedError, match=r"img0\.png"):
        regenerate(record, tmp_path / "again")


def test_regenerate_finds_a_moved_source(tmp_path: Path) -> None:
    clean = _make_clean_dir(tmp_path / "clean", 1)
    (record,) = synthesize_folder(clean, tmp_path / "out", "rain", count=1, seed=4)
    moved = (clean / "img0.png").rename(tmp_path / "moved.png")
    with pytest.raises(syn.SourceChangedError, match="missing"):
        regenerate(record, tmp_path / "again")
    regenerate(record, tmp_path / "again", source=moved)
    assert _files(tmp_path / "again") == {
        k: v for k, v in _files(tmp_path / "out").items() if k != "pairs.jsonl"
    }


def test_unreadable_and_missing_images_are_named(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    with pytest.raises(syn.NoCleanImagesError, match="clean"):
        synthesize_folder(clean, tmp_path / "out", "rain", count=1, seed=0)
    (clean / "broken.png").write_bytes(b"not a png")
    # the one error of image files opir cannot read, whoever reads them
    assert syn.UnreadableImageError is image_io.UnreadableImageError
    with pytest.raises(image_io.UnreadableImageError, match=r"broken\.png"):
        synthesize_folder(clean, tmp_path / "out", "rain", count=1, seed=0)


@pytest.mark.skipif(
    not (CLEAN / "EXIF_orientation" / "landscape_6.jpg").is_file(),
    reason=f"EXIF orientation samples not found under {CLEAN}",
)
def test_target_is_written_upright_from_exif(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "landscape_6.jpg").symlink_to(CLEAN / "EXIF_orientation" / "landscape_6.jpg")
    (record,) = synthesize_folder(clean, tmp_path / "out", "rain", count=1, seed=0)
    with Image.open(CLEAN / "EXIF_orientation" / "landscape_6.jpg") as raw:
        assert raw.size == (450, 600)  # stored portrait, orientation 6 turns it landscape
    with Image.open(tmp_path / "out" / record["target"]) as target:
        assert target.size == (600, 450) and target.mode == "RGB"
    assert (record["width"], record["height"]) == (600, 450)
