"""Model configuration: one frozen dataclass and a preset registry that fits on one screen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Classes of the degradation classifier; the restoration tasks are the last three.
CLASSES: tuple[str, ...] = ("clean", "rain", "snow", "haze")
TASKS: tuple[str, ...] = CLASSES[1:]


@dataclass(frozen=True)
class OPIRConfig:
    """Sizes and switches of an OPIR model (paper section 3).

    The ablation switches follow Table 5: `stages` (1 or 2), `use_uncertainty` (stage 2 sees
    J1 * UM, else J1), `use_tam` (task-aware modulation, else m = 1), and `dilations` ((1,) is
    the single-scale kernel).
    """

    width: int = 16
    enc_blocks: tuple[int, ...] = (1, 1, 1, 1)
    middle_blocks: int = 1
    dec_blocks: tuple[int, ...] = (1, 1, 1, 1)
    dilations: tuple[int, ...] = (1, 2, 3, 4)
    task_dim: int = 16
    tam_hidden: int = 8
    head_hidden: int = 64
    classifier: str = "bottleneck"  # or "trunk": its own light CNN (model/classifier.py)
    classifier_width: int = 24
    stages: int = 2
    use_uncertainty: bool = True
    use_tam: bool = True
    clean_threshold: float = 0.9
    # The KPN's channel attention: "global" means over each whole map (as trained on crops),
    # or "local" means over a `pool_window` box around each pixel (TLC; nafnet.local_mean),
    # which a tile computes as the whole photo does. Neither changes the weights.
    pooling: str = "global"
    pool_window: int = 192
    classes: tuple[str, ...] = field(default=CLASSES)

    def __post_init__(self) -> None:
        if len(self.enc_blocks) != len(self.dec_blocks):
            raise ValueError("enc_blocks and dec_blocks must have the same number of levels")
        if self.stages not in (1, 2):
            raise ValueError(f"stages must be 1 or 2, got {self.stages}")
        if self.classifier not in ("bottleneck", "trunk"):
            raise ValueError(f"classifier must be 'bottleneck' or 'trunk', got {self.classifier!r}")
        if self.pooling not in ("global", "local"):
            raise ValueError(f"pooling must be 'global' or 'local', got {self.pooling!r}")
        if self.pool_window < 1:
            raise ValueError(f"pool_window must be positive, got {self.pool_window}")
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations must be positive, got {self.dilations}")

    @property
    def multiple_of(self) -> int:
        """Input sides must be a multiple of this (one halving per encoder level)."""
        return 2 ** len(self.enc_blocks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OPIRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> OPIRConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, OPIRConfig] = {
    # For tests: a few thousand parameters, any CPU runs it in milliseconds.
    "tiny": OPIRConfig(
        width=8,
        enc_blocks=(1, 1),
        middle_blocks=1,
        dec_blocks=(1, 1),
        task_dim=4,
        tam_hidden=4,
        head_hidden=16,
    ),
    # Trainable on a 2-core CPU in hours (about 1 s per step at batch 8 of 128x128 crops).
    "small": OPIRConfig(),
    # `small` with more blocks where they are cheap, at 1/4, 1/8 and the middle (3.0 M
    # parameters against 1.2 M; a training step measured 1.25x small's, eager, 1 thread). Meant
    # to be grown from trained `small` weights (`opir train --config small-deep --init W`,
    # model/growth.py): the added blocks start as the identity, so it starts as good as they are.
    "small-deep": OPIRConfig(enc_blocks=(1, 1, 2, 4), middle_blocks=4),
    # Sized to the paper's Table 6 budget: 45.3 GMACs (90.6 GFLOPs as torch counts them) at
    # 224 x 224, against Table 6's 47 G; Table 6 counts multiply-adds at 224 x 224, where our
    # PromptIR comes to 132 G against its 134 G (tests/test_profiling.py). As in NAFNet's own
    # deblurring config, most blocks sit at 1/8 and 1/16 resolution, where a NAFBlock runs at
    # about 3x the GFLOP/s of a full-resolution one on a CPU (less memory traffic per FLOP).
    "paper": OPIRConfig(
        width=48,
        enc_blocks=(1, 1, 1, 12),
        middle_blocks=10,
        dec_blocks=(1, 1, 1, 1),
        task_dim=32,
        tam_hidden=16,
        head_hidden=128,
    ),
}
