"""What a profile is asked for: sizes, model, device, runs; their parsing, checks and errors.

Errors speak of the values ("size 'huge' is not N, WxH or ..."), and name the setting at
fault in `ProfileError.setting`, which the command line shows as its option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMED_SIZES: dict[str, tuple[int, int]] = {
    "720p": (720, 1280),
    "1080p": (1080, 1920),
    "1440p": (1440, 2560),
    "4k": (2160, 3840),
}
COMPARE_MODELS: tuple[str, ...] = ("none", "promptir")


class ProfileError(Exception):
    """Base class of the errors a profile reports for bad settings.

    `setting` names the ProfileSettings field at fault (None when no one field is).
    """

    setting: str | None = None

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        if setting is not None:
            self.setting = setting


class SizeError(ProfileError):
    """A size entry cannot be parsed."""

    setting = "sizes"


class WeightsError(ProfileError):
    """The weights name or path does not resolve to a checkpoint."""

    setting = "weights"


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile was asked for (`opir profile`'s options), checked by `check_settings`.

    The model is `weights` (a shipped name or a .safetensors path) or `config` (a preset, with
    random weights), at most one of them; neither: the shipped weights `opir restore` uses.
    """

    config: str | None = None
    weights: str | None = None
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (512, 512))
    batch: int = 1
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    runs: int = 10
    warmup: int = 2
    breakdown: bool = True
    compare: str = "none"
    threads: int | None = None  # CPU threads for torch (None: torch's default)


def check_settings(settings: ProfileSettings) -> None:
    """Raise ProfileError (naming the setting) for counts out of range or an unknown model.

    The device and precision are checked where they are picked (opir_engine.devices).
    """
    for name, value, least in (("runs", settings.runs, 1), ("warmup", settings.warmup, 0),
                               ("batch", settings.batch, 1)):  # fmt: skip
        if value < least:
            raise ProfileError(f"{name} must be at least {least}, got {value}", setting=name)
    if settings.config is not None and settings.weights is not None:
        raise ProfileError(
            f"weights {settings.weights!r} and preset {settings.config!r} are two models: "
            "profile one at a time",
            setting="config",
        )
    if settings.compare not in COMPARE_MODELS:
        choices = ", ".join(COMPARE_MODELS)
        raise ProfileError(
            f"comparison model {settings.compare!r} is not one of {choices}", setting="compare"
        )
    if settings.compile and settings.warmup < 1:
        raise ProfileError(
            "compiling needs at least 1 warm-up run (the first call compiles), got 0",
            setting="warmup",
        )
    if settings.threads is not None and settings.threads < 1:
        raise ProfileError(f"threads must be at least 1, got {settings.threads}", setting="threads")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse "256,512,1080p,4k" -> [(256, 256), (512, 512), (1080, 1920), (2160, 3840)] (H, W).

    An entry is a side N (an N x N square), WIDTHxHEIGHT as resolutions are written
    (1920x1080 -> (1080, 1920)), or one of 720p, 1080p, 1440p, 4k.
    """
    sizes = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            raise SizeError(f"size list {text!r} has an empty entry")
        if entry in NAMED_SIZES:
            sizes.append(NAMED_SIZES[entry])
            continue
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", entry)
        if match is None:
            names = ", ".join(NAMED_SIZES)
            raise SizeError(f"size {raw.strip()!r} is not N, WxH or one of {names}")
        width = int(match.group(1))
        height = int(match.group(2)) if match.group(2) else width
        if width < 1 or height < 1:
            raise SizeError(f"size {raw.strip()!r} has a zero side")
        sizes.append((height, width))
    return sizes


def label_size(size: tuple[int, int]) -> str:
    """(H, W) -> "256" for squares, "1920x1080" (W x H) otherwise."""
    height, width = size
    return str(height) if height == width else f"{width}x{height}"
