"""opir: restore photos degraded by rain, snow and haze with one all-in-one OPIR model."""

from opir_engine.model import CLASSES, OPIR, TASKS, OPIRConfig
from opir_kernels.inverse_operator import inverse_operator, kernel_backend

__all__ = ["CLASSES", "OPIR", "TASKS", "OPIRConfig", "inverse_operator", "kernel_backend"]
__version__ = "0.1.0"
