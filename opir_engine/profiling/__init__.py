"""The library behind `opir profile`: latency, throughput, FLOPs, memory and where the time goes.

For each size the model runs `warmup` times, then `runs` timed times (CUDA: events and a
synchronise; CPU: `perf_counter`, CPU ops being synchronous). With `compare="promptir"` the
PromptIR model is timed in the same process on the same inputs, its calls interleaved with
OPIR's round by round, so a change in machine load hits both alike and the ratio holds on a
busy machine even when the absolute times do not.

FLOPs follow torch.utils.flop_counter: a multiply-add is 2 FLOPs; convolutions and matrix
products are counted (no biases, normalisations or activations) plus the FLOP formula the
inverse-operator op registers. GMACs are FLOPs / 2 (the convention of thop and of most
restoration papers' "FLOPs" columns). `count_opir_flops` derives the same count analytically
from the config and adds an estimate of the elementwise work torch does not count.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from opir_engine import devices
from opir_engine.devices import pick_device, pick_dtype
from opir_engine.model import OPIR, OPIRConfig, OPIROutput
from opir_engine.model.padding import crop_to, pad_to_multiple
from opir_engine.profiling.promptir import PromptIR
from opir_engine.weights import CheckpointError, load_checkpoint, resolve_weights
from opir_kernels.inverse_operator import inverse_operator, inverse_operator_flops


class ProfileError(Exception):
    """Base class of the errors `opir profile` reports."""


class SizeError(ProfileError):
    """A --sizes entry cannot be parsed."""


class DeviceError(ProfileError):
    """The requested device is unknown or not available."""


class PrecisionError(ProfileError):
    """The requested precision is unknown."""


class WeightsError(ProfileError):
    """The weights name or path does not resolve to a checkpoint."""


NAMED_SIZES: dict[str, tuple[int, int]] = {
    "720p": (720, 1280),
    "1080p": (1080, 1920),
    "1440p": (1440, 2560),
    "4k": (2160, 3840),
}
COMPARE_MODELS: tuple[str, ...] = ("none", "promptir")

# Elementwise costs in FLOPs per element, for the part of the analytic count torch omits.
_LAYERNORM_FLOPS = 8  # mean, variance (sub, square, add), normalise (sub, mul), affine (mul, add)
_GELU_FLOPS = 8  # erf-based GELU, roughly
# Peak DRAM bandwidth (GB/s) by device-name fragment, used when the driver does not report it.
_PEAK_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("T4", 320.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


# ---------------------------------------------------------------------------------------------
# Sizes, devices, precisions, models
# ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse "256,512,1080p,4k" -> [(256, 256), (512, 512), (1080, 1920), (2160, 3840)] (H, W).

    An entry is a side N (an N x N square), WIDTHxHEIGHT as resolutions are written
    (1920x1080 -> (1080, 1920)), or one of 720p, 1080p, 1440p, 4k.
    """
    sizes = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            raise SizeError(f"--sizes {text!r}: empty entry")
        if entry in NAMED_SIZES:
            sizes.append(NAMED_SIZES[entry])
            continue
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", entry)
        if match is None:
            names = ", ".join(NAMED_SIZES)
            raise SizeError(f"--sizes {text!r}: {raw.strip()!r} is not N, WxH or one of {names}")
        width = int(match.group(1))
        height = int(match.group(2)) if match.group(2) else width
        if width < 1 or height < 1:
            raise SizeError(f"--sizes {text!r}: {raw.strip()!r} has a zero side")
        sizes.append((height, width))
    return sizes


def label_size(size: tuple[int, int]) -> str:
    """(H, W) -> "256" for squares, "1920x1080" (W x H) otherwise."""
    height, width = size
    return str(height) if height == width else f"{width}x{height}"


def resolve_device(name: str) -> torch.device:
    """The engine's device rule ("auto": CUDA when available); DeviceError otherwise."""
    try:
        return pick_device(name)
    except devices.DeviceError as e:
        raise DeviceError(f"--device: {e}") from e


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The engine's precision rule ("auto": bf16/fp16 on CUDA, fp32 on CPU)."""
    try:
        return pick_dtype(name, device)
    except devices.DeviceError as e:
        raise PrecisionError(f"--precision: {e}") from e


def build_opir(
    config: str | OPIRConfig | None = "paper",
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[OPIR, str]:
    """OPIR from a checkpoint (weights win over config) or with random weights from a config.

    Returns (model in eval mode on `device` in `dtype`, a label such as "OPIR paper").
    """
    if weights is not None:
        try:
            path = resolve_weights(weights)
            model, _ = load_checkpoint(path, device=device, dtype=dtype)
        except CheckpointError as e:
            raise WeightsError(str(e)) from e
        return model.eval(), f"OPIR {path.stem}"
    if isinstance(config, OPIRConfig):
        cfg, name = config, "custom"
    else:
        try:
            cfg, name = OPIRConfig.from_name(config or "paper"), config or "paper"
        except ValueError as e:
            raise ProfileError(f"--config: {e}") from e
    torch.manual_seed(0)
    return OPIR(cfg).to(device=device, dtype=dtype).eval(), f"OPIR {name}"


def build_promptir(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PromptIR:
    """PromptIR at its published size with random weights (seeded), for timing."""
    torch.manual_seed(0)
    return PromptIR().to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward, by kind; a multiply-add counts 2."""

    convolutions: int
    linears: int  # linear layers and matrix products
    operator: int  # the inverse-operator op's registered formula, all stages
    elementwise: int  # estimate: norms, gates, activations, biases, residuals

    @property
    def counted(self) -> int:
        """What torch.utils.flop_counter counts: convolutions, matrix products, the op."""
        return self.convolutions + self.linears + self.operator

    @property
    def total(self) -> int:
        return self.counted + self.elementwise


def _nafblock_flops(channels: int, pixels: int, batch: int) -> tuple[int, int]:
    """(conv FLOPs, elementwise FLOPs) of one NAFBlock (hidden width 2C) on `pixels` pixels.

    Convs per pixel: 1x1 C->2C, depthwise 3x3 on 2C, 1x1 C->C, 1x1 C->2C, 1x1 C->C, i.e.
    6C^2 + 18C multiply-adds, plus the channel attention's C x C on the pooled vector.
    Elementwise per pixel: 2 LayerNorms, 6 bias adds (8C), 2 gates, pool, scale, and the
    two scaled residuals (8C): about 32C.
    """
    c = channels
    conv = batch * (2 * pixels * (6 * c * c + 18 * c) + 2 * c * c)
    elementwise = batch * pixels * (2 * _LAYERNORM_FLOPS * c + 16 * c)
    return conv, elementwise


def _kpn_flops(config: OPIRConfig, height: int, width: int, batch: int) -> tuple[int, int]:
    """(conv FLOPs, elementwise FLOPs) of one KPN pass on (batch, 3, height, width)."""
    w, hw, scales = config.width, height * width, len(config.dilations)
    outputs = 9 + scales + 3
    conv = batch * 2 * hw * 3 * w * 9  # intro 3x3
    elementwise = batch * hw * w  # its bias
    conv += batch * 2 * hw * w * outputs * 9  # ending 3x3
    elementwise += batch * hw * (outputs + 9)  # its bias, the identity tap offset
    levels = len(config.enc_blocks)
    for level in range(levels):
        c, pixels = w * 2**level, hw // 4**level
        blocks = config.enc_blocks[level] + config.dec_blocks[level]
        block_conv, block_elem = _nafblock_flops(c, pixels, batch)
        conv += blocks * block_conv
        elementwise += blocks * block_elem
        # Down: 2x2 stride-2 C -> 2C; up: 1x1 2C -> 4C at the level below, then pixel-shuffle.
        conv += batch * 2 * (pixels // 4) * (2 * c) * c * 4
        conv += batch * 2 * (pixels // 4) * (2 * c) * (4 * c)
        elementwise += batch * (pixels // 4) * (2 * c + 4 * c)
    c, pixels = w * 2**levels, hw // 4**levels
    block_conv, block_elem = _nafblock_flops(c, pixels, batch)
    return conv + config.middle_blocks * block_conv, elementwise + config.middle_blocks * block_elem


def _trunk_classifier_flops(
    config: OPIRConfig, height: int, width: int, batch: int
) -> tuple[int, int, int]:
    """(conv, linear, elementwise FLOPs) of the `trunk` classifier (model/classifier.py):
    stem 3x3/2 then 2x2/2, a NAFBlock per level, padded 3x3/2 downs, mean/std pooling, MLP."""
    w, num_classes = config.classifier_width, len(config.classes)
    h, wd = -(-height // 2), -(-width // 2)  # 3x3 stride 2, padding 1: ceil
    conv = batch * 2 * h * wd * 3 * w * 9
    elementwise = batch * h * wd * w * (1 + _GELU_FLOPS)
    h, wd = h // 2, wd // 2  # 2x2 stride 2
    conv += batch * 2 * h * wd * w * w * 4
    c = w
    for level in range(4):
        block_conv, block_elem = _nafblock_flops(c, h * wd, batch)
        conv, elementwise = conv + block_conv, elementwise + block_elem
        if level < 3:
            h, wd = -(-h // 2), -(-wd // 2)
            conv += batch * 2 * h * wd * c * 2 * c * 9
            c *= 2
    elementwise += batch * 3 * h * wd * c  # mean and standard deviation
    linear = batch * 2 * (2 * c * config.head_hidden + config.head_hidden * num_classes)
    return conv, linear, elementwise + batch * _GELU_FLOPS * config.head_hidden


def count_opir_flops(config: OPIRConfig, height: int, width: int, batch: int = 1) -> FlopCount:
    """Analytic FLOPs of one OPIR forward (auto task) on (batch, 3, height, width).

    `counted` matches torch.utils.flop_counter term by term: the KPN's convolutions (once per
    stage), the degradation classifier (the bottleneck head's two linears, or the trunk's
    convolutions and linears), each TAM's task projection and its per-tap
    output layer (a hidden -> 1 linear on all 9 HW taps), and the op's formula per stage.
    `elementwise` adds what torch leaves out (LayerNorms, gates, GELUs, biases, residuals).
    """
    hw, stages = height * width, config.stages
    num_classes, levels = len(config.classes), len(config.enc_blocks)
    kpn_conv, kpn_elem = _kpn_flops(config, height, width, batch)
    bottleneck = config.width * 2**levels
    head_conv = 0
    head = batch * 2 * (2 * bottleneck * config.head_hidden + config.head_hidden * num_classes)
    head_elem = batch * (2 * bottleneck * (hw // 4**levels) + _GELU_FLOPS * config.head_hidden)
    if config.classifier == "trunk":
        head_conv, head, head_elem = _trunk_classifier_flops(config, height, width, batch)
    tam, tam_elem = 0, 0
    if config.use_tam:
        hidden, taps = config.tam_hidden, 9 * hw
        tam = batch * 2 * (num_classes * config.task_dim + config.task_dim * hidden + taps * hidden)
        tam_elem = batch * taps * ((3 + _GELU_FLOPS) * hidden + 1)
    op = inverse_operator_flops(batch, 3, height, width, len(config.dilations), config.use_tam)
    guide = batch * 3 * hw if stages == 2 and config.use_uncertainty else 0
    return FlopCount(
        convolutions=stages * kpn_conv + head_conv,
        linears=head + stages * tam,
        operator=stages * op,
        elementwise=stages * (kpn_elem + tam_elem) + head_elem + guide,
    )


def count_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> int:
    """torch.utils.flop_counter's count for one forward on (batch, 3, height, width).

    Runs on a meta-device twin of the model built from its config: shapes only, no data, so
    counting a 4K forward of a 35 M-parameter model takes a second on any machine.
    """
    with torch.device("meta"):
        twin = type(model)(model.config).eval()
    with FlopCounterMode(display=False) as counter:
        twin(torch.empty(batch, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, measured after the device has finished it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_interleaved(
    fns: Sequence[Callable[[], object]], runs: int, warmup: int, device: torch.device
) -> list[list[float]]:
    """Per function, `runs` times in seconds; each round calls every function once in turn."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, series in zip(fns, times, strict=True):
            series.append(_time_once(fn, device))
    return times


def _percentile_ms(times: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next forward must fault them in
    again and shows in the peak; otherwise the warm-up's freed buffers hide its memory."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(name).malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_peak_memory(
    fn: Callable[[], object], device: torch.device
) -> tuple[float | None, float | None, str]:
    """(peak MB, growth MB over the memory held before the call, what was measured).

    CUDA: the caching allocator's peak, reset before the call. CPU (Linux): the kernel's
    peak resident set (VmHWM, reset through /proc/self/clear_refs) after trimming the heap,
    minus the resident set before the call; elsewhere (None, None).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2**20, (peak - before) / 2**20, "CUDA allocator peak"
    _trim_heap()
    before = _read_status_kb("VmRSS")
    if before is None or not _reset_peak_rss():
        return None, None, "unavailable (needs Linux /proc)"
    fn()
    peak = _read_status_kb("VmHWM") or before
    return peak / 1024, (peak - before) / 1024, "CPU peak RSS (VmHWM)"


def _peak_bandwidth_gbs(device: torch.device) -> tuple[float | None, str]:
    """(peak DRAM GB/s of the GPU, where the figure comes from)."""
    if device.type != "cuda":
        return None, "none"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "driver (2 x clock x bus width)"
    name = torch.cuda.get_device_name(device)
    for fragment, gbs in _PEAK_BANDWIDTH_GBS:
        if fragment in name:
            return gbs, f"datasheet ({fragment})"
    return None, "unknown device"


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class PartTiming:
    """One part of the OPIR forward, timed alone on the inputs the full forward gives it."""

    name: str
    ms_p50: float
    ms_p95: float
    share: float  # ms_p50 / full-forward p50


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
    parts_unaccounted_ms: float | None = None  # full p50 - sum of parts' p50
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
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[SizeProfile] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write_json(self, path: Path) -> None:
        """Write the report to `path` (parents created), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, torch and Python versions, GPU, and the load right now."""
    machine: dict[str, Any] = {
        "cpu": _cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        machine["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        peak, source = _peak_bandwidth_gbs(device)
        machine["gpu_peak_bandwidth_gbs"] = peak
        machine["gpu_peak_bandwidth_source"] = source
    return machine


# ---------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------


def _restored(output: OPIROutput | Tensor) -> Tensor:
    return output.restored if isinstance(output, OPIROutput) else output


def _full_forward(net: Callable, image: Tensor, multiple: int) -> Callable[[], Tensor]:
    """What the engine does per batch: pad to the model's multiple, forward, crop back."""

    def run() -> Tensor:
        padded, size = pad_to_multiple(image, multiple)
        return crop_to(_restored(net(padded)), size)

    return run


def _opir_parts(
    model: OPIR, image: Tensor, compile: bool
) -> tuple[list[tuple[str, Callable[[], object]]], Callable[[], object]]:
    """The parts of one OPIR forward as separate calls on the inputs the forward gives them,
    plus the op alone (all stages, precomputed modulation) for its bandwidth.

    Compiled, each part is compiled on its own (a compiled whole may fuse across parts, so
    the parts can then sum to more than the whole).
    """
    wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compile else (lambda f: f)
    kpn = wrap(model.kpn)
    apply_operator = wrap(model._apply_operator)  # TAM + op: the stage's operator, Eq. 9-10
    cfg, multiple = model.config, model.multiple_of
    x, size = pad_to_multiple(image, multiple)
    kpn1 = kpn(x)
    if cfg.classifier == "trunk":  # its own trunk on the image
        trunk = wrap(model.classifier)
        classify = lambda: torch.softmax(trunk(x), dim=1)  # noqa: E731
    else:  # the head on the stage-1 bottleneck
        head = wrap(model.head)
        classify = lambda: torch.softmax(head(kpn1.bottleneck), dim=1)  # noqa: E731
    weights = classify()
    j1, uncertainty = apply_operator(x, kpn1, 0, weights)

    def pad_and_crop() -> Tensor:
        return crop_to(pad_to_multiple(image, multiple)[0], size)

    parts: list[tuple[str, Callable[[], object]]] = [
        ("pre/post-processing (pad, crop)", pad_and_crop),
        ("KPN stage 1", lambda: kpn(x)),
        ("degradation classifier", classify),
        ("op stage 1 (TAM + op)", lambda: apply_operator(x, kpn1, 0, weights)),
    ]
    op_inputs = [(x, kpn1)]
    if cfg.stages == 2:
        guide = (lambda: j1 * uncertainty) if cfg.use_uncertainty else (lambda: j1)
        kpn2 = kpn(guide())
        parts += [
            ("KPN stage 2", lambda: kpn(guide())),
            ("op stage 2 (TAM + op)", lambda: apply_operator(j1, kpn2, 1, weights)),
        ]
        op_inputs.append((j1, kpn2))
    modulations = [
        model.tams[s](k.kernel, weights) if cfg.use_tam else None
        for s, (_, k) in enumerate(op_inputs)
    ]

    def op_alone() -> None:
        for (img, k), modulation in zip(op_inputs, modulations, strict=True):
            inverse_operator(img, k.kernel, modulation, k.fusion_logits, k.bias, cfg.dilations)

    return parts, wrap(op_alone)


def _op_bytes(model: OPIR, batch: int, height: int, width: int, element_size: int) -> int:
    """Bytes the op moves per forward, all stages: reads image, kernel, modulation, logits and
    bias, writes the result and UM (the image read once: its taps hit cache)."""
    cfg, channels = model.config, 3
    per_pixel = 2 * channels + 9 * (1 + int(cfg.use_tam)) + len(cfg.dilations) + channels + 1
    return cfg.stages * batch * height * width * per_pixel * element_size


@dataclass(frozen=True)
class ProfileSettings:
    """What `opir profile` was asked for (the CLI's options, validated by `run_profile`)."""

    config: str | None = "paper"
    weights: str | None = None
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (512, 512))
    batch: int = 1
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    runs: int = 10
    warmup: int = 2
    breakdown: bool = True
    compare: str = "none"
    threads: int | None = None  # CPU threads for torch (None: torch's default)


def run_profile(
    settings: ProfileSettings, progress: Callable[[str], None] | None = None
) -> ProfileReport:
    """Profile OPIR (and PromptIR with compare="promptir") at every size; see the module doc.

    `progress` receives one line per step (e.g. a rich console's `log`). Returns a
    ProfileReport; raises ProfileError subclasses for bad settings.
    """
    if settings.runs < 1 or settings.warmup < 0 or settings.batch < 1:
        raise ProfileError("--runs and --batch must be at least 1, --warmup at least 0")
    if settings.compare not in COMPARE_MODELS:
        raise ProfileError(f"--compare {settings.compare!r}: choose one of {COMPARE_MODELS}")
    if settings.compile and settings.warmup < 1:
        raise ProfileError("--compile needs --warmup of at least 1 (the first call compiles)")
    if settings.threads is not None and settings.threads < 1:
        raise ProfileError("--threads must be at least 1")
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run_profile(settings, progress)
    finally:
        torch.set_num_threads(threads)


def _run_profile(
    settings: ProfileSettings, progress: Callable[[str], None] | None
) -> ProfileReport:
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    say = progress or (lambda _line: None)
    opir, opir_name = build_opir(settings.config, settings.weights, device, dtype)
    models: list[tuple[str, nn.Module]] = [(opir_name, opir)]
    if settings.compare == "promptir":
        models.append(("PromptIR", build_promptir(device, dtype)))
    report = ProfileReport(describe_machine(device), dataclasses.asdict(settings))
    report.settings["device"], report.settings["dtype"] = str(device), str(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for size in settings.sizes:
            say(f"{label_size(size)}: timing {', '.join(n for n, _ in models)}")
            image = torch.rand(settings.batch, 3, *size, generator=generator)
            results = profile_models(models, image.to(device, dtype), settings, device, say)
            report.results += results
            if len(results) == 2:
                report.comparisons.append(compare_results(results[0], results[1]))
    report.machine["load_average_1min_end"] = (
        round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    )
    return report


def profile_models(
    models: list[tuple[str, nn.Module]],
    image: Tensor,
    settings: ProfileSettings,
    device: torch.device,
    say: Callable[[str], None] = lambda _line: None,
) -> list[SizeProfile]:
    """Profile (name, model) pairs on one input (B, 3, H, W), their runs interleaved.

    Each model pads the input to its own multiple. OPIR models also get the analytic FLOPs
    and, with `settings.breakdown`, the per-part timings and the op's bandwidth.
    """
    if settings.compile:
        torch._dynamo.reset()  # one size at a time: no recompile limit across many sizes
    nets = [
        torch.compile(m, fullgraph=True, dynamic=False) if settings.compile else m
        for _, m in models
    ]
    fns = [_full_forward(n, image, m.multiple_of) for n, (_, m) in zip(nets, models, strict=True)]
    times = time_interleaved(fns, settings.runs, settings.warmup, device)
    results = []
    for (name, model), fn, series in zip(models, fns, times, strict=True):
        result = _summarise(name, model, image, series, fn, device)
        if isinstance(model, OPIR):
            _add_opir_details(result, model, image, settings, device, say)
        results.append(result)
    return results


def _summarise(
    name: str,
    model: nn.Module,
    image: Tensor,
    series: list[float],
    fn: Callable[[], object],
    device: torch.device,
) -> SizeProfile:
    batch, _, height, width = image.shape
    multiple = model.multiple_of
    padded_h, padded_w = height + (-height % multiple), width + (-width % multiple)
    p50 = _percentile_ms(series, 50)
    flops = count_flops(model, padded_h, padded_w)
    peak, growth, measure = measure_peak_memory(fn, device)
    return SizeProfile(
        model=name,
        size=label_size((height, width)),
        height=height,
        width=width,
        padded_height=padded_h,
        padded_width=padded_w,
        batch=batch,
        latency_ms_p50=p50,
        latency_ms_p95=_percentile_ms(series, 95),
        images_per_s=batch / (p50 / 1e3),
        megapixels_per_s=batch * height * width / 1e6 / (p50 / 1e3),
        gflops_per_image=flops / 1e9,
        gmacs_per_image=flops / 2e9,
        achieved_gflops_per_s=batch * flops / 1e9 / (p50 / 1e3),
        parameters=sum(p.numel() for p in model.parameters()),
        peak_memory_mb=peak,
        peak_memory_growth_mb=growth,
        memory_measure=measure,
    )


def _add_opir_details(
    result: SizeProfile,
    model: OPIR,
    image: Tensor,
    settings: ProfileSettings,
    device: torch.device,
    say: Callable[[str], None],
) -> None:
    """Analytic FLOPs, the per-part breakdown and the op's bandwidth."""
    analytic = count_opir_flops(model.config, result.padded_height, result.padded_width)
    result.analytic_gflops_per_image = analytic.counted / 1e9
    result.analytic_elementwise_gflops = analytic.elementwise / 1e9
    if not settings.breakdown:
        return
    say(f"{result.size}: timing the parts of {result.model}")
    parts, op_alone = _opir_parts(model, image, settings.compile)
    times = time_interleaved(
        [fn for _, fn in parts] + [op_alone], settings.runs, settings.warmup, device
    )
    for (name, _), series in zip(parts, times, strict=False):
        p50 = _percentile_ms(series, 50)
        p95 = _percentile_ms(series, 95)
        result.parts.append(PartTiming(name, p50, p95, p50 / result.latency_ms_p50))
    result.parts_unaccounted_ms = result.latency_ms_p50 - sum(p.ms_p50 for p in result.parts)
    result.op_ms_p50 = _percentile_ms(times[-1], 50)
    moved = _op_bytes(
        model, result.batch, result.padded_height, result.padded_width, image.element_size()
    )
    result.op_gb_per_s = moved / 1e9 / (result.op_ms_p50 / 1e3)
    peak, _ = _peak_bandwidth_gbs(device)
    if peak:
        result.op_bandwidth_pct_of_peak = 100 * result.op_gb_per_s / peak


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


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render_report(report: ProfileReport, console: Any) -> None:
    """Print the report as rich tables: figures per model and size, parts, ratios."""
    from rich.table import Table

    m, s = report.machine, report.settings
    console.print(
        f"[bold]{m['cpu']}[/], {m['logical_cores']} cores, torch {m['torch']} on {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; {s['precision']}, batch {s['batch']}, {'compiled' if s['compile'] else 'eager'}, "
        f"{s['runs']} runs after {s['warmup']} warm-up"
    )
    table = Table(title="Latency and throughput per image (FLOPs: multiply-add = 2)")
    for column in ("model", "size", "padded", "p50 ms", "p95 ms", "img/s", "MP/s", "GFLOPs",
                   "GMACs", "GFLOP/s", "params", "peak MB (+growth)"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "size") else "right")
    for r in report.results:
        memory = f"{_fmt(r.peak_memory_mb, '.0f')} (+{_fmt(r.peak_memory_growth_mb, '.0f')})"
        table.add_row(
            r.model, r.size, f"{r.padded_width}x{r.padded_height}",
            _fmt(r.latency_ms_p50), _fmt(r.latency_ms_p95), _fmt(r.images_per_s, ".2f"),
            _fmt(r.megapixels_per_s, ".2f"), _fmt(r.gflops_per_image), _fmt(r.gmacs_per_image),
            _fmt(r.achieved_gflops_per_s), f"{r.parameters / 1e6:.2f} M", memory,
        )  # fmt: skip
    console.print(table)
    for r in report.results:
        if not r.parts:
            continue
        parts = Table(
            title=f"{r.model} at {r.size}: parts timed alone (p50 {r.latency_ms_p50:.1f} ms)"
        )
        parts.add_column("part")
        parts.add_column("ms", justify="right")
        parts.add_column("% of forward", justify="right")
        for p in r.parts:
            parts.add_row(p.name, _fmt(p.ms_p50, ".2f"), _fmt(100 * p.share))
        parts.add_row("unaccounted (full - sum)", _fmt(r.parts_unaccounted_ms, ".2f"), "")
        bandwidth = f"{_fmt(r.op_gb_per_s)} GB/s"
        if r.op_bandwidth_pct_of_peak is not None:
            bandwidth += f", {r.op_bandwidth_pct_of_peak:.0f}% of peak"
        parts.add_row("op alone, all stages", _fmt(r.op_ms_p50, ".2f"), bandwidth)
        console.print(parts)
    if report.comparisons:
        ratios = Table(title="PromptIR / OPIR (same process, same inputs, interleaved runs)")
        for column in ("size", "OPIR ms", "PromptIR ms", "latency ratio", "OPIR GFLOPs",
                       "PromptIR GFLOPs", "FLOPs ratio"):  # fmt: skip
            ratios.add_column(column, justify="left" if column == "size" else "right")
        for c in report.comparisons:
            ratios.add_row(
                c.size, _fmt(c.opir_latency_ms_p50), _fmt(c.promptir_latency_ms_p50),
                f"{c.latency_ratio:.2f}x", _fmt(c.opir_gflops), _fmt(c.promptir_gflops),
                f"{c.flops_ratio:.2f}x",
            )  # fmt: skip
        console.print(ratios)
    console.print(f"memory: {report.results[0].memory_measure}" if report.results else "")
