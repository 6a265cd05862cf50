"""The inverse operator as predictive-filtering repositories write it, with `F.unfold`: the
baseline bench/op.py measures the op against (and tests/test_inverse_operator.py checks the
reference against). Not used by opir itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from opir_kernels.reference import DEFAULT_DILATIONS, compute_dtype


def inverse_operator_unfold(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> tuple[Tensor, Tensor]:
    """Same maths and arguments as `inverse_operator_reference` via `F.unfold`: materialises a
    (B, C*9, H*W) patch tensor per dilation. Returns restored (B, C, H, W) and uncertainty
    (B, 1, H, W)."""
    b, c, h, w = image.shape
    k_mod = kernel if modulation is None else kernel * modulation
    alpha = torch.softmax(fusion_logits.to(compute_dtype(image.dtype)), dim=1).to(image.dtype)
    restored = torch.zeros_like(image) if bias is None else bias.clone()
    for s, d in enumerate(dilations):
        patches = F.unfold(image, kernel_size=3, dilation=d, padding=d).view(b, c, 9, h, w)
        j_s = (patches * k_mod.unsqueeze(1)).sum(dim=2)
        restored = restored + alpha[:, s : s + 1] * j_s
    return restored, k_mod.abs().mean(dim=1, keepdim=True)
