"""The OPIR model: configuration, NAFNet blocks, KPN, TAM, the two-stage model and its loss."""

from opir_engine.model.config import CLASSES, PRESETS, TASKS, OPIRConfig
from opir_engine.model.growth import GrowthError, grow, same_classifier
from opir_engine.model.kpn import KPN
from opir_engine.model.loss import OPIRLoss
from opir_engine.model.opir import OPIR, OPIROutput, auto_decision
from opir_engine.model.tam import TAM

__all__ = [
    "CLASSES",
    "KPN",
    "OPIR",
    "PRESETS",
    "TAM",
    "TASKS",
    "GrowthError",
    "OPIRConfig",
    "OPIRLoss",
    "OPIROutput",
    "auto_decision",
    "grow",
    "same_classifier",
]
