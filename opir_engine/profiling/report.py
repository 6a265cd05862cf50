"""The figures a profile reports: per model and size, per part, and PromptIR / OPIR ratios.

Plain dataclasses, written as JSON by `ProfileReport.write_json`; the command line renders
them as tables (opir_engine/cli/render_profile.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PartTiming:
    """One part of the OPIR forward, timed alone on the inputs the full forward gives it."""

    name: str
    ms_p50: float
    ms_p95: float
    share: float  # ms_p50 / the whole forward's p50 timed in the same rounds
    ms_min: float | None = None
    ms_max: float | None = None


@dataclass
class SizeProfile:
    """The figures of one model at one size."""

    model: str
    size: str
    height: int
    width: int
    padded_height: int
    padded_width: int
    batch: int
    latency_ms_p50: float
    latency_ms_p95: float
    images_per_s: float
    megapixels_per_s: float
    gflops_per_image: float  # flop_counter, 2 per multiply-add, on the padded size
    gmacs_per_image: float
    achieved_gflops_per_s: float
    parameters: int
    peak_memory_mb: float | None
    peak_memory_growth_mb: float | None
    memory_measure: str
    analytic_gflops_per_image: float | None = None  # OPIR: same convention, from the config
    analytic_elementwise_gflops: float | None = None  # OPIR: what flop_counter leaves out
    parts: list[PartTiming] = field(default_factory=list)
    # The parts against the whole forward timed in the same rounds (profile._add_opir_details).
    parts_unaccounted_ms: float | None = None  # whole p50 - sum of the parts' p50; may be < 0
    parts_whole_ms_p50: float | None = None
    parts_whole_ms_p95: float | None = None
    parts_sum_ms_p50: float | None = None
    parts_noise_ms: float | None = None  # the whole's and each part's p95 - p50, summed
    parts_within_noise: bool | None = None  # |unaccounted| <= noise; None: one run, no spread
    op_ms_p50: float | None = None  # the inverse-operator op alone, all stages
    op_gb_per_s: float | None = None
    op_bandwidth_pct_of_peak: float | None = None


@dataclass
class Comparison:
    """PromptIR / OPIR at one size: the ratios that survive a noisy machine."""

    size: str
    opir_latency_ms_p50: float
    promptir_latency_ms_p50: float
    latency_ratio: float
    opir_gflops: float
    promptir_gflops: float
    flops_ratio: float


@dataclass
class ProfileReport:
    """A whole profile: the machine, the settings, the figures per model and size, the ratios."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[SizeProfile] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return dataclasses.asdict(self)

    def write_json(self, path: Path) -> None:
        """Write the report to `path` (parents created), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)


def compare_results(opir: SizeProfile, promptir: SizeProfile) -> Comparison:
    """The PromptIR / OPIR ratios of two results at the same size."""
    return Comparison(
        size=opir.size,
        opir_latency_ms_p50=opir.latency_ms_p50,
        promptir_latency_ms_p50=promptir.latency_ms_p50,
        latency_ratio=promptir.latency_ms_p50 / opir.latency_ms_p50,
        opir_gflops=opir.gflops_per_image,
        promptir_gflops=promptir.gflops_per_image,
        flops_ratio=promptir.gflops_per_image / opir.gflops_per_image,
    )
