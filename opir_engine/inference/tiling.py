"""Process large images in overlapping tiles, blended without seams, in bounded memory.

Pure functions: `plan_tiles` places the tiles, `blend_window` weighs one tile's output, and
`process_tiled` runs a function over the tiles and blends the outputs into full-size buffers.

Blending. Each tile's output is multiplied by a separable window and added to an accumulator, the
window itself to a weight map, and the result is the accumulator divided by the weights. Along a
tile side that borders another tile, the window is 0 for `margin` pixels (a model's output is
least reliable next to a tile edge, where it saw padding instead of image), then rises over
`overlap - 2 * margin` pixels as `sin^2`, then stays 1. Sides on the image border keep weight 1
up to the edge, so the border is not darkened or left to the division. Where two tiles overlap by
exactly `overlap`, their ramps are complementary (`sin^2 + cos^2 = 1`), so the weights already sum
to 1; where they overlap more, the division normalises. Every pixel has positive total weight:
the pixels a tile weighs 0 lie within `margin <= overlap / 2` of its inner edges, and consecutive
tiles are at most `tile - overlap` apart.

Exactness. For a function whose output at a pixel depends only on inputs within `r` pixels (a
receptive-field radius), the blended result equals the untiled result whenever `margin >= r`
(and so `overlap >= 2 r`): every output with positive weight saw the same inputs as untiled.
The exception is a tile padded up to `multiple_of`, which sees reflected pixels where the untiled
function saw its own padding. The default `margin = overlap // 4` blends over half the overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Tile",
    "TileArgumentError",
    "TileInputError",
    "TileOutputError",
    "TilingError",
    "blend_window",
    "plan_tiles",
    "process_tiled",
]

TileOutputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


class TilingError(ValueError):
    """Base class for tiling errors."""


class TileArgumentError(TilingError):
    """A tile size, overlap, margin, multiple or batch count is invalid."""


class TileInputError(TilingError):
    """The image to tile does not have the expected shape."""


class TileOutputError(TilingError):
    """The tile function returned something that cannot be blended."""


@dataclass(frozen=True)
class Tile:
    """One tile: rows `y0:y1` and columns `x0:x1` of the image (end-exclusive)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def plan_tiles(
    height: int, width: int, tile: int, overlap: int, multiple_of: int = 1, *, align: int = 1
) -> list[Tile]:
    """Return tiles covering a `height x width` image, row by row.

    Along each axis the fewest tiles of side `tile` that overlap by at least `overlap` are spread
    evenly from the first edge to the last (the last tile ends at the image edge instead of being
    shrunk), so every tile of a plan has the same shape and a compiled model sees one shape per
    image size. An axis no longer than `tile` gets a single tile spanning it. `multiple_of` only
    checks that `tile` is a multiple of it: `process_tiled` pads a tile that spans a short axis.

    `align`: every start but the last (which ends at the image edge) is a multiple of it. A
    U-Net that halves its maps L times computes, in a tile that starts at a multiple of 2^L, on
    the same grid of coarse pixels as on the whole image, so the tile's output can match the
    whole image's (on a side padded to 2^L, the last start is one too).
    """
    _check_tile_args(tile, overlap, multiple_of)
    if not isinstance(align, int) or align < 1 or tile - overlap < align:
        raise TileArgumentError(
            f"align must be a positive integer at most tile - overlap ({tile - overlap}); "
            f"got {align!r}"
        )
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size < 1:
            raise TileArgumentError(f"image {name} must be a positive integer; got {size!r}")
    rows = _plan_axis(height, tile, overlap, align)
    cols = _plan_axis(width, tile, overlap, align)
    return [Tile(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]


def blend_window(
    height: int,
    width: int,
    overlap: int,
    *,
    top: bool,
    bottom: bool,
    left: bool,
    right: bool,
    margin: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the blending window `(1, 1, height, width)` of one tile.

    `top`, `bottom`, `left`, `right` say which sides border another tile: those get `margin`
    zeros then a `sin^2` ramp over `overlap - 2 * margin` pixels; the other sides (on the image
    border) keep weight 1 to the edge. `margin` defaults to `overlap // 4`.
    """
    margin = _check_margin(overlap, margin)
    rows = _window_1d(height, overlap, margin, top, bottom, "height")
    cols = _window_1d(width, overlap, margin, left, right, "width")
    window = rows[:, None] * cols[None, :]
    return window.to(dtype=dtype, device=device)[None, None]


def process_tiled(
    image: torch.Tensor,
    fn: Callable[[torch.Tensor], TileOutputs],
    tile: int,
    overlap: int,
    multiple_of: int = 1,
    *,
    margin: int | None = None,
    tiles_per_batch: int = 1,
    align: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply `fn` to `image` `(B, C, H, W)` tile by tile and blend the outputs seamlessly.

    `fn` maps a batch of tiles `(N, C, h, w)` (N = B x tiles in the call, h and w multiples of
    `multiple_of`) to a tensor `(N, C', h, w)` or a tuple/list of such tensors, each with its own
    channel count (an image and a 1-channel uncertainty map, say); the result has the same form
    at full size, `(B, C', H, W)`, in the dtype `fn` returned. A tile that spans an axis shorter
    than `tile` is padded up to `multiple_of` (reflect where the tile allows, else replicate:
    a continuation of the image, not a black edge for the model to restore), and its output is
    cropped back. Outputs may come back on another device than `image` (a GPU model reading a
    CPU image): blending happens on `image.device`, in buffers of the output size, so at most
    `tiles_per_batch` tiles are in `fn` at a time. Call it under `torch.inference_mode()`:
    with autograd on, every tile's graph would be kept. `align` places the tiles (`plan_tiles`).
    """
    if image.dim() != 4:
        raise TileInputError(f"expected an image batch (B, C, H, W); got {tuple(image.shape)}")
    if not isinstance(tiles_per_batch, int) or tiles_per_batch < 1:
        raise TileArgumentError(
            f"tiles_per_batch must be a positive integer; got {tiles_per_batch!r}"
        )
    batch, _, height, width = image.shape
    tiles = plan_tiles(height, width, tile, overlap, multiple_of, align=align)
    margin = _check_margin(overlap, margin)
    weights = torch.empty(0)
    windows: dict[tuple[int, ...], torch.Tensor] = {}
    sums: list[torch.Tensor] = []
    dtypes: list[torch.dtype] = []
    single = True
    for start in range(0, len(tiles), tiles_per_batch):
        chunk = tiles[start : start + tiles_per_batch]
        crops = [_crop_padded(image, t, multiple_of) for t in chunk]
        result = fn(torch.cat(crops) if len(crops) > 1 else crops[0])
        outputs = _check_outputs(result, crops[0].shape, batch * len(chunk), sums, single)
        if not sums:
            single = isinstance(result, torch.Tensor)
            dtypes = [out.dtype for out in outputs]
            sums = [_new_sum(out, image) for out in outputs]
            # Weights as wide as the widest output, so float64 outputs blend in float64.
            wide = max(sums, key=lambda total: total.element_size()).dtype
            weights = torch.zeros(1, 1, height, width, dtype=wide, device=image.device)
        for j, t in enumerate(chunk):
            key = (t.height, t.width, t.y0 > 0, t.y1 < height, t.x0 > 0, t.x1 < width)
            if key not in windows:
                windows[key] = _window_for(key, overlap, margin, weights)
            window = windows[key]
            weights[:, :, t.y0 : t.y1, t.x0 : t.x1] += window
            for out, total in zip(outputs, sums, strict=True):
                part = out[j * batch : (j + 1) * batch, :, : t.height, : t.width]
                part = part.to(device=image.device, dtype=total.dtype)
                total[:, :, t.y0 : t.y1, t.x0 : t.x1] += part * window.to(total.dtype)
    # Every pixel has positive weight (see the module docstring), so the division is safe.
    blended = tuple(total.div_(weights).to(dt) for total, dt in zip(sums, dtypes, strict=True))
    return blended[0] if single else blended


def _plan_axis(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """Return `(start, end)` spans of equal length covering `0..size` with the given overlap,
    every start but the last a multiple of `align`."""
    if size <= tile:
        return [(0, size)]
    # Even spacing: the steps are floor/ceil of (size - tile) / (count - 1) <= tile - overlap
    # - (align - 1), and rounding a start down to `align` lengthens a step by at most align - 1.
    count = math.ceil((size - tile) / (tile - overlap - align + 1)) + 1
    starts = [i * (size - tile) // (count - 1) // align * align for i in range(count - 1)]
    return [(s, s + tile) for s in [*starts, size - tile]]


def _window_1d(
    size: int, overlap: int, margin: int, start: bool, end: bool, name: str
) -> torch.Tensor:
    """Return the float64 window `(size,)` along one axis; ramps at the bordering ends."""
    if (start or end) and size < overlap:
        raise TileArgumentError(
            f"tile {name} {size} is smaller than the overlap {overlap} it must blend"
        )
    window = torch.ones(size, dtype=torch.float64)
    length = overlap - 2 * margin
    # Pixel centres j + 0.5 make the ramp and its mirror image sum to exactly 1.
    ramp = (
        torch.sin(0.5 * math.pi * (torch.arange(length, dtype=torch.float64) + 0.5) / length) ** 2
    )
    if start:
        window[:margin] = 0.0
        window[margin : margin + length] *= ramp
    if end:
        window[size - margin :] = 0.0
        window[size - margin - length : size - margin] *= ramp.flip(0)
    return window


def _crop_padded(image: torch.Tensor, t: Tile, multiple_of: int) -> torch.Tensor:
    """Return tile `t` of `(B, C, H, W)`, padded at the bottom and right to `multiple_of`."""
    crop = image[:, :, t.y0 : t.y1, t.x0 : t.x1]
    pad_w = -t.width % multiple_of
    pad_h = -t.height % multiple_of
    if pad_w:
        crop = F.pad(crop, (0, pad_w, 0, 0), mode=_pad_mode(pad_w, t.width))
    if pad_h:
        crop = F.pad(crop, (0, 0, 0, pad_h), mode=_pad_mode(pad_h, t.height))
    return crop


def _pad_mode(pad: int, side: int) -> str:
    # Reflect needs the pad shorter than the side; a 1-pixel side can only be repeated.
    return "reflect" if pad < side else "replicate"


def _check_outputs(
    result: object,
    in_shape: torch.Size,
    rows: int,
    sums: list[torch.Tensor],
    single: bool,
) -> tuple[torch.Tensor, ...]:
    """Check what the tile function returned for a `(rows, C, h, w)` input; return it as a tuple.

    `sums` holds the accumulators made from the first call (empty before it), so later calls
    must return as many outputs, each with the same channel count, as the first.
    """
    if isinstance(result, torch.Tensor):
        outputs: tuple[object, ...] = (result,)
    elif isinstance(result, (tuple, list)):
        outputs = tuple(result)
    else:
        raise TileOutputError(f"the tile function must return tensors; got {type(result)}")
    if not outputs:
        raise TileOutputError("the tile function returned no outputs")
    if sums and (isinstance(result, torch.Tensor) != single or len(outputs) != len(sums)):
        raise TileOutputError("the tile function returned a different number of outputs")
    for k, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TileOutputError(f"the tile function must return float tensors; got {type(out)}")
        if out.dim() != 4 or out.shape[0] != rows or out.shape[-2:] != in_shape[-2:]:
            raise TileOutputError(
                f"tile output {tuple(out.shape)} does not match its input {tuple(in_shape)} "
                "in batch and size"
            )
        if sums and out.shape[1] != sums[k].shape[1]:
            raise TileOutputError(
                f"tile output {k} has {out.shape[1]} channels, earlier tiles {sums[k].shape[1]}"
            )
    return outputs


def _new_sum(out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Return a zero accumulator `(B, C', H, W)` for tile outputs like `out`, at least float32."""
    batch, _, height, width = image.shape
    dtype = torch.promote_types(out.dtype, torch.float32)
    return torch.zeros(batch, out.shape[1], height, width, dtype=dtype, device=image.device)


def _window_for(
    key: tuple[int, ...], overlap: int, margin: int, like: torch.Tensor
) -> torch.Tensor:
    """Return the window for `key` = (height, width, top, bottom, left, right), `like`'s dtype
    and device."""
    height, width, top, bottom, left, right = key
    return blend_window(
        height,
        width,
        overlap,
        top=bool(top),
        bottom=bool(bottom),
        left=bool(left),
        right=bool(right),
        margin=margin,
        dtype=like.dtype,
        device=like.device,
    )


def _check_tile_args(tile: int, overlap: int, multiple_of: int) -> None:
    for name, value in (("tile", tile), ("overlap", overlap), ("multiple_of", multiple_of)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TileArgumentError(f"{name} must be an integer; got {value!r}")
    if overlap < 0:
        raise TileArgumentError(f"overlap must be >= 0; got {overlap}")
    if tile <= overlap:
        raise TileArgumentError(f"tile ({tile}) must be larger than overlap ({overlap})")
    if multiple_of < 1:
        raise TileArgumentError(f"multiple_of must be >= 1; got {multiple_of}")
    if tile % multiple_of:
        raise TileArgumentError(f"tile ({tile}) must be a multiple of multiple_of ({multiple_of})")


def _check_margin(overlap: int, margin: int | None) -> int:
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        raise TileArgumentError(f"overlap must be an integer >= 0; got {overlap!r}")
    if margin is None:
        return overlap // 4
    if not isinstance(margin, int) or not 0 <= 2 * margin <= overlap:
        raise TileArgumentError(
            f"margin must be in 0..overlap // 2 ({overlap // 2}); got {margin!r}"
        )
    return margin
