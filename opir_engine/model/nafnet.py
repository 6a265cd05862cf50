"""NAFNet building blocks (Chen et al., 2022), the backbone of the KPN."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from opir_kernels.gate import simple_gate
from opir_kernels.layer_norm import layer_norm_channels


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_channels(x, self.weight, self.bias, self.eps)[1]

    def after_residual(self, x: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """(x + y scale, its LayerNorm): a block's residual and the norm that follows it, in
        one pass over the map where the native kernels run (kernels/layer_norm.py)."""
        return layer_norm_channels(x, self.weight, self.bias, self.eps, y, scale)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: a nonlinearity without activation."""

    def forward(self, x: Tensor) -> Tensor:
        return simple_gate(x)[0]

    def with_mean(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the gate's output, its mean over H and W (B, C', 1, 1)), in one pass over the map
        where the native kernels run (kernels/gate.py)."""
        y, mean = simple_gate(x, with_mean=True)
        return y, mean  # type: ignore[return-value]


def masked_mean(y: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of (B, C, H, W) over H and W, keepdim; with `valid` (B, 1, H, W) of 0 and 1, over
    the valid pixels only. The engine pads photos (to a multiple of the U-Net's stride, or up
    to a shape bucket for the compiled graph); the padding must not shift a statistic of the
    whole map, or the same photo would restore differently with and without it."""
    if valid is None:
        return y.mean(dim=(2, 3), keepdim=True)
    return (y * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True)


def _valid_span(valid: Tensor | None, dim: int) -> list[tuple[Tensor, Tensor]] | None:
    """Per batch element, (first, end) (1-element tensors) of the rows (dim 2) or columns
    (dim 3) that hold any valid pixel; None for no mask (the whole axis)."""
    if valid is None:
        return None
    size = valid.shape[dim]
    hit = valid.amax(dim=(1, 5 - dim)) > 0  # (B, size)
    index = torch.arange(size, device=valid.device)
    first = torch.where(hit, index, size).amin(dim=1, keepdim=True)
    end = torch.where(hit, index + 1, 0).amax(dim=1, keepdim=True)
    return list(zip(first, end, strict=True))


def _box_sum_last(x: Tensor, window: int, spans: list[tuple[Tensor, Tensor]] | None) -> Tensor:
    """Sums of x (B, C, H, W) along W over `window` consecutive pixels centred on each pixel,
    the window slid back inside the valid span where it would cross an end (so it holds
    min(window, span) pixels), from one cumulative sum: O(H W) whatever the window. Returned
    transposed, (B, C, W, H) contiguous: the next call sums along H."""
    size = x.shape[-1]
    index = torch.arange(size, device=x.device)
    # cumsum along the contiguous dim, index_select along an outer one: each several times
    # faster on the CPU than the other way round
    total = x.contiguous().cumsum(-1).transpose(2, 3).contiguous()
    if spans is None:
        spans = [(index[:1] * 0, index[-1:] + 1)] * x.shape[0]
    centred = (index - window // 2).clamp(min=0)
    sums = []
    for b, (first, end) in enumerate(spans):
        start = torch.maximum(torch.minimum(centred, end - window), first)
        stop = torch.minimum(start + window, end)
        # sum over start..stop-1 = total[stop - 1] - total[start - 1], the latter 0 at start 0
        before = total[b].index_select(1, (start - 1).clamp(min=0)) * (start > 0)[:, None]
        sums.append(total[b].index_select(1, stop - 1) - before)
    return torch.stack(sums)


def local_mean(y: Tensor, valid: Tensor | None, window: int) -> Tensor:
    """Mean of y (B, C, H, W) over a `window` x `window` box around each pixel, read from the
    valid pixels only (sum(y valid) / sum(valid) over the box), (B, C, H, W).

    TLC (Chu et al., ECCV 2022): a block trained with global means over small crops sees, at
    test time, statistics over about a crop around each pixel, so a tile and the whole photo
    compute the same statistic away from the tile's inner edges. The box slides inside the
    bounding box of the valid pixels rather than being cut at its edges, so it always holds a
    full window of image; on a map no larger than the window it is the global mean,
    `masked_mean` itself (the model as trained on crops)."""
    if y.shape[-2] <= window and y.shape[-1] <= window:
        return masked_mean(y, valid)
    dtype = y.dtype
    # Cumulative sums lose digits in half precision: at least float32
    wide = torch.promote_types(dtype, torch.float32)
    rows, cols = _valid_span(valid, 2), _valid_span(valid, 3)
    y = y.to(wide) if valid is None else y.to(wide) * valid.to(wide)
    ones = torch.ones_like(y[:, :1]) if valid is None else valid.to(wide)
    # Columns, then rows: each pass hands back the map transposed, so two restore it
    sums = _box_sum_last(_box_sum_last(y, window, cols), window, rows)
    counts = _box_sum_last(_box_sum_last(ones, window, cols), window, rows)
    return (sums / counts).to(dtype)


def run_blocks(
    blocks: nn.Sequential,
    x: Tensor,
    valid: Tensor | None = None,
    window: int | None = None,
    shared: Iterator[Tensor] | None = None,
    record: list[Tensor] | None = None,
) -> Tensor:
    """x through a sequence of NAFBlocks that share one validity mask and pooling window;
    `shared` and `record` as in `NAFBlock.forward`, one mean per block in turn."""
    for block in blocks:
        x = block(x, valid, window, None if shared is None else next(shared), record)
    return x


class NAFBlock(nn.Module):
    """NAFNet block: LN, 1x1, depthwise 3x3, SimpleGate, simplified channel attention, then a
    gated feed-forward. `beta` and `gamma` start at zero, so the block starts as the identity."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.sg = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden // 2, hidden // 2, 1))
        self.conv3 = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, hidden, 1)
        self.conv5 = nn.Conv2d(hidden // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(
        self,
        x: Tensor,
        valid: Tensor | None = None,
        window: int | None = None,
        shared: Tensor | None = None,
        record: list[Tensor] | None = None,
    ) -> Tensor:
        """x (B, C, H, W); valid (B, 1, H, W): the pixels that are image, not padding (None:
        all), the only ones the channel attention's mean reads. The mean is over the whole map
        (as in training), or over a box of side `window` around each pixel (`local_mean`), or
        `shared` (B or 1, C', 1, 1) as given: the whole photo's mean handed to each of its
        tiles. `record` collects the mean the block used."""
        u = self.conv2(self.conv1(self.norm1(x)))
        fits = window is None or (u.shape[-2] <= window and u.shape[-1] <= window)
        if shared is None and valid is None and fits:
            # The whole map's mean, as trained, from the gate's own pass: the same numbers
            # whether recorded, handed back as `shared`, or read by a window the map fits in
            y, mean = self.sg.with_mean(u)
        else:
            y = self.sg(u)
            if shared is not None:
                mean = shared
            elif window is not None:
                mean = local_mean(y, valid, window)
            else:
                mean = masked_mean(y, valid)
        if record is not None:
            record.append(mean)
        return self._finish(x, y * self.sca[1](mean))

    def _finish(self, x: Tensor, y: Tensor) -> Tensor:
        """The block after its channel attention: projection, residual, gated feed-forward."""
        x, normed = self.norm2.after_residual(x, self.conv3(y), self.beta)  # x + conv3(y) beta
        y = self.sg(self.conv4(normed))
        return torch.addcmul(x, self.conv5(y), self.gamma)
