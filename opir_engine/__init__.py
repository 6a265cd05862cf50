"""opir: restore photos degraded by rain, snow and haze with one all-in-one OPIR model.

Nothing is imported here, so `opir --help` starts without torch. The parts are subpackages:
`model` (the network), `inference` (the engine), `image_io`, `batch`, `synthesis`, `training`,
`evaluation`, `profiling` and `cli`; `devices` and `weights` sit below them all.
"""

__version__ = "0.1.0"
