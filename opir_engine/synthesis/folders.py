"""Folders of synthetic pairs: plan them from a folder of clean photos, write them, rebuild them.

`synthesize_folder` writes ``input/<stem>.png`` (degraded), ``target/<stem>.png`` (clean) and a
JSON record per pair; `regenerate` rebuilds a pair from its record byte for byte. Clean photos
are found and read by `image_io` (`list_images`, `read_rgb8`), as for training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from opir_engine.image_io import IMAGE_SUFFIXES, list_images, read_rgb8
from opir_engine.image_io.atomic import write_atomically
from opir_engine.synthesis.degrade import apply_params, synthesize
from opir_engine.synthesis.errors import NoCleanImagesError, SourceChangedError, UnknownKindError
from opir_engine.synthesis.params import KINDS, params_from_dict, scale_for_size
from opir_engine.synthesis.seeds import PAIR_STREAM, SHUFFLE_STREAM, check_seed, field_seed


@dataclass(frozen=True)
class PlannedPair:
    """One pair `synthesize_folder` will write: output stem, clean source and seed."""

    index: int
    stem: str
    source: Path
    seed: int


def list_clean_images(clean_dir: Path) -> list[Path]:
    """Image files under `clean_dir` (recursively), sorted by relative path (`list_images`)."""
    files = list_images(clean_dir, recursive=True)
    if not files:
        raise NoCleanImagesError(f"{clean_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def plan_pairs(clean_dir: Path, count: int, seed: int) -> list[PlannedPair]:
    """Choose `count` sources from `clean_dir`, deterministically from `seed`.

    The images are shuffled once per pass and cycled when `count` exceeds their number; each
    pair gets its own seed derived from (seed, index) and a unique stem ``<index>_<source stem>``.
    """
    check_seed(seed)
    files = list_clean_images(clean_dir)
    rng = np.random.default_rng([SHUFFLE_STREAM, seed])
    order: list[int] = []
    while len(order) < count:
        order.extend(int(i) for i in rng.permutation(len(files)))
    plan = []
    for index in range(count):
        source = files[order[index]]
        state = np.random.SeedSequence([PAIR_STREAM, seed, index]).generate_state(1, np.uint64)
        pair_seed = int(state[0])
        plan.append(PlannedPair(index, f"{index:06d}_{source.stem}", source, pair_seed))
    return plan


def read_clean_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, EXIF orientation applied (`image_io.read_rgb8`).

    Raises:
        image_io.UnreadableImageError (and the other `ImageIOError`s): a file it cannot read.
    """
    return read_rgb8(path).permute(1, 2, 0).contiguous().numpy()


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32).div_(255.0)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _write_png(rgb: np.ndarray, path: Path) -> None:
    # Written atomically, so an interrupted run never leaves half a PNG.
    path.parent.mkdir(parents=True, exist_ok=True)

    def encode(fp: BinaryIO) -> None:
        Image.fromarray(rgb, "RGB").save(fp, format="PNG")

    write_atomically(path, encode)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_pair(
    record: dict[str, Any], source: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) as (H, W, 3) uint8 arrays rebuilt from a pair record.

    source: the clean image, where it has moved since the record was written (its bytes must
    still match the recorded SHA-256); by default the recorded path.
    """
    source = Path(record["source"] if source is None else source)
    if not source.is_file():
        raise SourceChangedError(f"{source}: source image of pair {record['stem']} is missing")
    if _sha256(source) != record["source_sha256"]:
        raise SourceChangedError(f"{source}: bytes differ from those pair {record['stem']} used")
    target = read_clean_image(source)
    params = params_from_dict(record["params"])
    degraded = apply_params(_to_tensor(target), params, field_seed(record["seed"]))
    return _to_uint8(degraded), target


def synthesize_pair(pair: PlannedPair, out_dir: Path, kind: str) -> dict[str, Any]:
    """Write one pair (``input/<stem>.png``, ``target/<stem>.png``) and return its record.

    The record holds the source path and SHA-256, the requested and the drawn kind, the seed
    and every parameter, so `regenerate` rebuilds the same bytes.
    """
    out_dir = Path(out_dir)
    target = read_clean_image(pair.source)
    h, w = target.shape[:2]
    degraded, params = synthesize(_to_tensor(target), kind, pair.seed, scale_for_size(h, w))
    record = {
        "index": pair.index,
        "stem": pair.stem,
        "source": str(pair.source.resolve()),
        "source_sha256": _sha256(pair.source),
        "requested_kind": kind,
        "kind": params.kind,
        "seed": pair.seed,
        "width": w,
        "height": h,
        "input": f"input/{pair.stem}.png",
        "target": f"target/{pair.stem}.png",
        "params": params.to_dict(),
    }
    _write_png(_to_uint8(degraded), out_dir / record["input"])
    _write_png(target, out_dir / record["target"])
    return record


def synthesize_folder(
    clean_dir: Path, out_dir: Path, kind: str, count: int, seed: int
) -> list[dict[str, Any]]:
    """Write `count` synthetic pairs from the photos in `clean_dir` to `out_dir`.

    Layout: ``out_dir/input/<stem>.png`` (degraded), ``out_dir/target/<stem>.png`` (clean,
    8-bit RGB, EXIF orientation applied) and one JSON line per pair appended to
    ``out_dir/pairs.jsonl``. Same arguments, same bytes. Stops at the first unreadable image
    (`UnreadableImageError`); a caller that wants to go on loops over `plan_pairs` and
    `synthesize_pair` itself.
    """
    if kind not in (*KINDS, "mixed"):
        raise UnknownKindError(f"kind {kind!r}: expected one of {', '.join(KINDS)}, mixed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out_dir / "pairs.jsonl", "a", encoding="utf-8") as log:
        for pair in plan_pairs(Path(clean_dir), count, seed):
            record = synthesize_pair(pair, out_dir, kind)
            log.write(json.dumps(record, sort_keys=True) + "\n")
            log.flush()
            records.append(record)
    return records


def regenerate(record: dict[str, Any], out_dir: Path, source: Path | None = None) -> dict[str, Any]:
    """Rebuild the pair of a `pairs.jsonl` record into `out_dir`, byte for byte; returns it.

    source: as in `render_pair`, for a clean image that has moved.
    """
    degraded, target = render_pair(record, source)
    _write_png(degraded, Path(out_dir) / record["input"])
    _write_png(target, Path(out_dir) / record["target"])
    return record
