"""Training and validation data: paired folders, clean photos, the fixed validation split.

Paired sets are `<SET>/input/<stem>.*` (degraded) and `<SET>/target/<stem>.*` (clean), matched
by stem. The validation split is seeded and written down (`splits/validation.json`); training
never reads a file on it. Pairs that share one clean image (several haze levels or rain frames
of one scene) are split together, so no scene is on both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from opir_engine.image_io import list_images, read_rgb8
from opir_engine.model.config import CLASSES

VALIDATION_FRACTION = 0.15
SPLIT_SEED = 20261125


class DataError(Exception):
    """A data folder is missing or malformed."""


@dataclass(frozen=True)
class Pair:
    """One degraded/clean pair of a task ("rain", "snow", "haze" or "clean")."""

    task: str
    input: Path
    target: Path

    @property
    def group(self) -> str:
        """Pairs with byte-identical targets show one scene: they are split together."""
        return hashlib.sha256(self.target.read_bytes()).hexdigest()


def find_pairs(folder: Path, task: str) -> list[Pair]:
    """Pairs in `folder/input` and `folder/target` matched by stem; unmatched files are errors."""
    folder = Path(folder)
    if not (folder / "input").is_dir() or not (folder / "target").is_dir():
        raise DataError(f"{folder}: expected input/ and target/ subfolders")
    inputs = {p.stem: p for p in list_images(folder / "input")}
    targets = {p.stem: p for p in list_images(folder / "target")}
    missing = sorted(set(inputs) ^ set(targets))
    if missing:
        raise DataError(f"{folder}: stems without a partner: {', '.join(missing[:5])}")
    return [Pair(task, inputs[s], targets[s]) for s in sorted(inputs)]


def find_paired_sets(root: Path, task: str) -> list[Pair]:
    """All pairs of a task folder: either one set (input/, target/) or a folder of sets."""
    root = Path(root)
    if (root / "input").is_dir():
        return find_pairs(root, task)
    pairs = [
        pair
        for sub in sorted(root.iterdir())
        if (sub / "input").is_dir() and (sub / "target").is_dir()
        for pair in find_pairs(sub, task)
    ]
    if not pairs:
        raise DataError(f"{root}: no input/ and target/ folders found")
    return pairs


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def choose_validation(
    items: Sequence[str],
    groups: Sequence[str],
    seed: int = SPLIT_SEED,
    fraction: float = VALIDATION_FRACTION,
) -> list[str]:
    """Pick whole groups in a seeded order until at least `fraction` of the items."""
    wanted = math.ceil(fraction * len(items))
    by_group: dict[str, list[str]] = {}
    for item, group in zip(items, groups, strict=True):
        by_group.setdefault(group, []).append(item)
    chosen: list[str] = []
    for group in sorted(by_group, key=lambda g: _rank(g, seed)):
        if len(chosen) >= wanted:
            break
        chosen.extend(by_group[group])
    return sorted(chosen)


def pixel_digest(path: Path) -> str:
    """A digest of an image's decoded pixels: the same photo saved by another encoder (a
    benchmark's copy of a BSD photo as PNG) has other bytes but the same digest."""
    rgb = read_rgb8(path)
    return hashlib.sha256(str(tuple(rgb.shape)).encode() + rgb.numpy().tobytes()).hexdigest()


def make_split(
    data_root: Path,
    seed: int = SPLIT_SEED,
    paired_sets: Collection[str] | None = None,
    fractions: Mapping[str, float] | None = None,
) -> dict[str, list[str]]:
    """The validation split of the shared data: file paths relative to `data_root`.

    `paired_sets` ("rain/DDN-samples", ...) limits the paired sets to those a written-down split
    was made from, so a set added to the data later changes no split until one is made anew
    (None: every set there is). `fractions` holds out more of some sets ({"rain/X": 0.5});
    the others give VALIDATION_FRACTION.

    Every paired set of rain/ and haze/ gives its fraction of pairs (whole scenes); the clean
    photos give 15% of each folder (EXIF test folders excluded: they are for I/O tests);
    `snow_photos` holds real snowy photos without ground truth, scored by the head alone. A pair
    whose target is one of the clean photos (benchmarks reuse BSD photos) follows that photo: it
    is held out exactly when the photo is, so neither side ever trains on the other's image.
    """
    data_root = Path(data_root)
    fractions = fractions or {}
    split: dict[str, list[str]] = {"rain": [], "haze": [], "snow": [], "clean": []}
    clean_digest: dict[str, str] = {}  # digest -> the clean photo's name
    for folder in sorted((data_root / "clean").iterdir()):
        if not folder.is_dir() or folder.name.startswith("EXIF"):
            continue
        names = [str(p.relative_to(data_root)) for p in list_images(folder)]
        split["clean"] += choose_validation(names, names, seed)
        clean_digest.update({pixel_digest(data_root / n): n for n in names})
    held_clean = set(split["clean"])
    for task in ("rain", "haze", "snow"):
        task_dir = data_root / task
        if not task_dir.is_dir():
            continue
        for set_dir in sorted(p for p in task_dir.iterdir() if (p / "input").is_dir()):
            key = f"{task}/{set_dir.name}"
            if paired_sets is not None and key not in paired_sets:
                continue
            pairs = find_pairs(set_dir, task)
            if len(pairs) < 3:  # too small to hold out (the single Snow100K pair)
                continue
            free = []
            for p in pairs:
                copy_of = clean_digest.get(pixel_digest(p.target))
                if copy_of is None:
                    free.append(p)
                elif copy_of in held_clean:
                    split[task].append(str(p.input.relative_to(data_root)))
            names = [str(p.input.relative_to(data_root)) for p in free]
            fraction = fractions.get(key, VALIDATION_FRACTION)
            split[task] += choose_validation(names, [p.group for p in free], seed, fraction)
        split[task].sort()
    # Real snowy photos have no ground truth: a third of them (5 of 15) check the head alone
    photos = data_root / "snow" / "real_snow_samples" / "real"
    if photos.is_dir():
        names = [str(p.relative_to(data_root)) for p in list_images(photos)]
        split["snow_photos"] = choose_validation(names, names, seed, fraction=1 / 3)
    return split


def load_split(path: Path) -> dict[str, set[str]]:
    with open(path) as f:
        data = json.load(f)
    return {task: set(names) for task, names in data["validation"].items()}


def load_rgb(path: Path, max_side: int | None = None) -> torch.Tensor:
    """uint8 (3, H, W), EXIF orientation applied, long side at most `max_side` (area filter):
    `image_io.read_rgb8`, whose errors it raises."""
    return read_rgb8(path, max_side)


def class_index(task: str) -> int:
    return CLASSES.index(task)


def exclude(paths: Iterable[Path], excluded: Collection[str], data_root: Path) -> list[Path]:
    """Drop files whose path relative to data_root is in `excluded` (the validation split)."""
    kept = []
    for p in paths:
        try:
            rel = str(Path(p).resolve().relative_to(Path(data_root).resolve()))
        except ValueError:
            rel = None
        if rel not in excluded:
            kept.append(p)
    return kept


@dataclass(frozen=True)
class HeldOut:
    """What training must never read: the split's files by name, and the pixels of its clean
    images (held-out photos and the targets of held-out pairs) so that a copy of one under
    another name or encoding is refused too."""

    names: frozenset[str] = frozenset()
    digests: frozenset[str] = frozenset()

    @classmethod
    def from_split(cls, split: Path, data_root: Path) -> HeldOut:
        by_task = load_split(split)
        clean = [Path(data_root) / n for n in by_task.get("clean", ())]
        targets = [
            pair.target
            for task in ("rain", "haze", "snow")
            for name in by_task.get(task, ())
            for pair in [pair_of(Path(data_root) / name, task)]
        ]
        names = frozenset(set().union(*by_task.values()))
        return cls(names, frozenset(pixel_digest(p) for p in clean + targets))

    def holds(self, path: Path, data_root: Path, image: Path | None = None) -> bool:
        """Whether `path` (relative to data_root) is held out, or `image` (default: path) has
        the pixels of a held-out image."""
        if exclude([path], self.names, data_root) == []:
            return True
        return bool(self.digests) and pixel_digest(image or path) in self.digests


def pair_of(input_path: Path, task: str) -> Pair:
    """The pair of a paired set's input file: its target is the file of the same stem in the
    set's target/ folder."""
    target = next(p for p in list_images(input_path.parent.parent / "target")
                  if p.stem == input_path.stem)  # fmt: skip
    return Pair(task, input_path, target)


def kept_pairs(folders: Iterable[str], task: str, held_out: HeldOut, data_root: Path) -> list[Pair]:
    """The pairs of `folders` (see `find_paired_sets`) that are not held out, neither the input
    by name nor the target by its pixels."""
    pairs = [p for folder in folders for p in find_paired_sets(Path(folder), task)]
    return [p for p in pairs if not held_out.holds(p.input, data_root, image=p.target)]


def kept_images(folders: Iterable[str], held_out: HeldOut, data_root: Path) -> list[Path]:
    """The images of `folders` that are not held out (by name or pixels), in folder then name
    order."""
    paths = [p for folder in folders for p in list_images(Path(folder))]
    return [p for p in paths if not held_out.holds(p, data_root)]
