"""Training objective of appendix A (Eq. 22), plus cross-entropy for the degradation classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opir_engine.model.opir import OPIROutput


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """L_c = mean sqrt((x - y)^2 + eps^2)."""
    return torch.sqrt((x - y) ** 2 + eps**2).mean()


def laplacian(x: Tensor) -> Tensor:
    """Discrete Laplacian (the Delta of L_e) of each channel of (B, C, H, W), replicate borders:
    up + down + left + right - 4 centre. Four shifted slices of the padded map, not a
    depthwise 3x3 convolution: on the CPU that convolution took 2-7x as long forward and
    backward on a training batch (three calls a step)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return (p[..., :-2, 1:-1] + p[..., 2:, 1:-1]) + (p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) - 4 * x


def fft_l1(x: Tensor, y: Tensor) -> Tensor:
    """L_f = || F(x) - F(y) ||_1, mean over the real and imaginary parts of the 2-D FFT."""
    diff = torch.fft.rfft2(x.float()) - torch.fft.rfft2(y.float())
    return torch.view_as_real(diff).abs().mean()


class OPIRLoss(nn.Module):
    """sum over stages of L_c + delta L_e + lambda L_f (delta 0.05, lambda 0.1), + w_ce CE."""

    def __init__(
        self, edge_weight: float = 0.05, fft_weight: float = 0.1, ce_weight: float = 0.1
    ) -> None:
        super().__init__()
        self.edge_weight = edge_weight
        self.fft_weight = fft_weight
        self.ce_weight = ce_weight

    def forward(
        self, output: OPIROutput, target: Tensor, class_target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """target (B, 3, H, W); class_target (B,) class indices. Returns (total, parts)."""
        lap_target = laplacian(target)
        parts = {"charbonnier": 0.0, "edge": 0.0, "fft": 0.0}
        for stage in output.stages:
            parts["charbonnier"] = parts["charbonnier"] + charbonnier(stage, target)
            parts["edge"] = parts["edge"] + charbonnier(laplacian(stage), lap_target)
            parts["fft"] = parts["fft"] + fft_l1(stage, target)
        parts["ce"] = F.cross_entropy(output.class_logits, class_target)
        total = (
            parts["charbonnier"]
            + self.edge_weight * parts["edge"]
            + self.fft_weight * parts["fft"]
            + self.ce_weight * parts["ce"]
        )
        return total, parts
