"""Benchmark lens_alti against dense baselines written from the spec (docs/spec.md §1a, §2, §3, §6).

One run measures, side by side on a GPT-2-small-shaped causal pre-LN layer (fp32):
lens_alti token-level and per-head contributions (compiled and eager backends), dense
token-level and per-head baselines that materialise every transformed vector, the fused
per-head kernel on one tile, and `lens_alti.attribute` end to end on a random 12-layer
GPT-2-small. Usage: `python benchmarks/bench_alti.py [--quick] [--device cuda] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.alti.contributions import block_contributions  # noqa: E402
from lens_alti.alti.decompose import decompose  # noqa: E402
from lens_alti.alti.kernels import get_kernel  # noqa: E402
from lens_alti.reading.records import AttentionBlock  # noqa: E402

GB = 1e9
MB = 1e6
TOLERANCE = 1e-5


@dataclass(frozen=True)
class LayerShape:
    """The attention layer benchmarked: d_model, heads and d_head."""

    name: str
    d_model: int
    n_heads: int
    d_head: int


GPT2_SMALL = LayerShape("gpt2-small", 768, 12, 64)
SEVEN_B = LayerShape("7B", 4096, 32, 128)


@dataclass
class Row:
    """One line of the result table."""

    layer: str
    n: int
    kind: str  # "tokens" or "heads"
    method: str
    seconds: float | None = None
    peak_bytes: int | None = None
    elements: int = 0
    speedup: float | None = None
    max_diff: float | None = None
    first_call_s: float | None = None
    note: str = ""
    times: list[float] | None = None

    @property
    def rate(self) -> float | None:
        return self.elements / self.seconds if self.seconds else None


# --------------------------------------------------------------------------- measurement


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so that RSS baselines are not inflated."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak extra memory inside a `with` block.

    CPU: process RSS sampled by a thread every 5 ms (and the kernel's VmHWM where it can be
    reset, which catches peaks shorter than the sampling interval), minus the RSS on entry.
    CUDA: `torch.cuda.max_memory_allocated()` minus the allocated memory on entry.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.extra = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._peak = 0
        self._base = 0
        self._hwm_ok = False
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._peak = self._proc.memory_info().rss
        self._hwm_ok = _reset_hwm()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        peak = max(self._peak, self._proc.memory_info().rss, _hwm() if self._hwm_ok else 0)
        self.extra = max(0, peak - self._base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Median wall time, peak extra memory over the timed calls, and the last call's output."""

    seconds: float
    peak_bytes: int
    times: list[float]
    output: Any


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, max_seconds: float) -> Timing:
    """Call `fn` up to `repeats` times (fewer once `max_seconds` are spent); median time, max peak."""
    times: list[float] = []
    peak = 0
    out: Any = None
    for _ in range(max(1, repeats)):
        out = None  # the previous output must not count in this call's memory
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.extra)
        if sum(times) >= max_seconds:
            break
    return Timing(statistics.median(times), peak, times, out)


def first_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call (used for the compiled backend's warm-up, which includes compilation)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- inputs


@dataclass
class Layer:
    """Random inputs of one causal pre-LN layer: the record and the raw tensors the baselines use."""

    block: AttentionBlock
    A: Tensor  # [h, n, n] attention probabilities
    v: Tensor  # [n, h, e] value vectors (hook_v)
    W_O: Tensor  # [h, e, d]
    x: Tensor  # [n, d] residual entering the block (hook_resid_pre)
    y: Tensor  # [n, d] the block's real output (hook_resid_mid)


def make_layer(shape: LayerShape, n: int, device: torch.device, seed: int = 0) -> Layer:
    """Softmax patterns of random scores under a causal mask, random values, residual and biases.

    W_O is scaled by 1/sqrt(d_head), so that each head's VO vectors are about as large as the
    residual entries and contributions are spread over many sources, as in trained models.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, e, d = shape.n_heads, shape.d_head, shape.d_model

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device)

    causal = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    A = randn(h, n, n, scale=2.0).masked_fill(causal, float("-inf")).softmax(-1)
    v = randn(n, h, e)
    W_O = randn(h, e, d, scale=e**-0.5)
    b_O = randn(d, scale=0.1)
    x = randn(n, d)
    z = torch.einsum("hqk,khe->qhe", A, v)
    y = x + torch.einsum("qhe,hed->qd", z, W_O) + b_O
    block = AttentionBlock(
        name=f"{shape.name}.attn",
        layer=0,
        pattern=A[None],
        values=v[None],
        W_O=W_O,
        b_O=b_O,
        residual=x[None],
        target=y[None],
        architecture="GPT2LMHeadModel",
    )
    return Layer(block, A, v, W_O, x, y)


def causal_elements(shape: LayerShape, n: int) -> int:
    """H · (causal pairs) · d: the multiply-adds of the exact L1 work of one layer (docs/spec.md §6)."""
    return shape.n_heads * (n * (n + 1) // 2) * shape.d_model


# --------------------------------------------------------------------------- methods


@torch.no_grad()
def lens_tokens(layer: Layer, backend: str) -> Tensor:
    """lens_alti token-level L1 contributions `[n, n]` through its internal pipeline."""
    tv = decompose(layer.block)
    return block_contributions(tv, "l1", heads=False, backend=backend).tokens[0]


@torch.no_grad()
def lens_heads(layer: Layer, backend: str) -> tuple[Tensor, Tensor]:
    """lens_alti per-head contributions `[h, n, n]` and the residual's share `[n]`."""
    tv = decompose(layer.block)
    c = block_contributions(tv, "l1", heads=True, backend=backend)
    assert c.heads is not None and c.heads_residual is not None
    return c.heads[0], c.heads_residual[0]


@torch.no_grad()
def dense_tokens(layer: Layer) -> Tensor:
    """docs/spec.md §1a, §2 materialised (like the ALTI+ reference code): T_i(x_j) as one `[n, n, d]` tensor."""
    A, x, y = layer.A, layer.x, layer.y
    vo = torch.einsum("khe,hed->hkd", layer.v, layer.W_O)
    # T[j, i] = Σ_h A[h,i,j]·VO[h,j] as a batched matmul over j (4x faster than the einsum's own plan)
    T = torch.bmm(A.permute(2, 1, 0).contiguous(), vo.transpose(0, 1).contiguous())
    T.diagonal(dim1=0, dim2=1).add_(x.T)  # + δ_ij x_j
    y_l1 = y.abs().sum(-1)
    scores = (y_l1[:, None] - (y[None] - T).abs_().sum(-1).T).clamp_(min=0)
    return scores / scores.sum(-1, keepdim=True)


@torch.no_grad()
def dense_heads(layer: Layer) -> tuple[Tensor, Tensor]:
    """docs/spec.md §3 materialised (like the information-flow-routes tool): parts as one `[n, n, h, d]` tensor."""
    A, x, y = layer.A, layer.x, layer.y
    vo = torch.einsum("khe,hed->hkd", layer.v, layer.W_O)
    parts = A.permute(1, 2, 0)[..., None] * vo.transpose(0, 1)[None]  # [i, j, h, d] = A[h,i,j]·VO[h,j]
    y_l1 = y.abs().sum(-1)
    scores = (y_l1[:, None, None] - (y[:, None, None] - parts).abs_().sum(-1)).clamp_(min=0)  # [i, j, h]
    del parts
    residual = (y_l1 - (y - x).abs().sum(-1)).clamp_(min=0)
    total = scores.sum(dim=(1, 2)) + residual
    return scores.permute(2, 0, 1) / total[None, :, None], residual / total


@torch.no_grad()
def reference_style_tokens(layer: Layer) -> Tensor:
    """As the ALTI+ reference code does it: `[h, n, n, d]` per-head terms, summed, then
    `F.pairwise_distance` (which adds 1e-6 per dimension, docs/spec.md §5: numbers move by ~1e-4)."""
    A, x, y = layer.A, layer.x, layer.y
    n, d = x.shape
    vo = torch.einsum("khe,hed->hkd", layer.v, layer.W_O)
    T = (A[..., None] * vo[:, None]).sum(0)  # [i, j, d]
    T[torch.arange(n), torch.arange(n)] += x
    dist = torch.nn.functional.pairwise_distance(y[:, None].expand(n, n, d).reshape(-1, d), T.reshape(-1, d), p=1)
    scores = (y.abs().sum(-1)[:, None] - dist.view(n, n)).clamp(min=0)
    return scores / scores.sum(-1, keepdim=True)


@torch.no_grad()
def reference_style_heads(layer: Layer) -> tuple[Tensor, Tensor]:
    """As the information-flow-routes tool does it: parts concatenated into `[n, n·h + 1, d]`
    (heads, then the residual), then `F.pairwise_distance` against the repeated resultant."""
    A, x, y = layer.A, layer.x, layer.y
    n, d = x.shape
    h = A.shape[0]
    vo = torch.einsum("khe,hed->hkd", layer.v, layer.W_O)
    parts = (A.permute(1, 2, 0)[..., None] * vo.transpose(0, 1)[None]).reshape(n, n * h, d)
    parts = torch.cat([parts, x[:, None]], dim=1)  # [i, n·h + 1, d]
    dist = torch.nn.functional.pairwise_distance(y[:, None].expand_as(parts).reshape(-1, d), parts.reshape(-1, d), p=1)
    scores = (y.abs().sum(-1)[:, None] - dist.view(n, n * h + 1)).clamp(min=0)
    scores = scores / scores.sum(-1, keepdim=True)
    return scores[:, :-1].view(n, n, h).permute(2, 0, 1), scores[:, -1]


def dense_bytes(shape: LayerShape, n: int, kind: str) -> int:
    """Estimated peak of a dense baseline: the materialised tensor plus one temporary as large."""
    per_pair = shape.n_heads * shape.d_model if kind == "heads" else shape.d_model
    return 2 * n * n * per_pair * 4


def free_memory(device: torch.device) -> int:
    """Bytes that a dense baseline may still take on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def max_diff(a: Tensor | tuple[Tensor, ...], b: Tensor | tuple[Tensor, ...]) -> float:
    """max |a − b| over a tensor or matching tuples of tensors."""
    a_, b_ = (a,) if isinstance(a, Tensor) else a, (b,) if isinstance(b, Tensor) else b
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a_, b_, strict=True))


# --------------------------------------------------------------------------- sections


def bench_layer(shape: LayerShape, n: int, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Token-level and per-head rows for one layer shape and sequence length."""
    layer = make_layer(shape, n, device)
    elements = causal_elements(shape, n)
    rows: list[Row] = []
    backends = ["compiled"] + ([] if args.no_eager else ["eager"])
    kinds: list[tuple[str, Callable[[Layer, str], Any], Callable[[Layer], Any]]] = [
        ("tokens", lens_tokens, dense_tokens),
        ("heads", lens_heads, dense_heads),
    ]
    for kind, lens_fn, dense_fn in kinds:
        need = dense_bytes(shape, n, kind)
        limit = min(args.dense_limit_gb * GB, 0.8 * free_memory(device))
        dense_row = Row(shape.name, n, kind, "dense baseline", elements=elements)
        reference = None
        if need > limit:
            dense_row.note = f"skipped: would need {need / GB:.1f} GB > {limit / GB:.3g} GB"
        else:
            t = measure(lambda f=dense_fn: f(layer), device, args.repeats, args.max_seconds)
            dense_row.seconds, dense_row.peak_bytes, dense_row.speedup = t.seconds, t.peak_bytes, 1.0
            dense_row.times = t.times
            dense_row.note = f"est. {need / GB:.2f} GB"
            reference = t.output
        for backend in backends:
            fn = lambda f=lens_fn, b=backend: f(layer, b)  # noqa: E731
            row = Row(shape.name, n, kind, f"lens_alti {backend}", elements=elements)
            if backend == "eager" and n > args.eager_max_n:
                row.note = f"skipped: n > --eager-max-n {args.eager_max_n} (eager is slow)"
                rows.append(row)
                print_row(row, flush=True)
                continue
            if backend == "compiled":
                row.first_call_s = first_call(fn, device)  # compiles (or recompiles) the kernels
            t = measure(fn, device, args.repeats, args.max_seconds)
            row.seconds, row.peak_bytes, row.times = t.seconds, t.peak_bytes, t.times
            if reference is not None:
                row.speedup = dense_row.seconds / t.seconds if dense_row.seconds else None
                row.max_diff = max_diff(t.output, reference)
            rows.append(row)
            print_row(row, flush=True)
        rows.append(dense_row)
        print_row(dense_row, flush=True)
        # The reference-style baselines hold ~2.5x the dense tensor (9.7 GB for per-head at n = 256).
        if n <= args.reference_style_max_n and 2.5 * need <= 0.8 * free_memory(device):
            ref_fn = reference_style_tokens if kind == "tokens" else reference_style_heads
            t = measure(lambda f=ref_fn: f(layer), device, 1, args.max_seconds)
            row = Row(shape.name, n, kind, "dense reference-style", elements=elements)
            row.seconds, row.peak_bytes, row.times = t.seconds, t.peak_bytes, t.times
            row.speedup = dense_row.seconds / t.seconds if dense_row.seconds else None
            row.max_diff = max_diff(t.output, reference) if reference is not None else None
            row.note = "F.pairwise_distance eps: differs by ~1e-4 (docs/spec.md §5)"
            rows.append(row)
            print_row(row, flush=True)
    return rows


def bench_kernel(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Throughput of the compiled per-head L1 kernel alone on a realistic tile."""
    g = torch.Generator(device="cpu").manual_seed(1)
    h, c, k, d = 12, 64, 512, 768
    y = torch.randn(c, d, generator=g).to(device)
    s = torch.ones(c, d, device=device)
    a = torch.rand(h, c, k, generator=g).to(device)
    a = a / a.sum(-1, keepdim=True)
    vo = torch.randn(h, k, d, generator=g).to(device)
    kernel = get_kernel("l1+heads", compiled=True)
    first = first_call(lambda: kernel(y, s, a, vo), device)
    first_call(lambda: kernel(y, s, a, vo), device)
    t = measure(lambda: kernel(y, s, a, vo), device, max(args.repeats, 20), args.max_seconds)
    elements = h * c * k * d
    diff = max_diff(t.output, get_kernel("l1+heads", compiled=False)(y, s, a, vo))
    return {
        "tile": f"y[{c},{d}] s[{c},{d}] a[{h},{c},{k}] vo[{h},{k},{d}]",
        "first_call_s": first,
        "seconds": t.seconds,
        "elements": elements,
        "elements_per_s": elements / t.seconds,
        "max_diff_vs_eager": diff,
    }


def local_tokenizer() -> Any:
    """A word-level tokenizer ("t1 t2 ...", vocabulary 1000) saved locally: no hub access."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3", unk_token="[UNK]"
    )
    path = tempfile.mkdtemp(prefix="bench_alti_tok_")
    fast.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def bench_e2e(sizes: list[int], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """run_with_cache and attribute(cache, heads=True) on a random-init 12-layer GPT-2-small."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=local_tokenizer(), device=device)
    boot_s = time.perf_counter() - t0
    print(f"  random GPT-2-small (12 layers) built and booted in {boot_s:.1f} s", flush=True)
    out = []
    for n in sizes:
        rec = _e2e_one(bridge, n, args, device)
        rec["boot_s"] = boot_s
        out.append(rec)
        print_e2e(rec, flush=True)
    return out


def _e2e_one(bridge: Any, n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n)).to(device)

    def run() -> Any:
        with torch.no_grad():
            return bridge.run_with_cache(ids)[1]

    rwc = measure(run, device, args.repeats, args.max_seconds)
    cache = rwc.output
    rec: dict[str, Any] = {"n": n, "run_with_cache_s": rwc.seconds, "run_with_cache_peak_bytes": rwc.peak_bytes}
    for heads in (True, False):
        if not heads and args.quick:
            continue
        key = "attribute_heads" if heads else "attribute_tokens"
        # untimed first call: compiles (or recompiles) the kernels if the layer section did not
        rec[f"{key}_first_call_s"] = first_call(lambda h=heads: lens_alti.attribute(cache, heads=h), device)
        t = measure(lambda h=heads: lens_alti.attribute(cache, heads=h), device, args.repeats, args.max_seconds)
        rec[f"{key}_s"], rec[f"{key}_peak_bytes"], rec[f"{key}_times"] = t.seconds, t.peak_bytes, t.times
        rec["reconstruction_error"] = float(t.output.reconstruction_error.max())
    return rec


# --------------------------------------------------------------------------- output

HEADER = (
    f"{'layer':<10} {'n':>5} {'kind':<6} {'method':<18} {'time s':>8} {'min s':>8} {'1st call':>8} {'peak MB':>8} "
    f"{'elem/s':>9} {'speed-up':>8} {'max|diff|':>9}  note"
)


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_row(r: Row, flush: bool = False) -> None:
    peak = None if r.peak_bytes is None else r.peak_bytes / MB
    speed = None if r.speedup is None else f"{r.speedup:.1f}x"
    print(
        f"{r.layer:<10} {r.n:>5} {r.kind:<6} {r.method:<18} {_fmt(r.seconds, '8.3f'):>8} "
        f"{_fmt(min(r.times) if r.times else None, '8.3f'):>8} "
        f"{_fmt(r.first_call_s, '8.2f'):>8} {_fmt(peak, '8.0f'):>8} {_fmt(r.rate, '9.2e'):>9} "
        f"{speed or '-':>8} {_fmt(r.max_diff, '9.1e'):>9}  {r.note}",
        flush=flush,
    )


def print_e2e(rec: dict[str, Any], flush: bool = False) -> None:
    parts = [
        f"  n={rec['n']:>5}  run_with_cache {rec['run_with_cache_s']:.2f} s "
        f"(+{rec['run_with_cache_peak_bytes'] / MB:.0f} MB)"
    ]
    for key, label in (("attribute_heads", "attribute(heads=True)"), ("attribute_tokens", "attribute()")):
        if f"{key}_s" in rec:
            parts.append(
                f"{label} {rec[f'{key}_s']:.2f} s (+{rec[f'{key}_peak_bytes'] / MB:.0f} MB, "
                f"1st call {rec[f'{key}_first_call_s']:.1f} s)"
            )
    print("  ".join(parts) + f"  reconstruction {rec['reconstruction_error']:.1e}", flush=flush)


def evaluate_targets(rows: list[Row], kernel: dict[str, Any] | None, e2e: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The PASS/FAIL targets (stated for a 2-core CPU in fp32)."""
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "status": "SKIP" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    full = next((r for r in e2e if r["n"] == 1024), None)
    if full is None:
        add("e2e 12-layer attribute(heads=True) n=1024 <= 15 s, peak <= 1.5 GB", None, "n=1024 not run")
    else:
        s, peak = full["attribute_heads_s"], full["attribute_heads_peak_bytes"]
        add("e2e 12-layer attribute(heads=True) n=1024 <= 15 s", s <= 15, f"{s:.2f} s")
        add("e2e stretch: <= 8 s", s <= 8, f"{s:.2f} s")
        add("e2e peak extra memory <= 1.5 GB", peak <= 1.5 * GB, f"{peak / GB:.2f} GB ({peak / 2**30:.2f} GiB)")

    def find(kind: str, method: str) -> Row | None:
        key = (GPT2_SMALL.name, 256, kind, method)
        return next((r for r in rows if (r.layer, r.n, r.kind, r.method) == key), None)

    for kind, factor in (("heads", 50), ("tokens", 10)):
        lens, ref = find(kind, "lens_alti compiled"), find(kind, "dense reference-style")
        name = f"n=256 {kind}: lens_alti compiled >= {factor}x dense reference-style, max|diff| <= {TOLERANCE:g}"
        if lens is None or ref is None or lens.max_diff is None or not ref.seconds:
            add(name, None, "not measured")
        else:
            ratio = ref.seconds / lens.seconds
            add(name, ratio >= factor and lens.max_diff <= TOLERANCE, f"{ratio:.1f}x, max|diff| {lens.max_diff:.1e}")
        if lens is not None and lens.speedup is not None:
            detail = f"{lens.speedup:.1f}x (no target)"
            out.append({"target": f"n=256 {kind}: vs the efficient dense baseline", "status": "INFO", "detail": detail})
    diffs = [r.max_diff for r in rows if r.max_diff is not None and r.method.startswith("lens_alti")]
    add(
        f"all lens_alti vs dense max|diff| <= {TOLERANCE:g}",
        all(d <= TOLERANCE for d in diffs) if diffs else None,
        f"max {max(diffs):.1e} over {len(diffs)} comparisons" if diffs else "no comparisons",
    )
    if kernel is None:
        add("per-head kernel >= 8e9 elements/s", None, "not run")
    else:
        add("per-head kernel >= 8e9 elements/s", kernel["elements_per_s"] >= 8e9, f"{kernel['elements_per_s']:.2e}/s")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", help="sequence lengths (default 128 256 512 1024)")
    p.add_argument("--e2e-sizes", type=int, nargs="+", help="end-to-end lengths (default 1024; --quick 256)")
    p.add_argument("--quick", action="store_true", help="n = 128 256, one repeat, short end-to-end")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, help="timed calls per measurement; median reported (default 3)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating a measurement after this")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--dense-limit-gb", type=float, default=8.0, help="skip dense baselines estimated above this")
    p.add_argument(
        "--reference-style-max-n", type=int, default=256, help="largest n for the reference-style dense baselines"
    )
    p.add_argument("--eager-max-n", type=int, default=256, help="skip the eager backend above this n")
    p.add_argument("--no-eager", action="store_true", help="skip the eager backend")
    p.add_argument("--skip", nargs="+", default=[], choices=["layers", "kernel", "e2e"], help="sections to skip")
    p.add_argument("--gpu-extra", action="store_true", help="add n = 4096 and a 7B-shaped layer (d 4096, 32 heads)")
    p.add_argument("--json", help="write all results to this file")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([128, 256] if args.quick else [128, 256, 512, 1024])
    args.e2e_sizes = args.e2e_sizes or ([256] if args.quick else [1024])
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.gpu_extra and 4096 not in args.sizes:
        args.sizes.append(4096)
    return args


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "memory_gb": psutil.virtual_memory().total / GB,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads or available)
    env = environment(device)
    print(
        f"lens_alti benchmark: torch {env['torch']}, device {device}"
        f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, {env['threads']} threads, fp32, "
        f"load average {env['load_average_start'][0]:.2f}"
    )
    t_start = time.perf_counter()

    rows: list[Row] = []
    if "layers" not in args.skip:
        print("\n== one layer: lens_alti (decompose + block_contributions) vs dense baselines ==")
        print("elements = H * causal pairs * d; '1st call' of the compiled backend includes compilation")
        print(HEADER)
        shapes = [(GPT2_SMALL, n) for n in args.sizes] + ([(SEVEN_B, 2048)] if args.gpu_extra else [])
        for shape, n in shapes:
            rows += bench_layer(shape, n, args, device)

    kernel: dict[str, Any] | None = None
    if "kernel" not in args.skip:
        print("\n== per-head L1 kernel alone (compiled) ==")
        kernel = bench_kernel(args, device)
        print(
            f"  {kernel['tile']}: {kernel['seconds'] * 1e3:.1f} ms, {kernel['elements_per_s']:.2e} elements/s "
            f"(first call {kernel['first_call_s']:.2f} s, max|diff| vs eager {kernel['max_diff_vs_eager']:.1e})"
        )

    e2e: list[dict[str, Any]] = []
    if "e2e" not in args.skip:
        print("\n== end to end: random-init 12-layer GPT-2-small ==")
        e2e = bench_e2e(args.e2e_sizes, args, device)

    print("\n== table ==")
    print(HEADER)
    for r in rows:
        print_row(r)
    targets = evaluate_targets(rows, kernel, e2e)
    print(f"\n== targets (stated for a 2-core CPU, fp32; this run: {device}, {env['threads']} threads) ==")
    for t in targets:
        print(f"{t['status']:<4}  {t['target']}: {t['detail']}")
    env["load_average_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - t_start
    print(
        f"\ntotal {env['total_s']:.0f} s; load average start {env['load_average_start'][0]:.2f}, "
        f"end {env['load_average_end'][0]:.2f} (above the thread count means other processes shared the CPU)"
    )
    if args.json:
        payload = {
            "environment": env,
            "args": vars(args),
            "layers": [asdict(r) | {"elements_per_s": r.rate} for r in rows],
            "kernel": kernel,
            "e2e": e2e,
            "targets": targets,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
