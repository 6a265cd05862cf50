"""`inverse_operator_reference` rewritten plane by plane over flattened pixels: the body the op
gives inductor under torch.compile on CPU (eager, the reference's tensor form is faster)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import DEFAULT_DILATIONS, TAPS, compute_dtype


def _plane_sum(planes: Sequence[Tensor]) -> Tensor:
    total = planes[0]
    for plane in planes[1:]:
        total = total + plane
    return total


def _plane_softmax(logits: Sequence[Tensor]) -> list[Tensor]:
    """Softmax across a list of planes, written out so that it stays one elementwise pass."""
    top = logits[0]
    for plane in logits[1:]:
        top = torch.maximum(top, plane)
    exps = [torch.exp(plane - top) for plane in logits]
    total = _plane_sum(exps)
    return [e / total for e in exps]


class _FlatShifts:
    """Reads `I(p + (dy, dx))` with pixels flattened to p = y W + x.

    A shift is then a constant offset dy W + dx into a copy zero-padded by `lead` = pad W + pad
    elements at both ends (rows above and below the image fall into that padding), and a column
    test on x + dx stops a tap from wrapping into the neighbouring row. Every tensor of the op is
    then indexed by p alone, which is what lets inductor put the whole op in one loop.
    """

    def __init__(self, height: int, width: int, pad: int, device: torch.device) -> None:
        self.height, self.width, self.lead = height, width, pad * width + pad
        column = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
        # Realized (as_strided) so that inductor loads x as one float plane: left inline it
        # recomputes p mod W in int64 lanes for every tap, which made the loop 5x slower.
        self.column = column.as_strided(column.shape, column.stride())

    def pad(self, planes: Tensor) -> Tensor:
        """(B, N, H W) -> (B, N, H W + 2 lead), zeros around."""
        return F.pad(planes, (self.lead, self.lead))

    def read(self, padded: Tensor, dy: int, dx: int) -> Tensor:
        """(B, N, H W): padded[..., lead + p + dy W + dx], 0 where x + dx leaves the row.

        A strided view, for the reason `reference._shifted` gives: inductor writes the padded
        copy once and reads it without bounds masks.
        """
        b, n, _ = padded.shape
        stride = padded.stride()
        start = (self.lead + dy * self.width + dx) * stride[2]
        values = padded.as_strided((b, n, self.height * self.width), stride, start)
        if dx == 0:
            return values
        inside = (self.column + dx >= 0) & (self.column + dx < self.width)
        return torch.where(inside, values, 0.0)


def inverse_operator_planes(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> tuple[Tensor, Tensor]:
    """`inverse_operator_reference` plane by plane over flattened pixels (same arguments, same
    maths, equal to it up to float summation order).

    This is the body the op gives inductor on CPU. The reference's tensor form makes inductor
    write K~, the softmax's exponentials and alpha, and UM's reduction to memory in loops of their
    own (their iteration spaces differ from the image's); here every quantity is a (B, H W) plane
    and a shift is a constant offset, so inductor fuses the op into one loop and the forward
    moves ~2.5x fewer bytes (bench/op.py). Eager it is slow (hundreds of small ops), so the
    eager op keeps the reference.
    """
    out_dtype = image.dtype
    compute = compute_dtype(image.dtype)
    b, c, height, width = image.shape

    def planes(t: Tensor) -> list[Tensor]:
        return list(t.to(compute).reshape(b, t.shape[1], height * width).unbind(1))

    taps = planes(kernel)
    if modulation is not None:
        taps = [k * m for k, m in zip(taps, planes(modulation), strict=True)]  # Eq. 19
    alpha = _plane_softmax(planes(fusion_logits))  # Eq. 18
    shifts = _FlatShifts(height, width, max(dilations), image.device)
    padded = shifts.pad(image.to(compute).reshape(b, c, height * width))
    biases = None if bias is None else planes(bias)
    restored = []
    for ch in range(c):
        out = _plane_sum(
            [
                alpha[s]
                * _plane_sum(
                    [
                        taps[i] * shifts.read(padded, d * dy, d * dx)[:, ch]
                        for i, (dy, dx) in enumerate(TAPS)
                    ]
                )  # Eq. 16
                for s, d in enumerate(dilations)
            ]
        )
        restored.append(out if biases is None else out + biases[ch])
    uncertainty = _plane_sum([t.abs() for t in taps]) / len(TAPS)  # Eq. 11
    return (
        torch.stack(restored, 1).view(b, c, height, width).to(out_dtype),
        uncertainty.view(b, 1, height, width).to(out_dtype),
    )
