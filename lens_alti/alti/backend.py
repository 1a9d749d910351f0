"""Which kernels `backend="auto"` runs: one decision per `attribute` call, from a cost model.

Backends (all give the same numbers to float rounding, tests/test_kernels.py):

- "native": the C kernels of `lens_alti.alti.native` (CPU, float32/float64). No JIT: the
  library is built once per machine (~2 s with gcc, by the first call that uses it or by
  `lens-alti build-kernels`; importing lens_alti builds nothing) and loaded in milliseconds
  afterwards.
- "compiled": torch.compile'd kernels (Triton on CUDA, C++ on CPU). Compiling costs
  seconds once per process and dtype (less when the persistent cache is warm).
- "eager": batched matmuls; no start-up cost, slow for per-head work.

Cost model (seconds for the whole call; `W` = layers × heads × (receiver, source) pairs
visited × d_model, the multiply-adds of the distance kernels, docs/spec.md §6; causal blocks
visit q(q+1)/2 pairs; `blocks` = layers × batch; `threads` = torch's intra-op threads):

    t(backend) = start(backend) + blocks · overhead[backend] + W / (rate[backend, heads] · threads)

`rate` is elements per CPU-second of whole `attribute` calls (everything that grows with
n², not just the kernel) and `overhead` the CPU seconds per block that do not (python,
reading the cache, decomposition at small n). Both were fitted to whole calls on the
development machine (AMD EPYC Zen 4 with AVX-512, torch 2.13, fp32, SmolLM2-135M: 30
layers, 9 heads, d_model 576), one thread, CPU seconds (the machine was shared, so CPU
time is the stable measure); overhead = the n = 15 call / 30, rate = the slope between
n = 113 and n = 512:

    CPU seconds per call       n = 15   n = 113   n = 256   n = 512    rate      overhead
    native    heads            0.116    0.413     1.068     3.314      6.7e9     3.9 ms
    native    tokens           0.099    0.310     0.750     2.270      1.0e10    3.3 ms
    compiled  heads            0.121    0.464     1.235     3.969      5.5e9     4.0 ms
    compiled  tokens           0.104    0.381     0.952     3.053      7.3e9     3.5 ms
    eager     heads            0.137    5.559     -         -          1.8e8     4.6 ms
    eager     tokens           0.101    0.616     3.279     -          6.0e8     3.4 ms
    (W = 1.9e7, 1.0e9, 5.1e9, 2.0e10; the kernel alone runs at ~1.7e10 per CPU-second)

`start` is 0 for eager; for native 0 once built on this machine (loading takes milliseconds),
else the build (`NATIVE_BUILD_S`, gcc on this source); for compiled 0 once the kernel ran for this
dtype and device in this process, else `COMPILE_WARM_S` / `COMPILE_COLD_S` depending on
whether the persistent compile cache holds artefacts (first compiled call in a fresh
process on an idle machine: 3.8 s cold, 3.6 s warm, including a 0.3 s call). Auto picks:

1. CPU, native built (loaded, or on disk): "native", unless compiled kernels are already warm
   in this process and t(compiled) < t(native). With the rates above that never happens
   (native's rate and overhead are both better, so there is no crossover: native is the
   fastest backend from n = 15 to 512, per head and tokens); the rule is there so that
   re-measured constants decide.
   CPU, a C compiler but native not built yet: build it now (the call waits ~2 s, once per
   machine) and run "native" when t(native) including the build ≤ t(eager), or once the time
   eager calls in this process would have saved with native kernels reaches the build time
   (the same ski rental as compiling below); else "eager". Where the build fails, rule 2.
2. Otherwise (CUDA, no C compiler, LENS_ALTI_NO_NATIVE): "compiled" when
   t(compiled) ≤ t(eager), or once the time eager calls in this process would have saved
   with compiled kernels reaches the compile cost (ski rental: a process that makes many
   small calls compiles once, and never loses more than the compile cost). "eager" when
   compilation is unavailable. The CUDA rates are estimates until measured on a GPU.

Crossovers these constants give on the development machine (2 threads, no native kernels,
compile start 3.5 s):

    per head:    W ≈ 1.3e9  (SmolLM2-135M: n ≈ 130; GPT-2-small, 12 layers × 12 heads × 768: n ≈ 150)
    tokens only: W ≈ 4.6e9  (SmolLM2: n ≈ 240; GPT-2-small: n ≈ 290)
    compiled in this process: compiled from the first element on (its overhead and rate beat eager's)
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from lens_alti.alti import kernels, native

BACKENDS: tuple[str, ...] = ("auto", "native", "compiled", "eager")

# Elements (h·pairs·d) per CPU-second of whole calls and CPU seconds per block (the table in
# the module docstring); keys (backend, heads wanted).
CPU_RATES: dict[tuple[str, bool], float] = {
    ("native", True): 6.7e9,
    ("native", False): 1.0e10,
    ("compiled", True): 5.5e9,
    ("compiled", False): 7.3e9,
    ("eager", True): 1.8e8,
    ("eager", False): 6.0e8,
}
CPU_OVERHEAD_S = {"native": 3.9e-3, "compiled": 4.0e-3, "eager": 4.6e-3}
# Estimates for CUDA (no GPU measured yet): compiled fuses the per-head loop, eager is bandwidth-bound.
CUDA_RATES: dict[tuple[str, bool], float] = {
    ("compiled", True): 1.0e12,
    ("compiled", False): 1.5e12,
    ("eager", True): 5.0e10,
    ("eager", False): 3.0e11,
}
CUDA_OVERHEAD_S = {"compiled": 1e-3, "eager": 1e-3}
# One-off compile cost per process (seconds: the first compiled call in a fresh process on the
# development machine, less the call itself), and the native library's build (gcc 12, 2.0-2.3 s).
COMPILE_COLD_S = 3.5
COMPILE_WARM_S = 3.3
NATIVE_BUILD_S = 2.0

_saved_s = 0.0  # what compiled kernels would have saved over this process's eager calls so far
_native_saved_s = 0.0  # what native kernels would have saved over eager calls while not built yet
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
    elif include_start and backend == "native" and not native.loaded() and not native.ready_on_disk():
        start = NATIVE_BUILD_S
    return steady + start


def decide(work: Work) -> Decision:
    """The backend for `work` (the rules of the module docstring); records eager calls' lost time."""
    global _saved_s, _native_saved_s
    cpu_native = work.device.type == "cpu" and work.dtype in (torch.float32, torch.float64) and native.possible()
    if cpu_native:
        eager = estimate("eager", work)
        if native.loaded() or native.ready_on_disk():
            est = {"native": estimate("native", work), "eager": eager}
            if kernels.compile_available() and _compile_start_s(work) == 0.0:  # compiled kernels warm here
                est["compiled"] = estimate("compiled", work)
                if est["compiled"] < est["native"]:
                    return Decision("compiled", est, "compiled kernels warm and estimated faster")
            return Decision("native", est, "native kernels built")
        est = {"native": estimate("native", work), "eager": eager}  # native: the build included
        lost = eager - estimate("native", work, include_start=False)
        with _lock:
            if est["native"] <= eager:
                reason = "native kernels built now (once per machine): faster including the build"
            elif _native_saved_s + lost >= NATIVE_BUILD_S:
                reason = "native kernels built now (once per machine): eager calls so far would have paid for it"
            else:
                _native_saved_s += max(lost, 0.0)
                return Decision("eager", est, "building the native kernels would cost more than it saves")
            _native_saved_s = 0.0
        if native.available():  # builds the library (one line on the log says so)
            return Decision("native", est, reason)
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
    """The `Work` of `attribute(cache, heads=heads)`: every block's pattern `[b, h, q, k]` × d_model
    (h counts the record's channels where a reader expands each head into several)."""
    model = getattr(cache, "model", None)
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    elements = blocks = 0
    device = torch.device("cpu")
    for kind, readers in layout.blocks.items():
        causal = kind == "decoder_self" or (kind == "self" and layout.family == "decoder")
        for reader in readers:
            b, h, q, k = reader.pattern_shape(cache)
            h *= reader.channels_per_head  # per-channel output gates: head·d_head channels
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
