"""FLOP counts of the inverse operator, forward and backward (a multiply and an add count as one
FLOP each). The op registers them with `torch.utils.flop_counter`, so FlopCounterMode and the
profiler count the op like a built-in one."""

from __future__ import annotations


def inverse_operator_flops(
    batch: int, channels: int, height: int, width: int, scales: int,
    has_modulation: bool = True, has_bias: bool = True,
) -> int:  # fmt: skip
    """Forward FLOPs of the op.

    Per pixel and channel: S x 9 taps x (mul + add) = 18 S, fusion alpha_s * J_s and its sum
    = 2 S, the bias add = 1. Per pixel: TAM modulation 9 muls; softmax 3 S (sub max, exp,
    divide) + (S - 1) adds; UM 9 abs + 8 adds + 1 divide = 18.
    """
    per_channel = 20 * scales + int(has_bias)
    per_pixel = 9 * int(has_modulation) + 4 * scales - 1 + 18
    return batch * height * width * (channels * per_channel + per_pixel)


def inverse_operator_backward_flops(
    batch: int, channels: int, height: int, width: int, scales: int, has_modulation: bool = True
) -> int:
    """Backward FLOPs, counted like the forward (recomputation included).

    Per pixel and channel and scale: J_s recomputed (18), d alpha (2), d K~ (27 = 9 x 3),
    the image gather (27 = 9 x (mul + mul + add)). Per pixel: softmax recomputed and its
    backward (8 S), UM's sign term (27), d K and d m (2 x 9 when modulated).
    """
    per_pixel = channels * scales * 74 + 8 * scales + 27 + 18 * int(has_modulation)
    return batch * height * width * per_pixel
