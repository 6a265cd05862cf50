"""The inference engine: pretrained OPIR weights, padding, tiling, compile, task choice.

`OPIREngine` keeps no per-call state: every call takes an image and returns a `RestoreResult`,
so one engine can serve many images (or threads) in turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from opir_engine.devices import DeviceError, keep_freed_memory, pick_device, pick_dtype
from opir_engine.image_io import DEFAULT_MAX_PIXELS, DecodedImage
from opir_engine.inference import photo
from opir_engine.inference.dark_channel import dark_channel
from opir_engine.inference.photo import ImageInput
from opir_engine.inference.streaks import streak_energy
from opir_engine.inference.tile_budget import (
    HEADROOM,
    free_bytes,
    measure_bytes_per_pixel,
    pick_tile,
)
from opir_engine.inference.tiling import process_tiled
from opir_engine.inference.working_scale import (
    AUTO,
    MIN_SIDE,
    auto_sides,
    card_haze_sides,
    enlarge_to,
    haze_sides,
    shrink_to_side,
    transfer_correction,
)
from opir_engine.model import CLASSES, OPIR, TASKS, auto_decision
from opir_engine.model.padding import crop_to, pad_reflect_to
from opir_engine.weights import DEFAULT_WEIGHTS, load_checkpoint, resolve_weights

CLASSIFY_SIDE = 512  # the head sees images at about the scale it was trained on
# Photos longer than the working side are restored shrunk to it (working_scale.py). "auto"
# leaves photos of up to 1024 px (the validation photos are up to 800) as they were, and picks
# the side per photo for longer ones (bench/results/working_scale-*.md).
DEFAULT_WORK_SIDE: int | str | None = AUTO
TASK_CHOICES = ("auto", *TASKS)
# How the KPN's channel attention pools when a photo is tiled (issue 21): "shared" hands every
# tile the whole photo's means (OPIR.block_means); "local" pools over a window around each pixel
# (TLC); "global" lets each tile pool itself (the old behaviour: tiles show as rectangles).
# Measured on a hazy photo enlarged to 1200x900, 512-px tiles against one piece: shared 59.0 dB,
# local 40.4 dB (overlap 128), global 23.4 dB. An untiled photo restores the same in "shared"
# and "global".
POOLINGS = ("shared", "local", "global")
# A photo that fits in memory goes in one piece, padded up to a multiple of this (so a
# compiled graph sees a few shapes, see the class docstring).
ONE_PIECE_BUCKET = 512
_INT_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}


def classification_view(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """What the classifier sees of an image (3, H, W): a (1, 3, h, w) copy at most
    CLASSIFY_SIDE long (area filter), reflect-padded to the model's multiple.
    `classifier_training.py` trains the classifier on exactly this view."""
    x = shrink_to_side(image[None].float(), CLASSIFY_SIDE)
    return pad_reflect_to(
        x, -(-x.shape[-2] // multiple) * multiple, -(-x.shape[-1] // multiple) * multiple
    )


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
    work_size: tuple[int, int] | None = None  # (H, W) the model ran at; None if passed through
    # What the input was (alpha, bit depth, gray/RGB, EXIF, ICC, JPEG quality, its file): what
    # `save` writes back, as `opir restore` does. None only for results built by hand.
    source: DecodedImage | None = field(default=None, repr=False, compare=False)

    @property
    def alpha(self) -> torch.Tensor | None:
        """The input's alpha (1, H, W) float in [0, 1], copied through unchanged, or None."""
        return self.source.alpha if self.source is not None else None

    def to_pil(self) -> Image.Image:
        """The restored image as an 8-bit PIL image: "RGBA" when the input had alpha, else
        "RGB". Pillow has no 16-bit colour mode: `save` to PNG or TIFF keeps 16 bits."""
        return photo.to_pil(self.image, self.source)

    def save(
        self, path: str | os.PathLike[str], quality: int | None = None, overwrite: bool = False
    ) -> Path:
        """Write the restored image as `opir restore` writes it for this input, atomically.

        The format follows the suffix (.png .jpg .jpeg .webp .tif .tiff .bmp). Kept where the
        format holds them: alpha, 16 bits (PNG, TIFF), gray, EXIF and ICC profile. `quality`
        (1-100) is for JPEG (default: a JPEG input's own, else 95) and WebP (default
        lossless). The folder must exist. Returns the path written.

        Raises:
            ImageWriteError: `path` is the input file (never overwritten), or exists and not
                `overwrite`, or could not be written (nothing is left at `path`).
            UnsupportedImageError: a suffix opir does not write.
        """
        if self.source is None:
            raise EngineError("this result has no source image to write like; use to_pil()")
        return photo.save(self.image, self.source, path, quality, overwrite)


def to_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL image, (H, W), (H, W, 3) or (H, W, 4) array, or (3, H, W) tensor -> (3, H, W) float.

    Integer samples are scaled by their type's maximum (uint8 by 255, uint16 by 65535, so 16-bit
    data never passes through 8 bits); float samples are taken as [0, 1]. Gray is repeated over
    the three channels; an alpha channel is left out here (`restore` keeps it in
    `RestoreResult.source`, and `RestoreResult.save` writes it back).
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            image = np.asarray(image).astype(np.uint16)  # 16-bit gray: keep every level
        else:
            image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise EngineError(
                f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got {image.shape}"
            )
        if not image.flags.writeable:  # torch wants writable memory (Pillow's is read-only)
            image = image.copy()
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        image = image[:3] if image.shape[0] == 4 else image.expand(3, -1, -1)
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise EngineError(f"expected a (3, H, W) tensor, got {shape}")
    if image.dtype == torch.bool or not (image.is_floating_point() or image.dtype in _INT_MAX):
        raise EngineError(f"unsupported sample type {image.dtype}")
    if not image.is_floating_point():
        return image.float() / _INT_MAX[image.dtype]
    return image.float().clamp(0, 1)


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` means the device ran out of memory: torch's own error, or cuDNN's and
    cuBLAS's, which reach Python as a plain RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return any(m in text for m in ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED"))


class OPIREngine:
    """Restores images with an OPIR checkpoint.

    >>> engine = OPIREngine.from_pretrained("opir-small-allinone")
    >>> result = engine.restore("rainy.jpg", task="auto")
    >>> result.save("restored.jpg")  # as `opir restore rainy.jpg restored.jpg` writes it

    Shapes. The model needs sides that are multiples of `model.multiple_of`; the engine pads
    (reflect, bottom and right) and crops back. A side longer than `tile` is covered by tiles
    of exactly `tile`. With `buckets` on (the default when compiling), a side that fits in one
    tile is padded up to `tile / 2` or `tile`, so the compiled forward sees at most four image
    shapes per tile size, whatever the mix of sizes in a folder (and with `tiles_per_batch`
    > 1 the last chunk of tiles is filled up to a full batch): each shape compiles once, on
    its first image, then is reused. Padding never reaches the model's global statistics: a
    validity mask travels with the photo (a 4th channel through the tiles) and the KPN's
    channel-attention means read only the photo, so a bucketed photo restores as it does
    padded to the stride alone (without the mask a held-out 355x681 frame padded to 512 rows
    came out 32 dB PSNR away from its unbucketed restore). Dynamic-shape graphs did not avoid
    recompiles: measured with torch 2.13 on CPU, they recompile whenever an input crosses a
    size that PyTorch's convolution backend choice (20480 elements) or Inductor's reductions
    (4096 elements per U-Net level) guard on, so a folder of small mixed sizes recompiled
    (about 100 s each for the tiny config on 2 busy cores) at nearly every new size.
    """

    def __init__(
        self,
        model: OPIR,
        card: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        compile: bool,
        tile: int | None = None,
        tile_overlap: int | None = None,
        tiles_per_batch: int = 1,
        buckets: bool | None = None,
        work_side: int | str | None = DEFAULT_WORK_SIDE,
        pooling: str = "shared",
    ) -> None:
        m = model.multiple_of
        if pooling not in POOLINGS:
            raise EngineError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if tile_overlap is None:
            # With shared means the tiles differ from one piece only by what the convolutions
            # see past a tile's edge, which a strong haze correction amplifies: on Dense-Haze 51
            # (800x600) 512-px tiles agreed at 42.0 dB with overlap 32, 47.0 at 64, 73.9 at 128
            tile_overlap = 32 if pooling == "global" else 128
        if tile is not None and (
            tile % m or tile < 2 * m or tile_overlap < 0 or tile <= 2 * tile_overlap
        ):
            raise EngineError(
                f"tile must be a multiple of {m} (at least {2 * m}) and larger than twice the "
                f"overlap (>= 0), got tile {tile}, overlap {tile_overlap}"
            )
        if tiles_per_batch < 1:
            raise EngineError(f"tiles per batch must be at least 1, got {tiles_per_batch}")
        if (
            work_side != AUTO
            and work_side is not None
            and (isinstance(work_side, str) or work_side < MIN_SIDE)
        ):
            raise EngineError(
                f"working side must be at least {MIN_SIDE} pixels, {AUTO!r} or None (full "
                f"size), got {work_side!r}"
            )
        if device.type == "cpu":
            keep_freed_memory()  # maps reused instead of faulted in anew (devices.py says why)
        self.work_side = work_side
        self.pooling = pooling
        # "local" is a mode of the blocks, not other weights: the window comes from the config
        model.kpn.pool_window = model.config.pool_window if pooling == "local" else None
        self.model = model.to(device=device, dtype=dtype).eval()
        self.card = card
        try:
            self.haze_sides = card_haze_sides(card.get("haze_sides"))
        except ValueError as error:
            raise EngineError(f"the weights' card: {error}") from None
        self.device = device
        self.dtype = dtype
        self.tile = tile  # None: from the free memory, per photo (tile_budget.py)
        self._memory: tuple[float, int] | None = None  # (bytes per pixel, fixed), measured once
        self.tile_overlap = tile_overlap
        self.tiles_per_batch = tiles_per_batch
        self.compiled = compile
        self.buckets = compile if buckets is None else buckets
        # Only the forward is compiled, with static shapes (the buckets bound how many, see the
        # class docstring). The head reads one downscaled copy per image: a small share of the
        # time, not worth a second set of compiled graphs.
        self._forward = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
        self.flops_per_pixel, self.classify_flops_per_pixel = self._count_flops_per_pixel()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_WEIGHTS,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = True,
        tile: int | None = None,
        tile_overlap: int | None = None,
        tiles_per_batch: int = 1,
        buckets: bool | None = None,
        work_side: int | str | None = DEFAULT_WORK_SIDE,
        pooling: str = "shared",
    ) -> OPIREngine:
        """Load shipped weights by name, or a .safetensors file with its JSON card beside it.

        Raises CheckpointError (missing, truncated or mismatched weights, naming the file) and
        EngineError (device, precision or tile options).
        """
        try:
            dev = pick_device(device)
            dtype = pick_dtype(precision, dev)
        except DeviceError as e:
            raise EngineError(str(e)) from e
        model, card = load_checkpoint(resolve_weights(name_or_path))
        return cls(model, card, dev, dtype, compile, tile, tile_overlap, tiles_per_batch, buckets,
                   work_side, pooling)  # fmt: skip

    @property
    def name(self) -> str:
        return str(self.card.get("name", "opir"))

    def _count_flops_per_pixel(self) -> tuple[float, float]:
        """FLOPs per input pixel of one forward and of one classification (convolutions and
        the per-pixel operator dominate, and they scale with area), the TAM counted in its
        direct form as the paper defines the model (see profiling.profile.count_flops)."""
        from torch.utils.flop_counter import FlopCounterMode

        from opir_kernels.tam_modulation import tam_form

        side = 4 * self.model.multiple_of
        x = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
        weights = torch.zeros(1, len(CLASSES), device=self.device, dtype=self.dtype)
        weights[:, 1] = 1
        with torch.inference_mode(), FlopCounterMode(display=False) as counter, tam_form("direct"):
            self.model(x, weights)
        with torch.inference_mode(), FlopCounterMode(display=False) as classify_counter:
            self.model.classify(x)
        return counter.get_total_flops() / side**2, classify_counter.get_total_flops() / side**2

    def _padded_side(self, side: int, tile: int) -> int:
        """The length a side is padded to before the model sees it (see the class docstring)."""
        m = self.model.multiple_of
        if side > tile:  # tiled: tiles of exactly `tile` cover this axis
            # on the U-Net's grid (process_tiled's align) to the last tile, but for "global"
            return side if self.pooling == "global" else -(-side // m) * m
        if not self.buckets:
            return -(-side // m) * m
        half = -(-(tile // 2) // m) * m
        return half if side <= half else tile

    # -- classification ------------------------------------------------------------------------
    def classify(self, image: torch.Tensor) -> dict[str, float]:
        """The head's probabilities per class for an image (3, H, W), read from a copy at most
        CLASSIFY_SIDE long, so a 24 MP photo is classified as fast as a small one."""
        return self._classify_image(image)[0]

    def auto_task(self, probs: dict[str, float]) -> str:
        """What `task="auto"` does with the head's probabilities: "clean" (the image comes back
        unchanged) or the weather it restores (`auto_decision`, with this model's threshold)."""
        weights = torch.tensor([[probs[c] for c in CLASSES]])
        return CLASSES[int(auto_decision(weights, self.model.config.clean_threshold))]

    @torch.inference_mode()
    def _classify_image(self, image: torch.Tensor) -> tuple[dict[str, float], int]:
        """(probabilities, pixels the head saw) for (3, H, W)."""
        x = classification_view(image.to(self.device, torch.float32), self.model.multiple_of)
        probs = torch.softmax(self.model.classify(x.to(self.dtype)).float(), dim=1)[0].cpu()
        pixels = x.shape[-2] * x.shape[-1]
        return {name: float(p) for name, p in zip(CLASSES, probs, strict=True)}, pixels

    # -- restoration ---------------------------------------------------------------------------
    def restore(
        self,
        image: ImageInput,
        task: str = "auto",
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> RestoreResult:
        """Restore one image: a path (str or Path), a PIL image, an array or a tensor (see
        `to_tensor`), or a `DecodedImage`.

        A path is decoded as `opir restore` decodes it (`image_io.read_image`: EXIF orientation
        applied, 16-bit kept, `max_pixels` its limit; it raises the `ImageIOError` naming the
        file); `result.save(path)` then writes what `opir restore` writes for that file. The
        input's alpha, bit depth and metadata ride along in `result.source` (`photo.py`).

        task "auto": the head decides once per image, from a downscaled copy, and every tile
        uses that decision; an image it calls clean with at least `clean_threshold` confidence
        comes back unchanged. A task name ("rain", "snow", "haze") uses that task's one-hot
        embedding; the head's probabilities are still reported.
        """
        if task not in TASK_CHOICES:
            raise EngineError(f"task must be one of {', '.join(TASK_CHOICES)}, got {task!r}")
        source = photo.decode_input(image, to_tensor, max_pixels)
        t0 = time.perf_counter()
        rgb = to_tensor(source.rgb)
        probs, classify_pixels = self._classify_image(rgb)
        classify_flops = int(self.classify_flops_per_pixel * classify_pixels)
        t1 = time.perf_counter()
        if task == "auto":
            chosen = self.auto_task(probs)
            confidence = probs[chosen]
            # the probability-weighted task embedding: mixed weather gets a mixed operator
            weights = torch.tensor([[probs[c] for c in CLASSES]])
            if chosen == "clean":
                timings = {"classify": 1000 * (t1 - t0), "restore": 0.0}
                timings["total"] = timings["classify"]
                unchanged = rgb.cpu()
                return RestoreResult(unchanged, "clean", confidence, probs, None, timings,
                                     classify_flops, source=source)  # fmt: skip
        else:
            chosen, confidence = task, 1.0
            weights = F.one_hot(torch.tensor([CLASSES.index(task)]), len(CLASSES)).float()
        restored, uncertainty, pixels, work_size = self._restore_at_working_scale(rgb, weights)
        t2 = time.perf_counter()
        timings = {"classify": 1000 * (t1 - t0), "restore": 1000 * (t2 - t1)}
        timings["total"] = timings["classify"] + timings["restore"]
        flops = int(self.flops_per_pixel * pixels) + classify_flops
        return RestoreResult(restored, chosen, confidence, probs, uncertainty, timings, flops,
                             work_size, source)  # fmt: skip

    def restore_batch(
        self, images: Iterable[ImageInput], task: str = "auto"
    ) -> list[RestoreResult]:
        """Restore many images, in order; each is classified and tiled on its own."""
        return [self.restore(image, task) for image in images]

    @torch.inference_mode()
    def _restore_at_working_scale(
        self, rgb: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
        """(restored (3, H, W), uncertainty (1, H, W), pixels processed, (h, w) the model ran
        at). A photo longer than the working side is restored shrunk to it and the model's
        correction is carried back to full size (`working_scale.py` says why); with "auto",
        at each side `auto_sides` gives for it, keeping the one that leaves the least
        line-like energy; a hazy photo under weights whose card lists `haze_sides`, at those
        its haze weight reaches, keeping the one with the least dark channel (all the sides'
        pixels are counted as processed)."""
        if self.work_side != AUTO:
            return self._restore_at_side(rgb, weights, self.work_side)  # type: ignore[arg-type]
        haze, veil_sides = CLASSES.index("haze"), None
        if int(weights[0].argmax()) == haze:
            veil_sides = haze_sides(*rgb.shape[-2:], self.haze_sides, float(weights[0, haze]))
        if veil_sides:  # the card's sides, judged by the veil left
            sides, score = veil_sides, dark_channel
        else:
            sides, score = auto_sides(*rgb.shape[-2:]), streak_energy
        if len(sides) == 1:  # nothing to choose
            return self._restore_at_side(rgb, weights, sides[0])
        best, best_score, processed = None, float("inf"), 0
        for side in sides:
            candidate = self._restore_at_side(rgb, weights, side)
            processed += candidate[2]
            value = score(candidate[0])
            if value < best_score:
                best, best_score = candidate, value
        restored, uncertainty, _, work_size = best  # type: ignore[misc]
        return restored, uncertainty, processed, work_size

    def _restore_at_side(
        self, rgb: torch.Tensor, weights: torch.Tensor, side: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
        """`_restore_at_working_scale` at one working side (None: full size)."""
        small = shrink_to_side(rgb, side) if side else rgb
        restored, uncertainty, pixels = self._run_tiled(small, weights)
        if small is not rgb:
            size = tuple(rgb.shape[-2:])
            restored = transfer_correction(rgb, small, restored)
            uncertainty = enlarge_to(uncertainty, size).clamp_(min=0)  # type: ignore[arg-type]
        return restored, uncertainty, pixels, tuple(small.shape[-2:])  # type: ignore[return-value]

    @torch.inference_mode()
    def _run_tiled(
        self, rgb: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(restored (3, H, W), uncertainty (1, H, W), pixels processed); on CUDA
        out-of-memory, retries with tiles half as long."""
        tile = self.tile or self._tile_for(*rgb.shape[-2:])
        m = self.model.multiple_of
        floor = max(128, -(-(2 * self.tile_overlap + 1) // m) * m, 2 * m)
        while True:
            try:
                return self._process(rgb, weights, tile)
            except RuntimeError as error:  # torch.OutOfMemoryError is one as well
                if not _out_of_memory(error):
                    raise
                smaller = tile // 2 // self.model.multiple_of * self.model.multiple_of
                if self.device.type != "cuda" or smaller < floor:
                    raise
            # Out of the except block, the failed attempt's tensors are released and can go back.
            torch.cuda.empty_cache()
            tile = smaller

    def _memory_per_pixel(self) -> tuple[float, int]:
        """(bytes per pixel, fixed bytes) of one forward, measured on first use."""
        if self._memory is None:
            weights = torch.zeros(1, len(CLASSES), device=self.device, dtype=self.dtype)
            weights[:, 1] = 1

            def forward(side: int) -> object:
                x = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
                return self.model(x, weights)

            self._memory = measure_bytes_per_pixel(forward)
        return self._memory

    def _tile_for(self, height: int, width: int) -> int:
        """The tile for a photo when none was given: one piece if it fits in the free memory
        (its sides padded up to ONE_PIECE_BUCKET multiples), else the largest tile that fits."""
        per_pixel, fixed = self._memory_per_pixel()
        m = self.model.multiple_of
        tile = pick_tile(free_bytes(self.device), per_pixel, height, width, m, fixed=fixed)
        if tile is None:
            return -(-max(height, width, ONE_PIECE_BUCKET) // ONE_PIECE_BUCKET) * ONE_PIECE_BUCKET
        return max(tile, -(-(2 * self.tile_overlap + 1) // m) * m)

    def _shared_means(self, rgb: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The KPN blocks' means over the whole photo rgb (3, H, W), for every tile: from the
        photo itself when a forward on it fits in the free memory, else from the largest
        shrunken copy that does (then they only approximate it: 43.9 dB against one piece for
        a copy of half the side, still without seams, since every tile shares them)."""
        per_pixel, fixed = self._memory_per_pixel()
        budget = HEADROOM * free_bytes(self.device) - fixed
        side = max(rgb.shape[-2:])
        if rgb.shape[-2] * rgb.shape[-1] * per_pixel > budget:
            side = max(MIN_SIDE, int(side * (budget / per_pixel / rgb[0].numel()) ** 0.5))
        copy = shrink_to_side(rgb, side)
        m, (height, width) = self.model.multiple_of, copy.shape[-2:]
        x = _marked(copy, -(-height // m) * m, -(-width // m) * m).to(self.device, self.dtype)
        return self.model.block_means(x[:, :3].contiguous(), weights, x[:, 3:].contiguous())

    def _process(
        self, rgb: torch.Tensor, weights: torch.Tensor, tile: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One attempt of `_run_tiled` at this tile size."""
        weights = weights.to(self.device, self.dtype)
        height, width = rgb.shape[-2:]
        x = _marked(rgb, self._padded_side(height, tile), self._padded_side(width, tile))
        tiled = max(x.shape[-2:]) > tile
        full = self.tiles_per_batch
        pixels = 0
        means = self._shared_means(rgb, weights) if tiled and self.pooling == "shared" else None

        def run(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal pixels
            count = batch.shape[0]
            if self.compiled and tiled and count < full:
                # The last chunk of tiles is padded to a full batch: one shape, one graph.
                batch = torch.cat([batch, batch[-1:].expand(full - count, -1, -1, -1)])
            pixels += batch.shape[0] * batch.shape[-2] * batch.shape[-1]
            # A tile is a view into the whole image, its strides set by the image's width, and
            # the compiled graph guards on strides: without a dense copy every new width would
            # recompile (minutes on CPU), and the ninth would hit Dynamo's recompile limit.
            batch = batch.to(self.device, self.dtype).contiguous()
            image, valid = batch[:, :3].contiguous(), batch[:, 3:].contiguous()
            out = self._forward(image, weights.expand(batch.shape[0], -1), valid, means)
            return out.restored[:count].float(), out.uncertainty[:count].float()

        if tiled:
            restored, uncertainty = process_tiled(
                x, run, tile, self.tile_overlap, self.model.multiple_of, tiles_per_batch=full,
                align=1 if self.pooling == "global" else self.model.multiple_of,
            )  # fmt: skip
        else:
            restored, uncertainty = run(x)
        restored = crop_to(restored, (height, width))[0].clamp_(0, 1).cpu()
        return restored, crop_to(uncertainty, (height, width))[0].cpu(), pixels


def _marked(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """rgb (3, H, W) reflect-padded to (1, 4, height, width) with a 4th channel marking the
    image (1) against the padding (0). The mark travels with the photo through the tiles: the
    model's global means read only the image (`OPIR.forward`'s valid), so a photo padded up to a
    shape bucket restores as it does padded to the stride alone."""
    marked = torch.cat([rgb[None], torch.ones_like(rgb[None, :1])], dim=1)
    x = pad_reflect_to(marked, height, width)
    x[:, 3:, rgb.shape[-2] :] = 0
    x[:, 3:, :, rgb.shape[-1] :] = 0
    return x


def describe(engine: OPIREngine) -> dict[str, Any]:
    """Settings worth printing next to a run's results."""
    return {
        "weights": engine.name,
        "device": str(engine.device),
        "precision": str(engine.dtype).removeprefix("torch."),
        "compile": engine.compiled,
        "tile": engine.tile if engine.tile is not None else "auto",
        "pooling": engine.pooling,
        "tile_overlap": engine.tile_overlap,
        "work_side": engine.work_side,
    }
