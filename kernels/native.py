"""The native CPU kernels, built at first use and called by ctypes: the op's
(`inverse_operator_cpu.c`, wrapped here) and the NAFBlock's LayerNorm and gate
(`nafblock_cpu.c`, wrapped in `layer_norm.py` and `gate.py`).

The C sources are compiled together once per machine with the system C compiler (the same
requirement as `torch.compile` on CPU and Triton) into one library in a per-user cache, keyed
by a hash of the sources, the flags and the CPU, so a shared home directory on a cluster never
hands one machine a library built for another CPU's instruction set. Where no compiler is found
or the build fails, `available()` is False, `unavailable_reason()` says why, and the op and the
LayerNorm run their PyTorch references instead (the op says so once,
`op._say_native_fallback_once`).

Rows are split across `torch.get_num_threads()` Python threads, one ctypes call each (ctypes
releases the GIL), rather than with OpenMP: a second OpenMP runtime's spinning threads would
compete with torch's own pool for the cores between calls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("inverse_operator_cpu.c")
SOURCES = (SOURCE, Path(__file__).with_name("nafblock_cpu.c"))
# gnu11, not c11: ISO mode turns off fused multiply-add contraction. The first set that builds
# is used: -march=native for this CPU's vector unit; on x86 512-bit vectors preferred, since gcc
# otherwise splits the source's 64-byte vectors into two 32-byte halves and spills registers.
# -Werror=implicit-function-declaration: a misspelt helper must fail the build, not leave a
# library with an unresolved symbol in the cache.
_BASE_FLAGS = (
    "-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno",
    "-Werror=implicit-function-declaration",
)  # fmt: skip
# -fopenmp: nafblock_cpu.c splits its pixels with OpenMP, sharing the runtime PyTorch loaded
# (its header says why); a compiler without OpenMP builds the next set, one thread per call.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    (*_BASE_FLAGS, "-march=native", "-mprefer-vector-width=512", "-fopenmp"),
    (*_BASE_FLAGS, "-march=native", "-mprefer-vector-width=512"),
    (*_BASE_FLAGS, "-march=native"),
    _BASE_FLAGS,
)
MAX_SCALES = 16  # MAX_S in the C source
TURNED_OFF = "turned off by OPIR_NATIVE=0"  # the reason given when a user chose the reference
_MIN_ROWS_PER_THREAD = 16  # below this a second thread costs more than it saves

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _compiler() -> str:
    """$CC when set (and only it), else the first of cc, gcc, clang on PATH."""
    chosen = os.environ.get("CC")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise RuntimeError(f"CC={chosen} is not a program on PATH")
        return found
    for name in ("cc", "gcc", "clang"):
        if found := shutil.which(name):
            return found
    raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    root = os.environ.get("OPIR_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    return (base if os.environ.get("OPIR_CACHE_DIR") else base / "opir") / "native"


def _build() -> ctypes.CDLL:
    # The key is what the machine code depends on (not the compiler: a cached library loads
    # on a machine that has none).
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join((*texts, repr(FLAG_SETS), _cpu_signature())).encode())
    target = _cache_dir() / f"opir_native-{key.hexdigest()[:16]}.so"
    if not target.exists():
        compiler = _compiler()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed into place: concurrent processes (Ray
        # actors, pytest workers) never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            for flags in FLAG_SETS:
                done = subprocess.run(
                    [compiler, *flags, *map(str, SOURCES), "-o", tmp],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if done.returncode == 0:
                    break
            else:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                names = ", ".join(source.name for source in SOURCES)
                raise RuntimeError(f"{Path(compiler).name} failed on {names}: {last}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    library = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    library.opir_inverse_operator_forward.argtypes = [p] * 6 + [i64] * 4 + [p, p, p, i64, i64]
    library.opir_inverse_operator_backward.argtypes = [p] * 7 + [i64] * 4 + [p] * 5 + [i64] * 2
    library.opir_inverse_operator_forward.restype = None
    library.opir_inverse_operator_backward.restype = ctypes.c_int
    f32 = ctypes.c_float
    i32 = ctypes.c_int
    # each ends in `half`: which maps are bf16, a bit per map argument in order
    library.opir_layer_norm_forward.argtypes = [p] * 5 + [f32, i64] + [p] * 4 + [i64, i32, i32]
    library.opir_layer_norm_backward.argtypes = [p] * 8 + [i64] + [p] * 5 + [i64, i32, i32]
    library.opir_gate_forward.argtypes = [p, i64, i64, p, p, i64, i32, i32]
    library.opir_gate_backward.argtypes = [p, p, p, i64, i64, p, i64, i32, i32]
    for name in ("layer_norm_forward", "layer_norm_backward", "gate_forward", "gate_backward"):
        getattr(library, f"opir_{name}").restype = None
    return library


def library() -> ctypes.CDLL | None:
    """The loaded library (built on the first call), or None where it cannot be built."""
    return _load()


def _load() -> ctypes.CDLL | None:
    global _library, _reason
    with _lock:
        if _library is None and _reason is None:
            if os.environ.get("OPIR_NATIVE", "1") == "0":
                _reason = TURNED_OFF
            else:
                try:
                    _library = _build()
                except (RuntimeError, OSError) as error:
                    _reason = str(error)
        return _library


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool there. The lock
    is new too: a fork while another thread held it (during the first build, say) would leave
    the child's copy held forever."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False, or None when it is True."""
    _load()
    return _reason


def supports(image: Tensor, dilations: Sequence[int]) -> bool:
    """Whether the native kernels take these arguments (else the op uses the reference)."""
    return (
        image.device.type == "cpu"
        and image.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and len(dilations) <= MAX_SCALES
        and available()
    )


def _over_rows(fn: Callable[..., int | None], args: list, rows: int) -> None:
    """Call `fn(*args, begin, end)` over [0, rows), split across torch's thread count."""
    global _pool, _pool_size
    threads = max(1, min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD))
    bounds = [rows * t // threads for t in range(threads + 1)]
    if threads == 1:
        results = [fn(*args, 0, rows)]
    else:
        with _lock:
            if _pool is None or _pool_size < threads:
                _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="opir-native")
                _pool_size = threads
            pool = _pool
        futures = [pool.submit(fn, *args, bounds[t], bounds[t + 1]) for t in range(1, threads)]
        results = [fn(*args, bounds[0], bounds[1])] + [f.result() for f in futures]
    if any(r not in (None, 0) for r in results):
        raise MemoryError("opir native kernel: could not allocate its row buffer")


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise_fn = _madvise()


def _empty(shape: Sequence[int]) -> Tensor:
    """A new fp32 output, asked to be backed by 2 MiB pages where it is large.

    The kernels write every element once. With glibc's defaults each big output is a fresh mmap
    that the kernel then faults in 4 KiB at a time: at 1920x1080 the backward's 25 gradient
    planes took ~70 ms of page faults against ~75 ms of arithmetic. Huge pages (what PyTorch's
    THP_MEM_ALLOC_ENABLE does for every tensor) fault 512 times fewer. Only the 2 MiB-aligned
    interior is advised; the call is a hint, and a failure changes nothing.
    """
    out = torch.empty(shape, dtype=torch.float32)
    nbytes = out.numel() * 4
    if _madvise_fn is not None and nbytes >= 4 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _madvise_fn(start, end - start, _MADV_HUGEPAGE)
    return out


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _zero_row(width: int, dilations: Sequence[int]) -> tuple[Tensor, int]:
    """Zeros for taps whose row is outside the image; the pointer sits max(d) in."""
    pad = max(dilations)
    zeros = torch.zeros(width + 2 * pad, dtype=torch.float32)
    return zeros, zeros.data_ptr() + 4 * pad


def forward(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """The op's forward (same contract as `inverse_operator_reference`), fp32 inside."""
    library = _load()
    assert library is not None, "check supports() first"
    out_dtype = image.dtype
    b, c, h, w = image.shape
    image, kernel, modulation, fusion_logits, bias = map(
        _f32, (image, kernel, modulation, fusion_logits, bias)
    )
    dil = torch.tensor(list(dilations), dtype=torch.int64)
    zeros, zero = _zero_row(w, dilations)
    restored = _empty((b, c, h, w))
    uncertainty = _empty((b, 1, h, w))
    args = [
        _ptr(image), _ptr(kernel), _ptr(modulation), _ptr(fusion_logits), _ptr(bias),
        dil.data_ptr(), len(dilations), c, h, w, zero, restored.data_ptr(),
        uncertainty.data_ptr(),
    ]  # fmt: skip
    _over_rows(library.opir_inverse_operator_forward, args, b * h)
    del zeros
    return restored.to(out_dtype), uncertainty.to(out_dtype)


def backward(
    grad_restored: Tensor,
    grad_uncertainty: Tensor,
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    dilations: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """The op's backward (same contract as `inverse_operator_backward_reference`)."""
    library = _load()
    assert library is not None, "check supports() first"
    dtypes = (image.dtype, kernel.dtype, fusion_logits.dtype)
    mod_dtype = None if modulation is None else modulation.dtype
    b, c, h, w = image.shape
    s = len(dilations)
    g, gu, image, kernel, modulation, fusion_logits = map(
        _f32, (grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits)
    )
    dil = torch.tensor(list(dilations), dtype=torch.int64)
    zeros, zero = _zero_row(w, dilations)
    g_image = _empty(image.shape)
    g_kernel = _empty(kernel.shape)
    g_mod = None if modulation is None else _empty(modulation.shape)
    g_logits = _empty(fusion_logits.shape)
    args = [
        _ptr(g), _ptr(gu), _ptr(image), _ptr(kernel), _ptr(modulation), _ptr(fusion_logits),
        dil.data_ptr(), s, c, h, w, zero, _ptr(g_image), _ptr(g_kernel), _ptr(g_mod),
        _ptr(g_logits),
    ]  # fmt: skip
    _over_rows(library.opir_inverse_operator_backward, args, b * h)
    del zeros
    return (
        g_image.to(dtypes[0]),
        g_kernel.to(dtypes[1]),
        None if g_mod is None else g_mod.to(mod_dtype),
        g_logits.to(dtypes[2]),
        grad_restored.to(dtypes[0]),
    )


# ---------------------------------------------------------------------------------------------
# Custom ops: the ctypes calls need real data, so under torch.compile they must stay opaque
# calls (with fake implementations for tracing) rather than be traced into.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("opir::inverse_operator_native", mutates_args=())
def _forward_op(
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    bias: Tensor | None,
    dilations: list[int],
) -> tuple[Tensor, Tensor]:
    return forward(image, kernel, modulation, fusion_logits, bias, dilations)


@_forward_op.register_fake
def _(image, kernel, modulation, fusion_logits, bias, dilations):  # type: ignore[no-untyped-def]
    b, _, h, w = image.shape
    return image.new_empty(image.shape), image.new_empty((b, 1, h, w))


@torch.library.custom_op("opir::inverse_operator_native_backward", mutates_args=())
def _backward_op(
    grad_restored: Tensor,
    grad_uncertainty: Tensor,
    image: Tensor,
    kernel: Tensor,
    modulation: Tensor | None,
    fusion_logits: Tensor,
    dilations: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads for (image, kernel, modulation, logits); modulation's is empty when it is None."""
    g_image, g_kernel, g_mod, g_logits, _ = backward(
        grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits, dilations
    )
    return g_image, g_kernel, kernel.new_empty((0,)) if g_mod is None else g_mod, g_logits


@_backward_op.register_fake
def _(  # type: ignore[no-untyped-def]
    grad_restored, grad_uncertainty, image, kernel, modulation, fusion_logits, dilations
):
    g_mod = kernel.new_empty((0,)) if modulation is None else torch.empty_like(modulation)
    return (
        image.new_empty(image.shape),
        kernel.new_empty(kernel.shape),
        g_mod,
        fusion_logits.new_empty(fusion_logits.shape),
    )
