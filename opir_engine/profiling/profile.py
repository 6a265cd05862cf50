"""Profiling a model: latency, throughput, FLOPs, memory and where the time goes.

For each size the model runs `warmup` times, then `runs` timed times (profiling/timing.py).
With `compare="promptir"` the PromptIR model is timed in the same process on the same inputs,
its calls interleaved with OPIR's round by round, so a change in machine load hits both alike
and the ratio holds on a busy machine even when the absolute times do not.

FLOPs follow torch.utils.flop_counter: a multiply-add is 2 FLOPs; convolutions and matrix
products are counted (no biases, normalisations or activations) plus the FLOP formula the
inverse-operator op registers. GMACs are FLOPs / 2 (the convention of thop and of most
restoration papers' "FLOPs" columns). For OPIR, `opir_engine.model.flops.count_opir_flops`
derives the same count from the config and adds an estimate of the elementwise work torch
does not count.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from opir_engine.devices import keep_freed_memory, pick_device, pick_dtype
from opir_engine.model import OPIR, OPIRConfig, OPIROutput
from opir_engine.model.flops import count_opir_flops
from opir_engine.model.padding import crop_to, pad_to_multiple
from opir_engine.profiling.machine import describe_machine, peak_bandwidth_gbs
from opir_engine.profiling.promptir import PromptIR
from opir_engine.profiling.report import (
    PartTiming,
    ProfileReport,
    SizeProfile,
    compare_results,
)
from opir_engine.profiling.settings import (
    ProfileError,
    ProfileSettings,
    WeightsError,
    check_settings,
    label_size,
)
from opir_engine.profiling.timing import measure_peak_memory, percentile_ms, time_interleaved
from opir_engine.weights import DEFAULT_WEIGHTS, CheckpointError, load_checkpoint, resolve_weights
from opir_kernels.inverse_operator import inverse_operator
from opir_kernels.tam_modulation import tam_form


def build_opir(
    config: str | OPIRConfig | None = None,
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[OPIR, str]:
    """OPIR from a checkpoint or with random weights from a config, not both; neither: the
    shipped weights `opir restore` uses (DEFAULT_WEIGHTS).

    Returns (model in eval mode on `device` in `dtype`, a label such as "OPIR paper").
    """
    if config is not None and weights is not None:
        raise ProfileError(
            f"weights {str(weights)!r} and a preset are two models: profile one at a time",
            setting="config",
        )
    if config is None and weights is None:
        weights = DEFAULT_WEIGHTS
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
            cfg, name = OPIRConfig.from_name(config), config
        except ValueError as e:
            raise ProfileError(str(e), setting="config") from e
    torch.manual_seed(0)
    return OPIR(cfg).to(device=device, dtype=dtype).eval(), f"OPIR {name}"


def build_promptir(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PromptIR:
    """PromptIR at its published size with random weights (seeded), for timing."""
    torch.manual_seed(0)
    return PromptIR().to(device=device, dtype=dtype).eval()


def count_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> int:
    """torch.utils.flop_counter's count for one forward on (batch, 3, height, width).

    Runs on a meta-device twin of the model built from its config: shapes only, no data, so
    counting a 4K forward of a 35 M-parameter model takes a second on any machine. The TAM is
    counted in its direct form, the model as the paper defines it (its MLP at every tap), so
    the figure compares with other models' and with `count_opir_flops`; the tabulated form
    that runs does less arithmetic than that.
    """
    with torch.device("meta"):
        twin = type(model)(model.config).eval()
    with FlopCounterMode(display=False) as counter, tam_form("direct"):
        twin(torch.empty(batch, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


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


def run_profile(
    settings: ProfileSettings, progress: Callable[[str], None] | None = None
) -> ProfileReport:
    """Profile OPIR (and PromptIR with compare="promptir") at every size; see the module doc.

    `progress` receives one line per step (e.g. a rich console's `log`). Returns a
    ProfileReport; raises ProfileError for bad settings, and opir_engine.devices.DeviceError
    for a device or precision this machine cannot provide.
    """
    check_settings(settings)
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
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # as the engine and the trainer run: the figures are theirs
    say = progress or (lambda _line: None)
    opir, opir_name = build_opir(settings.config, settings.weights, device, dtype)
    models: list[tuple[str, nn.Module]] = [(opir_name, opir)]
    if settings.compare == "promptir":
        models.append(("PromptIR", build_promptir(device, dtype)))
    report = ProfileReport(describe_machine(device), dataclasses.asdict(settings))
    if settings.config is None and settings.weights is None:
        report.settings["weights"] = DEFAULT_WEIGHTS  # what was profiled, not just "none given"
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
            _add_opir_details(result, model, image, fn, settings, device, say)
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
    p50 = percentile_ms(series, 50)
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
        latency_ms_p95=percentile_ms(series, 95),
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
    whole: Callable[[], object],
    settings: ProfileSettings,
    device: torch.device,
    say: Callable[[str], None],
) -> None:
    """Analytic FLOPs, the per-part breakdown and the op's bandwidth.

    The parts are timed in the same rounds as `whole` (the full forward), so a change in load
    hits both alike. Their p50s need not add up to the whole's: each median has its noise,
    and a part alone misses (or gains) the overlap and caching of the whole. The difference
    is judged against the runs' spread, each one's p95 - p50 summed over the whole and the
    parts, and reported as within it or not, rather than as a time of its own.
    """
    analytic = count_opir_flops(model.config, result.padded_height, result.padded_width)
    result.analytic_gflops_per_image = analytic.counted / 1e9
    result.analytic_elementwise_gflops = analytic.elementwise / 1e9
    if not settings.breakdown:
        return
    say(f"{result.size}: timing the parts of {result.model}")
    parts, op_alone = _opir_parts(model, image, settings.compile)
    times = time_interleaved(
        [whole] + [fn for _, fn in parts] + [op_alone], settings.runs, settings.warmup, device
    )
    whole_p50, whole_p95 = percentile_ms(times[0], 50), percentile_ms(times[0], 95)
    for (name, _), series in zip(parts, times[1:-1], strict=True):
        p50 = percentile_ms(series, 50)
        result.parts.append(
            PartTiming(name, p50, percentile_ms(series, 95), p50 / whole_p50,
                       ms_min=min(series) * 1e3, ms_max=max(series) * 1e3)
        )  # fmt: skip
    result.parts_whole_ms_p50, result.parts_whole_ms_p95 = whole_p50, whole_p95
    result.parts_sum_ms_p50 = sum(p.ms_p50 for p in result.parts)
    result.parts_unaccounted_ms = whole_p50 - result.parts_sum_ms_p50
    if settings.runs > 1:  # one run has no spread to judge by
        spreads = [whole_p95 - whole_p50] + [p.ms_p95 - p.ms_p50 for p in result.parts]
        result.parts_noise_ms = sum(spreads)
        result.parts_within_noise = abs(result.parts_unaccounted_ms) <= result.parts_noise_ms
    result.op_ms_p50 = percentile_ms(times[-1], 50)
    moved = _op_bytes(
        model, result.batch, result.padded_height, result.padded_width, image.element_size()
    )
    result.op_gb_per_s = moved / 1e9 / (result.op_ms_p50 / 1e3)
    peak, _ = peak_bandwidth_gbs(device)
    if peak:
        result.op_bandwidth_pct_of_peak = 100 * result.op_gb_per_s / peak
