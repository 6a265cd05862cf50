"""The parameters of one degraded image: what is drawn, how it is drawn, and its JSON form.

`sample_*_params` draw a `RainParams`, `SnowParams` or `HazeParams` from a generator; a record
plus its field seed rebuilds the image exactly, so every value is a Python float (not a numpy
scalar) and survives a JSON round trip unchanged.

Sizes (streak length, flake radius, blur) are in pixels of a reference image whose short side is
`REFERENCE_SHORT_SIDE`; `scale` multiplies them for larger photos (`scale_for_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar

import numpy as np

from opir_engine.synthesis.errors import InvalidParamsError, UnknownKindError

KINDS: tuple[str, ...] = ("rain", "snow", "haze")
"""Degradations this module synthesizes; "mixed" picks one of them from the seed."""

REFERENCE_SHORT_SIDE = 400
"""Short side (px) at which the sampled sizes are meant; `scale_for_size` scales them up."""


@dataclass(frozen=True)
class StreakLayer:
    """One layer of rain streaks R_k (Eq. 2): seeds motion-blurred into lines.

    angle_deg: streak direction from vertical (positive leans right going down).
    length: streak length (px); width: gaussian sigma across the streak (px).
    density: streaks per 10,000 px; intensity: peak added brightness of one streak;
    jitter: each streak's brightness is intensity * U(1 - jitter, 1).
    """

    angle_deg: float
    length: float
    width: float
    density: float
    intensity: float
    jitter: float


@dataclass(frozen=True)
class FlakeLayer:
    """One layer of the snow mask M (Eq. 3): seeds drawn as soft discs, optionally smeared.

    size: radius of the opaque core (px); blur: gaussian sigma of the edge (px);
    motion: smear length (px, 0 = round flakes) along angle_deg from vertical;
    density: flakes per 10,000 px; opacity: peak M of one flake;
    jitter: each flake's opacity is opacity * U(1 - jitter, 1).
    """

    size: float
    blur: float
    motion: float
    angle_deg: float
    density: float
    opacity: float
    jitter: float


def _check_keys(cls: type, d: dict[str, Any], extra: Sequence[str] = ()) -> None:
    names = {f.name for f in fields(cls)} | set(extra)
    missing = names - set(d)
    unknown = set(d) - names
    if missing or unknown:
        raise InvalidParamsError(
            f"{cls.__name__}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
        )


def _check_record(cls: type, d: dict[str, Any]) -> None:
    """Raise `InvalidParamsError` unless `d` has the kind and exactly the keys of `cls`."""
    if d.get("kind") != cls.kind:
        raise InvalidParamsError(f"{cls.__name__}: kind is {d.get('kind')!r}, not {cls.kind!r}")
    _check_keys(cls, d, extra=("kind",))


def _layers_from_dicts(cls: type, d: dict[str, Any], layer: type, noun: str) -> tuple[Any, ...]:
    """The `layer` objects of the ``"layers"`` list of a checked rain or snow record dict."""
    try:
        return tuple(layer(**x) for x in d["layers"])
    except TypeError as e:
        raise InvalidParamsError(f"{cls.__name__}: bad {noun} layer ({e})") from e


class _Record:
    """`to_dict` of the parameter records, frozen dataclasses with a class-level `kind`."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: ``"kind"``, then every field; tuples become lists, and layers
        dicts."""
        d: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # every subclass is a dataclass
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [asdict(x) if is_dataclass(x) else x for x in value]
            d[f.name] = value
        return d


@dataclass(frozen=True)
class RainParams(_Record):
    """Everything drawn for one rain image: streak layers plus a veil.

    veil: strength in [0, 1) of the rain veil, a screen blend towards white
    (``J + veil (1 - J)``): far drops too small to resolve scatter light like haze, and
    the screen form keeps rain purely brightening, as Eq. 2 is.
    """

    kind: ClassVar[str] = "rain"
    layers: tuple[StreakLayer, ...]
    veil: float
    scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RainParams:
        """Inverse of `to_dict`."""
        _check_record(cls, d)
        layers = _layers_from_dicts(cls, d, StreakLayer, "streak")
        return cls(layers=layers, veil=float(d["veil"]), scale=float(d["scale"]))


@dataclass(frozen=True)
class SnowParams(_Record):
    """Everything drawn for one snow image: flake layers, snow colour S and a veil.

    colour: S of Eq. 3, near white (RGB); veil: strength in [0, 1) of a haze-like blend of J
    towards S before the flakes (falling snow thins the air like fog does).
    """

    kind: ClassVar[str] = "snow"
    layers: tuple[FlakeLayer, ...]
    colour: tuple[float, float, float]
    veil: float
    scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnowParams:
        """Inverse of `to_dict`."""
        _check_record(cls, d)
        layers = _layers_from_dicts(cls, d, FlakeLayer, "flake")
        r, g, b = (float(c) for c in d["colour"])
        return cls(layers=layers, colour=(r, g, b), veil=float(d["veil"]), scale=float(d["scale"]))


@dataclass(frozen=True)
class HazeParams(_Record):
    """Everything drawn for one haze image (Eq. 4).

    beta: scattering coefficient, t = exp(-beta d) with d normalized to [0, 1];
    airlight: A (RGB), bright and near grey.
    depth_kind: "proxy" (d built from the image, see `make_depth_proxy`) or "given"
    (d from a depth map passed to `apply_haze`, divided by its maximum).
    The rest shape the proxy: horizon (row of the horizon as a fraction of the height),
    near (relative depth of the bottom row), field_cells (size of the coarse random grid of
    the low-frequency field), and the weights of the ground-plane gradient, the random field
    and the dark-channel cue.
    """

    kind: ClassVar[str] = "haze"
    beta: float
    airlight: tuple[float, float, float]
    depth_kind: str = "proxy"
    horizon: float = 0.35
    near: float = 0.2
    field_cells: int = 4
    gradient_weight: float = 1.0
    field_weight: float = 0.5
    dark_weight: float = 0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HazeParams:
        """Inverse of `to_dict`."""
        _check_record(cls, d)
        r, g, b = (float(c) for c in d["airlight"])
        return cls(
            beta=float(d["beta"]),
            airlight=(r, g, b),
            depth_kind=str(d["depth_kind"]),
            horizon=float(d["horizon"]),
            near=float(d["near"]),
            field_cells=int(d["field_cells"]),
            gradient_weight=float(d["gradient_weight"]),
            field_weight=float(d["field_weight"]),
            dark_weight=float(d["dark_weight"]),
        )


WeatherParams = RainParams | SnowParams | HazeParams
_PARAM_CLASSES: dict[str, type] = {"rain": RainParams, "snow": SnowParams, "haze": HazeParams}


def params_from_dict(d: dict[str, Any]) -> WeatherParams:
    """Rebuild `RainParams`, `SnowParams` or `HazeParams` from `to_dict` output, by its kind."""
    cls = _PARAM_CLASSES.get(d.get("kind", ""))
    if cls is None:
        raise InvalidParamsError(f"params: unknown kind {d.get('kind')!r}")
    return cls.from_dict(d)


def _python_float(x: float) -> float:
    # Python floats (not numpy scalars), so JSON round trips are exact.
    return float(x)


def _lerp(a: float, b: float, w: float) -> float:
    return a + (b - a) * w


def sample_rain_params(rng: np.random.Generator, scale: float = 1.0) -> RainParams:
    """Draw rain parameters: 2-4 streak layers from far (short, thin, faint, dense) to near.

    Ranges were first tuned by eye against Rain13K, DDN and GT-RAIN photos, then matched to what
    `scripts/measure_rain.py` reads on the paired sets (docs/experiments.md, "Rain as the sets
    draw it"): the rain leans (+-20 degrees in Rain13K, 30-45 in Outdoor-Rain), so 60% of photos
    get a wind of 12-50 degrees either way and the rest fall near vertical; and a quarter of the
    photos are a downpour like RainTrainH's (denser streaks, a veil up to three times thicker).
    One wind angle is shared by all layers, each jittered a little, as the rain in one photo
    falls one way.
    """
    severity = rng.uniform(0.0, 1.0)
    slanted = rng.uniform() < 0.6
    lean = rng.uniform(12.0, 50.0) * rng.choice([-1.0, 1.0])
    wind = lean if slanted else rng.normal(0.0, 8.0)
    downpour = rng.uniform() < 0.25
    crowd = rng.uniform(1.5, 3.0) if downpour else 1.0
    layers = []
    n_layers = int(rng.integers(2, 5))
    for z in np.sort(rng.uniform(0.0, 1.0, n_layers)):  # z: 0 far .. 1 near
        layers.append(
            StreakLayer(
                angle_deg=_python_float(np.clip(wind + rng.normal(0.0, 2.0), -55.0, 55.0)),
                length=_python_float(_lerp(8.0, 35.0, z) * rng.uniform(0.7, 1.4)),
                width=_python_float(_lerp(0.4, 1.0, z) * rng.uniform(0.85, 1.2)),
                density=_python_float(
                    _lerp(60.0, 8.0, z) * _lerp(0.2, 1.5, severity) * crowd * rng.uniform(0.6, 1.4)
                ),
                intensity=_python_float(_lerp(0.12, 0.35, z) * rng.uniform(0.7, 1.3)),
                jitter=0.6,
            )
        )
    veil = rng.uniform(0.1, 0.35) if downpour else rng.uniform(0.0, 0.2) * severity
    return RainParams(layers=tuple(layers), veil=_python_float(veil), scale=_python_float(scale))


def sample_snow_params(rng: np.random.Generator, scale: float = 1.0) -> SnowParams:
    """Draw snow parameters: a fine grain, mid-size flakes, and sometimes large near flakes.

    Matches what the Snow100K masks show: a dense grain of 1-2 px dim specks (some smeared by
    their fall), sharper 2-4 px flakes, and a few large soft bokeh discs of low opacity.
    """
    severity = rng.uniform(0.0, 1.0)
    wind = rng.normal(0.0, 20.0)
    heavy = _lerp(0.3, 1.5, severity)

    def angle() -> float:
        return _python_float(np.clip(wind + rng.normal(0.0, 5.0), -70.0, 70.0))

    layers = [
        FlakeLayer(  # fine grain, far flakes
            size=_python_float(rng.uniform(0.0, 0.4)),
            blur=_python_float(rng.uniform(0.5, 0.8)),
            motion=_python_float(rng.choice([0.0, rng.uniform(1.0, 5.0)])),
            angle_deg=angle(),
            density=_python_float(rng.uniform(60.0, 400.0) * heavy),
            opacity=_python_float(rng.uniform(0.2, 0.6)),
            jitter=0.6,
        ),
        FlakeLayer(  # mid flakes
            size=_python_float(rng.uniform(0.5, 1.5)),
            blur=_python_float(rng.uniform(0.6, 1.1)),
            motion=_python_float(rng.choice([0.0, rng.uniform(1.0, 6.0)])),
            angle_deg=angle(),
            density=_python_float(rng.uniform(6.0, 30.0) * heavy),
            opacity=_python_float(rng.uniform(0.7, 1.0)),
            jitter=0.4,
        ),
    ]
    if rng.uniform() < 0.6:
        layers.append(
            FlakeLayer(  # large near flakes, out of focus
                size=_python_float(rng.uniform(2.0, 6.0)),
                blur=_python_float(rng.uniform(1.0, 2.5)),
                motion=_python_float(rng.choice([0.0, rng.uniform(1.0, 4.0)])),
                angle_deg=angle(),
                density=_python_float(rng.uniform(0.1, 0.8) * heavy),
                opacity=_python_float(rng.uniform(0.3, 0.8)),
                jitter=0.5,
            )
        )
    base = rng.uniform(0.85, 1.0)
    tint = rng.uniform(0.0, 0.03)  # snow light leans slightly blue
    colour = (_python_float(base - tint), _python_float(base), _python_float(min(1.0, base + tint)))
    veil = _python_float(rng.uniform(0.0, 0.35) * severity)
    return SnowParams(layers=tuple(layers), colour=colour, veil=veil, scale=_python_float(scale))


def thin_snow(params: SnowParams, factor: float) -> SnowParams:
    """`params` with `factor` (0-1] of its flakes in every layer and of its veil: light snowfall.

    `sample_snow_params` follows the Snow100K masks, a grain of specks everywhere; real snowfall
    photos often hold a few dozen flakes on a clear scene (the held-out dog, the street), which
    the classifier trained on the dense draws called clean.
    """
    if not 0.0 < factor <= 1.0:
        raise InvalidParamsError(f"thin_snow factor {factor}: expected a share in (0, 1]")
    layers = tuple(replace(layer, density=layer.density * factor) for layer in params.layers)
    return replace(params, layers=layers, veil=_python_float(params.veil * factor))


def sample_haze_params(rng: np.random.Generator) -> HazeParams:
    """Draw haze parameters: beta, a bright near-grey A, and the depth-proxy shape.

    beta over [0.3, 2.6] spans thin haze (far transmission 0.74) to dense (0.07), like the
    RESIDE and HazeRD levels; A in [0.7, 1.0] with a small colour cast, as RESIDE draws it.
    """
    base = rng.uniform(0.7, 1.0)
    r, g, b = (_python_float(np.clip(base + c, 0.0, 1.0)) for c in rng.uniform(-0.03, 0.03, 3))
    return HazeParams(
        beta=_python_float(rng.uniform(0.3, 2.6)),
        airlight=(r, g, b),
        depth_kind="proxy",
        horizon=_python_float(rng.uniform(0.2, 0.6)),
        near=_python_float(rng.uniform(0.1, 0.4)),
        field_cells=int(rng.integers(2, 7)),
        gradient_weight=_python_float(rng.uniform(0.5, 1.0)),
        field_weight=_python_float(rng.uniform(0.1, 0.6)),
        dark_weight=_python_float(rng.uniform(0.0, 0.35)),
    )


@dataclass(frozen=True)
class VeilRange:
    """Where `sample_veil_params` draws a scattering veil: transmission t and a grey airlight A,
    each uniform in (low, high); with `above_scene`, A's range is an offset above the grey level
    of the scene the veil covers."""

    transmission: tuple[float, float]
    airlight: tuple[float, float]
    above_scene: bool = False


RAIN_VEIL = VeilRange(transmission=(0.3, 0.95), airlight=(0.35, 0.95))
"""Rain seen through the mist of its own drops, as the heavy-rain model of Li et al. (CVPR 2019,
"Heavy Rain Image Restoration") renders it, I = t (J + R) + (1 - t) A: fitted on the training
pairs (docs/experiments.md, "The veil of real rain"), Outdoor-Rain has t 0.36 with A 0.59 and
GT-RAIN's webcams t 0.79 [0.41, 0.96] with a grey A; our own rain's veil brightens towards white
only (`RainParams.veil`)."""

DAYLIT_MIST = VeilRange(transmission=(0.3, 0.95), airlight=(0.05, 0.45), above_scene=True)
"""A mist lit by daylight, brighter than the scene it covers, of even depth over the frame. Rain
is seen through it: in every paired rain set the input is brighter than its target, and the
veils fitted on GT-RAIN's misty scenes lie 0.05-0.4 above the scene's grey level
(docs/experiments.md, "A mist brighter than the scene"), where `RAIN_VEIL`'s absolute A also
draws veils that darken a bright scene. Alone it is light fog over a forest or a street, which
the depth proxy of `sample_haze_params` never draws: its near ground is clear."""

DENSE_FOG = VeilRange(transmission=(0.05, 0.35), airlight=(0.55, 0.9))
"""Fog dense over the whole frame, as in Dense-Haze (t 0.07, A 0.72 fitted) and NH-HAZE2 (t 0.31,
A 0.81), where `sample_haze_params` draws the near ground clear (t up to 0.97)."""

DIM_SCENE = (0.2, 0.7)
"""The exposure (a factor on the clean image, uniform in this range) of a scene dimmed before
haze is laid on it: dark things under a bright veil, a far forest or a dusk scene, as in the
README's night launch, which the mostly daylit clean photos seldom hold."""


def sample_veil_params(
    rng: np.random.Generator, veil: VeilRange, scene_level: float | None = None
) -> HazeParams:
    """A scattering veil of even depth over the image (Eq. 4 with d = 1, so t = exp(-beta)):
    t and the grey level of A drawn from `veil`, A with a small colour cast as in
    `sample_haze_params`. A veil drawn `above_scene` needs `scene_level`, the mean of the clean
    image it will cover, and its grey level stops at white. Apply it with `apply_veil`."""
    if veil.above_scene and scene_level is None:
        raise InvalidParamsError("scene_level: a veil drawn above the scene needs its grey level")
    t = rng.uniform(*veil.transmission)
    base = rng.uniform(*veil.airlight)
    if veil.above_scene:
        base = min(1.0, base + scene_level)
    r, g, b = (_python_float(np.clip(base + c, 0.0, 1.0)) for c in rng.uniform(-0.03, 0.03, 3))
    return HazeParams(beta=_python_float(-np.log(t)), airlight=(r, g, b), depth_kind="given")


def sample_params(kind: str, rng: np.random.Generator, scale: float = 1.0) -> WeatherParams:
    """Draw parameters for `kind` ("rain", "snow" or "haze"); `scale` as in `scale_for_size`."""
    if kind == "rain":
        return sample_rain_params(rng, scale)
    if kind == "snow":
        return sample_snow_params(rng, scale)
    if kind == "haze":
        return sample_haze_params(rng)
    raise UnknownKindError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")


def scale_for_size(height: int, width: int) -> float:
    """Scale of the pixel sizes for an image of this size: short side / 400, at least 1."""
    return max(1.0, min(height, width) / REFERENCE_SHORT_SIDE)
