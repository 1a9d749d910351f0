"""Which kernels `backend="auto"` runs: one decision per `attribute` call, from a cost model.

Backends (all give the same numbers to float rounding, tests/test_kernels.py):

- "native": the C kernels of `lens_alti.alti.native` (CPU, float32/float64). No JIT: the
  library is built once per machine (~1 s with gcc, started in a background thread when
  lens_alti is imported and the cache is cold) and loaded in milliseconds afterwards.
- "compiled": torch.compile'd kernels (Triton on CUDA, C++ on CPU). Compiling costs
  seconds once per process and dtype (less when the persistent cache is warm).
- "eager": batched matmuls; no start-up cost, slow for per-head work.

Cost model (seconds for the whole call; `W` = layers × heads × (receiver, source) pairs
visited × d_model, the multiply-adds of the distance kernels, spec §6; causal blocks
visit q(q+1)/2 pairs; `threads` = torch's intra-op threads):

    t(backend) = start(backend) + W / (rate[backend, per-head or tokens] · threads)

`rate` is elements per CPU-second, measured on the development machine (AMD EPYC
Zen 4 with AVX-512, 2 cores, torch 2.13, fp32; `python benchmarks/bench_backend.py`
re-measures them and prints the crossovers). `start` is 0 for eager; for native 0 once
loaded, else the remaining build time; for compiled 0 once the kernel ran for this dtype
and device in this process, `COMPILE_WARM_S` when the persistent compile cache already
holds artefacts, else `COMPILE_COLD_S`. Auto picks:

1. CPU, native loaded or loadable: "native". It is the fastest backend at every size we
   measured (n = 15 to 1024, tokens and per head), so no crossover exists; while its first
   build is still running, "eager" for calls whose eager estimate is below the remaining
   build time, else it waits for the build.
2. Otherwise (CUDA, no C compiler, LENS_ALTI_NO_NATIVE): "compiled" when
   t(compiled) ≤ t(eager), or once the time eager calls in this process would have saved
   with compiled kernels reaches the compile cost (ski rental: a process that makes many
   small calls compiles once, and never loses more than the compile cost). "eager" when
   compilation is unavailable. The CUDA rates are estimates until measured on a GPU.

Crossovers these constants give on the development machine (2 threads, no native kernels):

    per head, compile cache cold (12 s):  W ≈ 3.7e9  (SmolLM2-135M, 30 layers: n ≈ 220)
    per head, compile cache warm (4.5 s): W ≈ 1.4e9  (SmolLM2: n ≈ 130)
    per head, compiled in this process:   always compiled
    tokens only, cache cold / warm:       W ≈ 5.4e10 / 2.0e10 (SmolLM2: n ≈ 830 / 510)

With the native kernels (the default on CPU wherever a C compiler exists) none of these apply.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from lens_alti.alti import kernels, native

BACKENDS: tuple[str, ...] = ("auto", "native", "compiled", "eager")

# Elements (h·pairs·d) per CPU-second, fp32, on the development machine (2 AVX-512 cores);
# keys (backend, heads wanted). native: the kernel alone, thread CPU time (1.0-1.2e10 heads,
# 1.3-1.6e10 tokens); compiled and eager: whole SmolLM2 calls at n = 113 in a warm process
# (issue 14's table: heads 0.25 s / 3.5 s, tokens 0.19 s / 0.39 s for 1.0e9 elements, 2 threads).
CPU_RATES: dict[tuple[str, bool], float] = {
    ("native", True): 1.0e10,
    ("native", False): 1.3e10,
    ("compiled", True): 6.0e9,
    ("compiled", False): 7.0e9,
    ("eager", True): 1.5e8,
    ("eager", False): 1.7e9,
}
# Per layer and batch item: python, decomposition and normalisation around the kernels (CPU seconds).
CPU_OVERHEAD_S = {"native": 2e-3, "compiled": 4e-3, "eager": 2e-3}
# Estimates for CUDA (no GPU measured yet): compiled fuses the per-head loop, eager is bandwidth-bound.
CUDA_RATES: dict[tuple[str, bool], float] = {
    ("compiled", True): 1.0e12,
    ("compiled", False): 1.5e12,
    ("eager", True): 5.0e10,
    ("eager", False): 3.0e11,
}
CUDA_OVERHEAD_S = {"compiled": 1e-3, "eager": 1e-3}
# One-off compile cost per process (CPU seconds; the first compiled call on the development machine).
COMPILE_COLD_S = 12.0
COMPILE_WARM_S = 4.5
NATIVE_BUILD_S = 1.5

_saved_s = 0.0  # what compiled kernels would have saved over this process's eager calls so far
_lock = threading.Lock()


@dataclass(frozen=True)
class Work:
    """The distance work of one call: `elements` = Σ over blocks of h·pairs·d, and `blocks` (× batch)."""

    elements: int
    blocks: int
    heads: bool
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class Decision:
    """The backend chosen and the estimated seconds of each candidate."""

    backend: str
    estimates: dict[str, float]
    reason: str


def _threads(device: torch.device) -> int:
    return 1 if device.type != "cpu" else max(1, torch.get_num_threads())


def _compile_start_s(work: Work) -> float:
    if all(kernels.is_warm(n, work.dtype, work.device) for n in _kernel_names(work)):
        return 0.0
    return COMPILE_WARM_S if _compile_cache_warm() else COMPILE_COLD_S


def _kernel_names(work: Work) -> tuple[str, ...]:
    return ("l1+heads",) if work.heads else ("l1",)


def _compile_cache_warm() -> bool:
    """Whether the persistent compile cache holds artefacts (the FX graph cache of earlier processes)."""
    root = kernels.compile_cache_dir()
    try:
        return any(os.scandir(os.path.join(root, "fxgraph")))
    except OSError:
        return False


def estimate(backend: str, work: Work, include_start: bool = True) -> float:
    """Seconds the call would take with `backend` (see the module docstring)."""
    cuda = work.device.type == "cuda"
    rates, overhead = (CUDA_RATES, CUDA_OVERHEAD_S) if cuda else (CPU_RATES, CPU_OVERHEAD_S)
    threads = _threads(work.device)
    steady = work.elements / (rates[(backend, work.heads)] * threads) + work.blocks * overhead[backend]
    start = 0.0
    if include_start and backend == "compiled":
        start = _compile_start_s(work)
    elif include_start and backend == "native" and not native.loaded():
        start = native.remaining_build_s(NATIVE_BUILD_S)
    return steady + start


def decide(work: Work) -> Decision:
    """The backend for `work` (the rules of the module docstring); records eager calls' lost time."""
    global _saved_s
    cpu_native = work.device.type == "cpu" and work.dtype in (torch.float32, torch.float64) and native.possible()
    if cpu_native:
        eager = estimate("eager", work)
        if native.loaded() or native.ready_on_disk():
            return Decision("native", {"native": estimate("native", work), "eager": eager}, "native kernels loaded")
        wait = native.remaining_build_s(NATIVE_BUILD_S)
        if eager < wait:
            return Decision("eager", {"native": wait, "eager": eager}, "native build still running; eager is sooner")
        if native.available():  # waits for the build
            return Decision("native", {"native": estimate("native", work), "eager": eager}, "native kernels built")
    if not kernels.compile_available():
        return Decision("eager", {"eager": estimate("eager", work)}, "torch.compile unavailable")
    eager, compiled = estimate("eager", work), estimate("compiled", work)
    steady = estimate("compiled", work, include_start=False)
    est = {"compiled": compiled, "eager": eager}
    with _lock:
        if compiled <= eager:
            return Decision("compiled", est, "compiled is faster including its start-up")
        if _saved_s + (eager - steady) >= compiled - steady:
            _saved_s = 0.0
            return Decision("compiled", est, "eager calls so far would have paid for compiling")
        _saved_s += eager - steady
    return Decision("eager", est, "compiling would cost more than it saves")


def call_work(cache: Any, layout: Any, heads: bool, dtype: torch.dtype) -> Work:
    """The `Work` of `attribute(cache, heads=heads)`: every block's pattern `[b, h, q, k]` × d_model."""
    model = getattr(cache, "model", None)
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    elements = blocks = 0
    device = torch.device("cpu")
    for kind, readers in layout.blocks.items():
        causal = kind == "decoder_self" or (kind == "self" and layout.family == "decoder")
        for reader in readers:
            b, h, q, k = reader.pattern_shape(cache)
            device = cache[reader.hooks[0]].device
            pairs = q * (q + 1) // 2 if causal and q == k else q * k
            elements += b * h * pairs * int(d_model or 64 * h)
            blocks += b
    return Work(elements, blocks, heads, device, dtype)


def resolve(backend: str, cache: Any, layout: Any, *, heads: bool, dtype: torch.dtype) -> str:
    """The concrete backend ("native", "compiled" or "eager") for one `attribute` call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        work = call_work(cache, layout, heads, dtype)
    except (KeyError, AttributeError, TypeError, ValueError):  # unusual cache: decide per block
        return "auto"
    return decide(work).backend


def block_backend(backend: str, tv: Any, heads: bool) -> str:
    """The backend for one block when `block_contributions` is called directly with "auto"."""
    if backend != "auto":
        return backend
    b, h, q, k = tv.weights.shape
    pairs = q * (q + 1) // 2 if tv.causal and q == k else q * k
    work = Work(b * h * pairs * tv.vo.shape[-1], b, heads, tv.weights.device, tv.weights.dtype)
    return decide(work).backend


native.build_in_background()
