"""Synthesize rain, snow and haze on clean photos with the OPIR paper's physical models.

Section 3.1 of the paper models each degradation of a clean image J:

- rain (Eq. 2): ``I = J + sum_k R_k``, additive streak layers R_k;
- snow (Eq. 3): ``I = M * S + (1 - M) * J``, a flake mask M over a snow colour S;
- haze (Eq. 4): ``I = J t + A (1 - t)``, with transmission ``t = exp(-beta d)`` over a depth d.

Two uses share this package: training data loaders degrade clean crops on the fly
(`WeatherSynthesizer`, a few ms per 256x256 crop on one CPU core), and `opir synth` writes
reproducible pairs to disk (`synthesize_folder`, `regenerate`).

The parts: `params` (what is drawn per image, and its JSON form), `seeds` (one seed split into
independent streams), `fields` (streaks, flake mask, depth proxy), `degrade` (Eq. 2-4 and
`synthesize`), `folders` (pairs on disk) and `errors`. Randomness: `synthesize(clean, kind,
seed)` draws the parameters from one stream of its seed and the random fields from another, so a
parameter record plus its seed rebuilds a degraded image exactly (same bytes on the same
numpy/torch build).

Sizes (streak length, flake radius, blur) are in pixels of a reference image whose short side is
`REFERENCE_SHORT_SIDE` (the real rain and snow benchmarks are about 384-480 px high); `scale`
multiplies them for larger photos, and densities are per 10,000 reference pixels.
"""

# The one error for image files opir cannot read, named here too for `except` sites that
# caught it from this package.
from opir_engine.image_io import UnreadableImageError
from opir_engine.synthesis.degrade import (
    WeatherSynthesizer,
    apply_haze,
    apply_params,
    apply_rain,
    apply_snow,
    apply_veil,
    synthesize,
)
from opir_engine.synthesis.errors import (
    InvalidImageError,
    InvalidParamsError,
    InvalidSeedError,
    NoCleanImagesError,
    SourceChangedError,
    SynthesisError,
    UnknownKindError,
)
from opir_engine.synthesis.fields import make_depth_proxy, render_rain_streaks, render_snow_mask
from opir_engine.synthesis.folders import (
    PlannedPair,
    list_clean_images,
    plan_pairs,
    read_clean_image,
    regenerate,
    render_pair,
    synthesize_folder,
    synthesize_pair,
)
from opir_engine.synthesis.params import (
    DAYLIT_MIST,
    DENSE_FOG,
    DIM_SCENE,
    KINDS,
    RAIN_VEIL,
    REFERENCE_SHORT_SIDE,
    FlakeLayer,
    HazeParams,
    RainParams,
    SnowParams,
    StreakLayer,
    VeilRange,
    WeatherParams,
    params_from_dict,
    sample_haze_params,
    sample_params,
    sample_rain_params,
    sample_snow_params,
    sample_veil_params,
    scale_for_size,
    thin_snow,
)
from opir_engine.synthesis.seeds import field_seed

__all__ = [
    "DAYLIT_MIST",
    "DENSE_FOG",
    "DIM_SCENE",
    "KINDS",
    "RAIN_VEIL",
    "REFERENCE_SHORT_SIDE",
    "FlakeLayer",
    "HazeParams",
    "InvalidImageError",
    "InvalidParamsError",
    "InvalidSeedError",
    "NoCleanImagesError",
    "PlannedPair",
    "RainParams",
    "SnowParams",
    "SourceChangedError",
    "StreakLayer",
    "SynthesisError",
    "UnknownKindError",
    "UnreadableImageError",
    "VeilRange",
    "WeatherParams",
    "WeatherSynthesizer",
    "apply_haze",
    "apply_params",
    "apply_rain",
    "apply_snow",
    "apply_veil",
    "field_seed",
    "list_clean_images",
    "make_depth_proxy",
    "params_from_dict",
    "plan_pairs",
    "read_clean_image",
    "regenerate",
    "render_pair",
    "render_rain_streaks",
    "render_snow_mask",
    "sample_haze_params",
    "sample_params",
    "sample_rain_params",
    "sample_snow_params",
    "sample_veil_params",
    "scale_for_size",
    "synthesize",
    "synthesize_folder",
    "synthesize_pair",
    "thin_snow",
]
