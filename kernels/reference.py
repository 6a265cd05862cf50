"""The inverse-operator convolution of OPIR in plain PyTorch: the readable forward and its
closed-form backward. The op's CPU path, and the oracle every other implementation is tested
against.

For a pixel p, with the 3x3 offsets delta_i (row-major over {-1, 0, 1}^2) and dilations d_s:

    K~_i(p)  = K_i(p) * m_i(p)                                    (Eq. 19)
    J_s(p)   = sum_i K~_i(p) * I(p + d_s * delta_i)                (Eq. 16-17, taps outside read 0)
    alpha(p) = softmax_s(logits(p))                                (Eq. 18)
    out(p)   = sum_s alpha_s(p) * J_s(p) + b(p)                    (Eq. 18 and the b_t of Eq. 5)
    UM(p)    = mean_i |K~_i(p)|                                    (Eq. 11)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 3, 4)
TAPS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs accumulate in fp32; fp32 and fp64 keep their own precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _shifted(padded: Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> Tensor:
    """`I(p + (dy, dx))` for every p, read from `padded` (an `F.pad` result, zero-padded by `pad`
    on each side, so it owns its storage from offset 0).

    A strided view rather than a slice: `as_strided` makes inductor write the padded tensor once
    and read every shifted window without bounds masks. A slice lets it fold the pad into each of
    the 36 reads as a masked load, which made the compiled forward ~25% and backward ~20% slower
    on CPU (bench/op.py).
    """
    b, c = padded.shape[:2]
    stride = padded.stride()
    offset = (pad + dy) * stride[2] + (pad + dx) * stride[3]
    return padded.as_strided((b, c, height, width), stride, offset)


def inverse_operator_reference(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> tuple[Tensor, Tensor]:
    """Apply the per-pixel inverse operator (Eq. 11, 16-19).

    Args:
        image: (B, C, H, W), the image I to filter.
        kernel: (B, 9, H, W), base taps K_p(delta_i), delta in row-major order.
        modulation: (B, 9, H, W) TAM weights m, or None for m = 1.
        fusion_logits: (B, S, H, W), softmax over S gives alpha.
        bias: (B, C, H, W) or None.
        dilations: S positive ints d_s.

    Returns:
        restored (B, C, H, W) and uncertainty (B, 1, H, W), in the input dtype
        (accumulated in fp32 for half inputs).

    Memory traffic of one fused pass (elements): reads C + 9 + 9 + S + C per pixel (image once
    when the taps hit cache), writes C + 1.
    """
    out_dtype = image.dtype
    compute = compute_dtype(image.dtype)
    image, kernel, fusion_logits = image.to(compute), kernel.to(compute), fusion_logits.to(compute)
    height, width = image.shape[-2:]
    k_mod = kernel if modulation is None else kernel * modulation.to(compute)  # Eq. 19
    alpha = torch.softmax(fusion_logits, dim=1)  # Eq. 18
    pad = max(dilations)
    padded = F.pad(image, (pad, pad, pad, pad))
    restored = torch.zeros_like(image) if bias is None else bias.to(compute).expand_as(image)
    for s, d in enumerate(dilations):
        j_s = sum(
            k_mod[:, i : i + 1] * _shifted(padded, pad, d * dy, d * dx, height, width)
            for i, (dy, dx) in enumerate(TAPS)
        )  # Eq. 16
        restored = restored + alpha[:, s : s + 1] * j_s
    uncertainty = k_mod.abs().mean(dim=1, keepdim=True)  # Eq. 11
    return restored.to(out_dtype), uncertainty.to(out_dtype)


def inverse_operator_backward_reference(
    grad_restored: Tensor,
    grad_uncertainty: Tensor,
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Closed-form gradients of `inverse_operator_reference`.

    Returns grads for (image, kernel, modulation or None, fusion_logits, bias), each shaped like
    its input (bias grad shaped like the image). The image gradient is a gather: pixel q receives
    alpha_s(p) K~_i(p) g(p) from every p = q - d_s delta_i (the adjoint of a zero-filled shift).
    """
    dtypes = (image.dtype, kernel.dtype, fusion_logits.dtype)
    compute = compute_dtype(image.dtype)
    g = grad_restored.to(compute)
    gu = grad_uncertainty.to(compute)
    image, kernel, fusion_logits = image.to(compute), kernel.to(compute), fusion_logits.to(compute)
    mod = None if modulation is None else modulation.to(compute)
    height, width = image.shape[-2:]
    k_mod = kernel if mod is None else kernel * mod
    alpha = torch.softmax(fusion_logits, dim=1)
    pad = max(dilations)
    padded = F.pad(image, (pad, pad, pad, pad))
    # The gather's operands, each padded once so that `_shifted` can read them at p - d delta.
    padded_alpha, padded_k_mod, padded_g = (
        F.pad(t, (pad, pad, pad, pad)) for t in (alpha, k_mod, g)
    )

    # d out / d K~_i = sum_s alpha_s sum_c g_c I_c(p + d_s delta_i); d UM / d K~_i = sign / 9.
    grad_k_mod = [gu * torch.sign(k_mod[:, i : i + 1]) / 9.0 for i in range(len(TAPS))]
    grad_alpha = []
    grad_image = torch.zeros_like(image)
    for s, d in enumerate(dilations):
        a_s = alpha[:, s : s + 1]
        j_s = torch.zeros_like(image)
        for i, (dy, dx) in enumerate(TAPS):
            shifted = _shifted(padded, pad, d * dy, d * dx, height, width)
            j_s = j_s + k_mod[:, i : i + 1] * shifted
            grad_k_mod[i] = grad_k_mod[i] + a_s * (g * shifted).sum(dim=1, keepdim=True)
            # Gather: q takes alpha_s(p) K~_i(p) g(p) from p = q - d_s delta_i.
            back = (-d * dy, -d * dx, height, width)
            grad_image = grad_image + (
                _shifted(padded_alpha, pad, *back)[:, s : s + 1]
                * _shifted(padded_k_mod, pad, *back)[:, i : i + 1]
                * _shifted(padded_g, pad, *back)
            )
        grad_alpha.append((g * j_s).sum(dim=1, keepdim=True))
    grad_alpha_t = torch.cat(grad_alpha, dim=1)
    # Softmax backward: d logit_s = alpha_s (g_alpha_s - sum_s' alpha_s' g_alpha_s').
    grad_logits = alpha * (grad_alpha_t - (alpha * grad_alpha_t).sum(dim=1, keepdim=True))
    grad_k_mod_t = torch.cat(grad_k_mod, dim=1)
    grad_kernel = grad_k_mod_t if mod is None else grad_k_mod_t * mod
    grad_mod = None if mod is None else (grad_k_mod_t * kernel).to(modulation.dtype)
    return (
        grad_image.to(dtypes[0]),
        grad_kernel.to(dtypes[1]),
        grad_mod,
        grad_logits.to(dtypes[2]),
        g.to(dtypes[0]),
    )
