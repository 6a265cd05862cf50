"""Task-aware module (TAM, paper section 3.3, Eq. 19-21)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opir_kernels.tam_modulation import tam_modulation


class TAM(nn.Module):
    """m_p(q) = g_TAM(K_p(q), e_t) (Eq. 21), a small MLP applied to every tap of every pixel.

    The first layer is linear in [K_p(q), e_t], so it splits into `K * w_k` plus a per-image
    term `W_e e_t` computed once; a learned per-tap offset lets the centre and the ring of the
    3x3 kernel be modulated differently. The output layer starts at zero with bias one, so an
    untrained TAM leaves the kernel unchanged (m = 1).

    The task embedding is a mix: `task_weights @ embeddings`, one-hot for a chosen task, the
    head's probabilities for `--task auto` (mixed weather gets a mixed operator).
    """

    def __init__(self, num_classes: int, task_dim: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_classes, task_dim) * 0.5)  # e_t
        self.weight_k = nn.Parameter(torch.randn(hidden) * 0.5)
        self.proj_task = nn.Linear(task_dim, hidden)
        self.tap_offset = nn.Parameter(torch.zeros(9, hidden))
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.ones_(self.out.bias)

    def forward(self, kernel: Tensor, task_weights: Tensor) -> Tensor:
        """kernel (B, 9, H, W), task_weights (B, num_classes) -> modulation m (B, 9, H, W).

        Per image and tap, m is a function of the kernel value alone, so it is evaluated as a
        table over the kernel's range (opir_kernels.tam_modulation) rather than one MLP per tap
        and pixel."""
        task = self.proj_task(task_weights @ self.embeddings)  # (B, hidden)
        # Eq. 19: K~ = K * m, applied in the op
        return tam_modulation(
            kernel, self.weight_k, task, self.tap_offset, self.out.weight, self.out.bias
        )
