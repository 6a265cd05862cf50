"""What the Triton kernels take, checked without importing triton: the dispatch asks before it
loads `triton_kernels`, and a machine without triton still answers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

# The dilations travel to the kernels as one compile-time integer, 8 bits a scale
# (`triton_kernels.pack_dilations`), which must stay a positive int64.
MAX_TRITON_SCALES = 8
MAX_TRITON_DILATION = 127


def triton_supports(dilations: Sequence[int]) -> bool:
    """Whether the Triton kernels take these dilations (they travel packed, 8 bits a scale)."""
    return len(dilations) <= MAX_TRITON_SCALES and max(dilations) <= MAX_TRITON_DILATION


def offsets_fit(image: Tensor, dilations: Sequence[int]) -> bool:
    """Whether an image (B, C, H, W)'s largest plane set (C, 9 or S planes) fits the kernels'
    32-bit offsets (the backward's S x 9 scratch planes take a 64-bit base per scale)."""
    _, c, h, w = image.shape
    return max(c, 9, len(dilations)) * h * w < 2**31
