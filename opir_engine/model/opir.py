"""OPIR: two-stage task-aware inverse operator modelling (paper section 3, Eq. 8-13)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from opir_engine.model.classifier import DegradationClassifier, DegradationHead
from opir_engine.model.config import OPIRConfig
from opir_engine.model.kpn import KPN, KPNOutput
from opir_engine.model.tam import TAM
from opir_kernels.inverse_operator import inverse_operator


class OPIROutput(NamedTuple):
    restored: Tensor  # (B, 3, H, W): the last stage, or the input where auto mode saw "clean"
    stages: tuple[Tensor, ...]  # (J1,) or (J1, J2), each (B, 3, H, W), before pass-through
    uncertainty: Tensor  # (B, 1, H, W): UM of stage 1 (Eq. 11)
    class_logits: Tensor  # (B, num_classes): the degradation classifier (model/classifier.py)

    def in_fp32(self) -> OPIROutput:
        """Every tensor in fp32 (those already fp32 as they are): what an autocast forward hands
        the loss, so that the loss is computed at full precision."""
        return OPIROutput(
            self.restored.float(), tuple(s.float() for s in self.stages),
            self.uncertainty.float(), self.class_logits.float(),
        )  # fmt: skip


def auto_decision(probs: Tensor, clean_threshold: float) -> Tensor:
    """What `--task auto` does with the classifier's probabilities (N, classes), as class
    indices (N,): clean (0, the image comes back unchanged) only when clean is the likeliest
    class with at least `clean_threshold`; otherwise the likeliest weather, so that an image the
    classifier half-believes clean is still restored as whatever weather it most resembles."""
    top = probs.argmax(dim=1)
    weather = probs[:, 1:].argmax(dim=1) + 1
    passes = (top == 0) & (probs[:, 0] >= clean_threshold)
    return torch.where(passes, torch.zeros_like(top), weather)


class OPIR(nn.Module):
    """G(I) = G2(G1(I; theta_t1); theta_t2) (Eq. 8) with one shared KPN and a TAM per stage."""

    def __init__(self, config: OPIRConfig) -> None:
        super().__init__()
        self.config = config
        num_classes = len(config.classes)
        self.kpn = KPN(config)
        if config.classifier == "trunk":
            self.classifier = DegradationClassifier(
                num_classes, config.classifier_width, config.head_hidden
            )
        else:
            self.head = DegradationHead(
                self.kpn.bottleneck_channels, config.head_hidden, num_classes
            )
        self.tams = nn.ModuleList(
            [TAM(num_classes, config.task_dim, config.tam_hidden) for _ in range(config.stages)]
            if config.use_tam
            else []
        )

    @property
    def multiple_of(self) -> int:
        return self.config.multiple_of

    def classify(self, image: Tensor) -> Tensor:
        """Degradation logits (B, num_classes): the classifier's trunk, or the stage-1 encoder
        and the bottleneck head; the decoder does not run."""
        self._check_size(image)
        if self.config.classifier == "trunk":
            return self.classifier(image)
        bottleneck, _ = self.kpn.encode(image)
        return self.head(bottleneck)

    def forward(
        self,
        image: Tensor,
        task_weights: Tensor | None = None,
        valid: Tensor | None = None,
        shared_means: tuple[Tensor, ...] | None = None,
        record: list[Tensor] | None = None,
    ) -> OPIROutput:
        """image (B, 3, H, W) in [0, 1], sides multiples of `multiple_of`.

        task_weights (B, num_classes): one-hot for a chosen task, or any mix. None means auto:
        the head's probabilities choose the embedding, and images it calls clean with at least
        `clean_threshold` confidence come back unchanged.

        valid (B, 1, H, W): 1 where the image is, 0 where padding was added to reach its shape
        (None: no padding). The KPN's global means and the classifier's pooling read only the
        image, so a padded photo restores (and, in auto, is judged) as it would unpadded, but for
        the convolutions' reach across the border.

        shared_means: the KPN blocks' channel-attention means to use instead of computing them,
        from `block_means` on the whole photo: each tile of it then scales its channels as the
        whole photo does. record: collects the means the blocks used (`block_means`).
        """
        self._check_size(image)
        shared = None if shared_means is None else iter(shared_means)
        kpn1 = self.kpn(image, valid, shared, record)
        if self.config.classifier == "trunk":
            class_logits = self.classifier(image, valid)
        else:
            class_logits = self.head(kpn1.bottleneck, valid)
        weights = torch.softmax(class_logits, dim=1) if task_weights is None else task_weights
        j1, uncertainty = self._apply_operator(image, kpn1, 0, weights)  # Eq. 12
        stages = (j1,)
        if self.config.stages == 2:
            guide = j1 * uncertainty if self.config.use_uncertainty else j1
            kpn2 = self.kpn(guide, valid, shared, record)
            j2, _ = self._apply_operator(j1, kpn2, 1, weights)  # Eq. 13
            stages = (j1, j2)
        restored = stages[-1]
        if task_weights is None:
            clean = auto_decision(weights, self.config.clean_threshold) == 0
            restored = torch.where(clean[:, None, None, None], image, restored)
        return OPIROutput(restored, stages, uncertainty, class_logits)

    def block_means(
        self, image: Tensor, task_weights: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """The KPN blocks' channel-attention means (B, C', 1, 1) over the whole of image (B, 3,
        H, W), both stages, in the order `forward` runs the blocks: its `shared_means`."""
        record: list[Tensor] = []
        self.forward(image, task_weights, valid, record=record)
        return tuple(record)

    def _apply_operator(
        self, image: Tensor, kpn: KPNOutput, stage: int, task_weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(KPN(x) (x) TAM) applied to image (Eq. 9-10, 16-20)."""
        modulation = self.tams[stage](kpn.kernel, task_weights) if self.config.use_tam else None
        return inverse_operator(
            image, kpn.kernel, modulation, kpn.fusion_logits, kpn.bias, self.config.dilations
        )

    def _check_size(self, image: Tensor) -> None:
        m = self.multiple_of
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if image.shape[-2] % m or image.shape[-1] % m:
            raise ValueError(
                f"image sides must be multiples of {m}, got {tuple(image.shape[-2:])}: pad first"
            )
