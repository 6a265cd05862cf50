"""The inference engine: pretrained OPIR weights, padding, tiling, compile, task choice.

`OPIREngine` keeps no per-call state: every call takes an image and returns a `RestoreResult`,
so one engine can serve many images (or threads) in turn.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from opir_engine.checkpoint import CheckpointError, load_checkpoint
from opir_engine.model import CLASSES, OPIR
from opir_engine.padding import crop_to, pad_to_multiple
from opir_engine.tiling import process_tiled

DEFAULT_WEIGHTS = "opir-small-allinone"
CLASSIFY_SIDE = 512  # the head sees images at about the scale it was trained on
TASK_CHOICES = ("auto", "rain", "snow", "haze")
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EngineError(Exception):
    """Bad engine options (device, precision, task) or inputs."""


@dataclass(frozen=True)
class RestoreResult:
    """What `OPIREngine.restore` returns for one image."""

    image: torch.Tensor  # (3, H, W) float32 in [0, 1], on the CPU
    task: str  # the task used: "rain", "snow", "haze", or "clean" (returned unchanged)
    confidence: float  # the head's probability of the chosen class (1.0 for a given task)
    probabilities: dict[str, float]  # the head's probabilities per class
    uncertainty: torch.Tensor | None  # (1, H, W) UM of stage 1 (Eq. 11), None if passed through
    timings: dict[str, float] = field(default_factory=dict)  # ms: classify, restore, total
    flops: int = 0  # FLOPs spent on this image (model count x pixels processed)


def resolve_weights(name_or_path: str | Path) -> Path:
    """A shipped checkpoint's name (see `list_shipped`) or a path to a .safetensors file."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists() or len(path.parts) > 1:
        return path
    shipped = resources.files("opir_weights") / f"{name_or_path}.safetensors"
    if not shipped.is_file():
        names = ", ".join(n for n, _ in list_shipped()) or "none"
        raise CheckpointError(
            f"{name_or_path}: no shipped checkpoint of that name (shipped: {names})"
        )
    return Path(str(shipped))


def list_shipped() -> list[tuple[str, Path]]:
    """(name, path) of every checkpoint in the installed `opir_weights` package."""
    folder = resources.files("opir_weights")
    return sorted(
        (entry.name.removesuffix(".safetensors"), Path(str(entry)))
        for entry in folder.iterdir()
        if entry.name.endswith(".safetensors")
    )


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EngineError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    return dev


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in _PRECISIONS:
        raise EngineError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    return _PRECISIONS[precision]


def to_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL image, (H, W, 3) uint8/uint16/float array or (3, H, W) tensor -> (3, H, W) float."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise EngineError(f"expected an (H, W, 3) array, got shape {image.shape}")
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(image.dtype, 1.0)
        image = torch.from_numpy(image.astype(np.float32) / scale).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise EngineError(f"expected a (3, H, W) tensor, got {shape}")
    return image.float().clamp(0, 1)


class OPIREngine:
    """Restores images with an OPIR checkpoint.

    >>> engine = OPIREngine.from_pretrained("opir-small-allinone")
    >>> result = engine.restore(Image.open("rainy.jpg"), task="auto")
    """

    def __init__(
        self,
        model: OPIR,
        card: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        compile: bool,
        tile: int = 512,
        tile_overlap: int = 32,
        tiles_per_batch: int = 1,
    ) -> None:
        self.tiles_per_batch = tiles_per_batch
        self.model = model.to(device=device, dtype=dtype).eval()
        self.card = card
        self.device = device
        self.dtype = dtype
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.compiled = compile
        # Dynamic shapes: one graph serves every tile and image size, so a folder of mixed
        # sizes does not recompile per image.
        self._forward = torch.compile(model, dynamic=True) if compile else model
        self._classify = torch.compile(model.classify, dynamic=True) if compile else model.classify
        self.flops_per_pixel = self._count_flops_per_pixel()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_WEIGHTS,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = True,
        tile: int = 512,
        tile_overlap: int = 32,
        tiles_per_batch: int = 1,
    ) -> OPIREngine:
        """Load shipped weights by name, or a .safetensors file with its JSON card beside it."""
        dev = pick_device(device)
        dtype = pick_dtype(precision, dev)
        model, card = load_checkpoint(resolve_weights(name_or_path))
        if tile % model.multiple_of or tile <= 2 * tile_overlap:
            raise EngineError(
                f"tile must be a multiple of {model.multiple_of} and larger than twice the "
                f"overlap, got tile {tile}, overlap {tile_overlap}"
            )
        return cls(model, card, dev, dtype, compile, tile, tile_overlap, tiles_per_batch)

    @property
    def name(self) -> str:
        return str(self.card.get("name", "opir"))

    def _count_flops_per_pixel(self) -> float:
        """FLOPs of one forward per input pixel (convolutions dominate and scale with area)."""
        from torch.utils.flop_counter import FlopCounterMode

        side = 4 * self.model.multiple_of
        x = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
        weights = torch.zeros(1, len(CLASSES), device=self.device, dtype=self.dtype)
        weights[:, 1] = 1
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.model(x, weights)
        return counter.get_total_flops() / side**2

    # -- classification ------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, image: torch.Tensor) -> dict[str, float]:
        """The head's probabilities for (3, H, W), read from a copy at most CLASSIFY_SIDE long,
        so a 24 MP photo is classified as fast as a small one."""
        x = image[None].to(self.device, self.dtype)
        long_side = max(x.shape[-2:])
        if long_side > CLASSIFY_SIDE:
            scale = CLASSIFY_SIDE / long_side
            size = [max(1, round(s * scale)) for s in x.shape[-2:]]
            x = F.interpolate(x.float(), size=size, mode="area").to(self.dtype)
        padded, _ = pad_to_multiple(x, self.model.multiple_of)
        probs = torch.softmax(self._classify(padded).float(), dim=1)[0].cpu()
        return {name: float(p) for name, p in zip(CLASSES, probs, strict=True)}

    # -- restoration ---------------------------------------------------------------------------
    def restore(
        self, image: Image.Image | np.ndarray | torch.Tensor, task: str = "auto"
    ) -> RestoreResult:
        """Restore one image. task: "auto" (the head decides, once per image) or a task name."""
        if task not in TASK_CHOICES:
            raise EngineError(f"task must be one of {', '.join(TASK_CHOICES)}, got {task!r}")
        t0 = time.perf_counter()
        rgb = to_tensor(image)
        probs = self.classify(rgb)
        t1 = time.perf_counter()
        if task == "auto":
            chosen = max(probs, key=probs.__getitem__)
            confidence = probs[chosen]
            weights = torch.tensor([[probs[c] for c in CLASSES]])
            if chosen == "clean" and confidence >= self.model.config.clean_threshold:
                timings = {"classify": 1000 * (t1 - t0), "restore": 0.0}
                timings["total"] = timings["classify"]
                return RestoreResult(rgb, "clean", confidence, probs, None, timings, 0)
            if chosen == "clean":  # not sure enough to pass through: restore as the likeliest
                chosen = max(CLASSES[1:], key=probs.__getitem__)
        else:
            chosen, confidence = task, 1.0
            weights = F.one_hot(torch.tensor([CLASSES.index(task)]), len(CLASSES)).float()
        restored, uncertainty, pixels = self._run_tiled(rgb, weights)
        t2 = time.perf_counter()
        timings = {"classify": 1000 * (t1 - t0), "restore": 1000 * (t2 - t1)}
        timings["total"] = timings["classify"] + timings["restore"]
        flops = int(self.flops_per_pixel * pixels)
        return RestoreResult(restored, chosen, confidence, probs, uncertainty, timings, flops)

    def restore_batch(
        self, images: Iterable[Image.Image | np.ndarray | torch.Tensor], task: str = "auto"
    ) -> list[RestoreResult]:
        """Restore many images; each is classified and tiled on its own."""
        return [self.restore(image, task) for image in images]

    @torch.inference_mode()
    def _run_tiled(
        self, rgb: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Overlapping tiles blended with a smooth window; on CUDA out-of-memory, smaller tiles."""
        tile = self.tile
        while True:
            try:
                return self._process(rgb, weights, tile)
            except torch.OutOfMemoryError:
                if self.device.type != "cuda" or tile // 2 < max(128, 4 * self.tile_overlap):
                    raise
                torch.cuda.empty_cache()
                tile //= 2

    def _process(
        self, rgb: torch.Tensor, weights: torch.Tensor, tile: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        weights = weights.to(self.device, self.dtype)
        pixels = 0

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal pixels
            pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
            out = self._forward(x.to(self.device, self.dtype), weights.expand(x.shape[0], -1))
            return out.restored.float(), out.uncertainty.float()

        x = rgb[None]
        if max(x.shape[-2:]) <= tile:  # one piece: pad to the multiple, no blending needed
            padded, size = pad_to_multiple(x, self.model.multiple_of)
            restored, uncertainty = (crop_to(t, size) for t in run(padded))
        else:
            restored, uncertainty = process_tiled(
                x,
                run,
                tile,
                self.tile_overlap,
                self.model.multiple_of,
                tiles_per_batch=self.tiles_per_batch,
            )
        return restored[0].clamp(0, 1).cpu(), uncertainty[0].cpu(), pixels


def describe(engine: OPIREngine) -> dict[str, Any]:
    """Settings worth printing next to a run's results."""
    return {
        "weights": engine.name,
        "device": str(engine.device),
        "precision": str(engine.dtype).removeprefix("torch."),
        "compile": engine.compiled,
        "tile": engine.tile,
        "tile_overlap": engine.tile_overlap,
    }
