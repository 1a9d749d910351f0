"""The grid of issue 14: is `backend="auto"` ever the slow choice, how much does the first call cost,
and how fast is the per-head kernel against a roofline measured in the same run.

Sections (CPU, fp32, all ratios from this one run):

1. steady state: `lens_alti.attribute(cache, heads=...)` on SmolLM2-135M (real weights) at
   n = 15, 113, 512 and a random 12-layer GPT-2-small at n = 128, 1024, with every backend
   ("auto", "native", "compiled", "eager"); repeats are interleaved across backends (so a burst
   of load from other processes hits all of them) and the minimum is kept. Target: auto within
   1.2x of the best backend. Also elements per CPU-second of each backend, the constants of
   the cost model in `lens_alti/alti/backend.py`.
2. first call in a fresh process: `import lens_alti` + the first `attribute(cache, heads=True)`
   on SmolLM2 n = 113 (loading the model and `run_with_cache` are not counted), with lens_alti's
   cache folder (native library, torch.compile artefacts) cold and then warm. Targets: <= 6 s
   cold, <= 1.5 s warm.
3. kernel: the native per-head L1 kernel on one tile (h 12, c 64, k 512, d 768) against the
   roofline, a minimal vectorised loop (one fused multiply-subtract, an absolute value and an add
   per element, data in L1) on the same threads; the compiled torch kernel beside it. Target >= 0.5.
4. reference-style dense baselines (the information-flow-routes / ALTI+ code's method) on a
   GPT-2-small layer at n = 128 vs `auto`: targets >= 50x (per head) and >= 10x (tokens).

Usage: `python benchmarks/bench_backend.py [--quick] [--json out.json]` (about 6-8 minutes on
a busy 2-core machine; --quick about 3). Needs the SmolLM2 package (see lens_alti.models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.alti import backend as backend_mod  # noqa: E402
from lens_alti.alti import kernels, native  # noqa: E402

BACKENDS = ("auto", "native", "compiled", "eager")
AUTO_TARGET = 1.2
COLD_TARGET_S, WARM_TARGET_S = 6.0, 1.5
ROOF_TARGET = 0.5
REF_TARGETS = {"heads": 50.0, "tokens": 10.0}


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, output) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


# --------------------------------------------------------------------------- models


def smollm2_caches(sizes: list[int]) -> dict[int, Any]:
    from lens_alti.models.pretrained import load_smollm2

    bridge = load_smollm2()
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in sizes:
        ids = torch.randint(100, 49000, (1, n), generator=g)
        with torch.no_grad():
            out[n] = bridge.run_with_cache(ids)[1]
    return out


def gpt2_caches(sizes: list[int]) -> dict[int, Any]:
    import transformers
    from bench_alti import local_tokenizer
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=local_tokenizer())
    out = {}
    for n in sizes:
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            out[n] = bridge.run_with_cache(ids)[1]
    return out


# --------------------------------------------------------------------------- 1. steady state


def steady(name: str, n: int, cache: Any, heads: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Min wall time per backend over interleaved repeats; skips backends estimated above --max-call-s."""
    from lens_alti.reading import cache_and_model, model_layout

    _, model = cache_and_model(cache)
    work = backend_mod.call_work(cache, model_layout(model), heads, torch.float32)
    chosen = backend_mod.decide(work)
    rec: dict[str, Any] = {"model": name, "n": n, "heads": heads, "elements": work.elements, "auto_is": chosen.backend}
    run = {b: (lambda b=b: lens_alti.attribute(cache, heads=heads, backend=b, progress=False)) for b in BACKENDS}
    todo = []
    for b in BACKENDS:
        if b == "native" and not native.available():
            rec[b] = {"skipped": "native kernels unavailable"}
            continue
        est = backend_mod.estimate(b if b != "auto" else chosen.backend, work, include_start=False)
        if b != "auto" and est > args.max_call_s:
            rec[b] = {"skipped": f"estimated {est:.0f} s > --max-call-s {args.max_call_s:g}"}
            continue
        timed(run[b])  # warm-up: compiles (compiled) or loads (native) the kernels
        todo.append(b)
    walls: dict[str, list[float]] = {b: [] for b in todo}
    cpus: dict[str, list[float]] = {b: [] for b in todo}
    outputs: dict[str, Any] = {}
    t_end = time.perf_counter() + args.max_case_s
    for r in range(args.repeats):
        for b in todo if r % 2 == 0 else todo[::-1]:  # interleaved, alternating order
            w, c, out = timed(run[b])
            walls[b].append(w)
            cpus[b].append(c)
            outputs[b] = out
        if time.perf_counter() > t_end and r >= 1:
            break
    ref = outputs.get("eager") or outputs.get("compiled")
    for b in todo:
        best = min(walls[b])
        i = walls[b].index(best)
        diff = None
        if ref is not None and b in outputs:
            got, want = outputs[b], ref
            diff = float((got.layers - want.layers).abs().max())
            if heads:
                diff = max(diff, float((got.heads - want.heads).abs().max()))
        rec[b] = {"s": best, "cpu_s": cpus[b][i], "times": walls[b], "max_diff": diff}
    times = {b: rec[b]["s"] for b in todo if b != "auto"}
    if "auto" in todo and times:
        best_b = min(times, key=times.__getitem__)
        rec["best"] = best_b
        rec["auto_ratio"] = rec["auto"]["s"] / times[best_b]
        cpu = {b: min(cpus[b]) for b in todo if b != "auto"}
        rec["auto_ratio_cpu"] = min(cpus["auto"]) / min(cpu.values())
    return rec


def print_steady(rec: dict[str, Any]) -> None:
    cells = []
    for b in BACKENDS:
        r = rec.get(b, {})
        cells.append(f"{r['s']:7.3f}" if "s" in r else f"{'skip':>7}")
    ratio = rec.get("auto_ratio")
    status = "-" if ratio is None else ("PASS" if ratio <= AUTO_TARGET else "FAIL")
    print(
        f"{rec['model']:<9} {rec['n']:>5} {'on' if rec['heads'] else 'off':>5} {rec['elements']:>9.2e} "
        + " ".join(cells)
        + f"  {rec['auto_is']:>8} {rec.get('best', '-'):>8} {_f(ratio, '6.2f')}x {status} "
        + f"(CPU-s {_f(rec.get('auto_ratio_cpu'), '.2f')}x)",
        flush=True,
    )


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------- 2. first call

FIRST_CALL = textwrap.dedent(
    """
    import json, os, sys, time
    c0, t0 = time.process_time(), time.perf_counter()
    import lens_alti
    t_import, c_import = time.perf_counter() - t0, time.process_time() - c0
    import torch
    from lens_alti.models.pretrained import load_smollm2
    bridge = load_smollm2()
    ids = torch.randint(100, 49000, (1, {n}), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = bridge.run_with_cache(ids)[1]
    c1, t1 = time.process_time(), time.perf_counter()
    lens_alti.attribute(cache, heads=True, backend="{backend}", progress=False)
    t_first, c_first = time.perf_counter() - t1, time.process_time() - c1
    t2 = time.perf_counter()
    lens_alti.attribute(cache, heads=True, backend="{backend}", progress=False)
    t_second = time.perf_counter() - t2
    print(json.dumps({{"import_s": t_import, "first_s": t_first, "second_s": t_second,
                      "import_cpu_s": c_import, "first_cpu_s": c_first}}))
    """
)


def first_calls(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fresh processes against a temporary lens_alti cache folder: cold, then warm."""
    from lens_alti.models.pretrained import _SMOLLM2_CACHE_FOLDER
    from lens_alti.paths import cache_root

    out = []
    for backend in ("auto", "compiled"):
        root = tempfile.mkdtemp(prefix="lens_alti_bench_cache_")
        try:
            # the converted weights are shared (they are not what is measured); kernels start cold
            os.symlink(cache_root() / _SMOLLM2_CACHE_FOLDER, os.path.join(root, _SMOLLM2_CACHE_FOLDER))
            env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
            env.update(LENS_ALTI_CACHE=root, PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
            for state in ("cold", "warm"):
                proc = subprocess.run(
                    [sys.executable, "-c", FIRST_CALL.format(n=args.first_call_n, backend=backend)],
                    env=env, capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                if proc.returncode != 0:
                    rec = {"backend": backend, "cache": state, "error": proc.stderr.strip().splitlines()[-1:]}
                else:
                    rec = {"backend": backend, "cache": state, **json.loads(proc.stdout.strip().splitlines()[-1])}
                    rec["total_s"] = rec["import_s"] + rec["first_s"]
                out.append(rec)
                print_first(rec)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def print_first(rec: dict[str, Any]) -> None:
    if "error" in rec:
        print(f"  {rec['backend']:<9} {rec['cache']:<5} error: {rec['error']}", flush=True)
        return
    target = COLD_TARGET_S if rec["cache"] == "cold" else WARM_TARGET_S
    status = "PASS" if rec["total_s"] <= target else "FAIL"
    print(
        f"  {rec['backend']:<9} {rec['cache']:<5} import {rec['import_s']:5.2f} s + first call {rec['first_s']:5.2f} s "
        f"= {rec['total_s']:5.2f} s (target <= {target:g} s) {status}; second call {rec['second_s']:.2f} s; "
        f"CPU seconds {rec['import_cpu_s'] + rec['first_cpu_s']:.2f} (children such as gcc not counted)",
        flush=True,
    )


# --------------------------------------------------------------------------- 3. kernel vs roofline


def kernel_vs_roofline(args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    h, c, k, d = 12, 64, 512, 768
    y = torch.randn(c, d, generator=g)
    s = torch.ones(c, d)
    a = torch.rand(h, c, k, generator=g)
    a = a / a.sum(-1, keepdim=True)
    vo = torch.randn(h, k, d, generator=g) / d**0.5
    threads = torch.get_num_threads()
    elements = h * c * k * d
    ry, rv = torch.randn(d, generator=g), torch.randn(d, generator=g)
    reps = max(1, elements // (threads * d))  # the same element count as the tile
    compiled = kernels.get_kernel("l1+heads", "compiled")
    compiled(y.clone(), s.clone(), a.clone(), vo.clone())  # compile
    fns = {
        "native": lambda: native.tile("l1+heads", y, s, a, vo, threads=threads),
        "roofline": lambda: native.roofline(ry, rv, reps, threads),
        "compiled": lambda: compiled(y, s, a, vo),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.kernel_repeats):
        for name, fn in fns.items():
            w, cpu, _ = timed(fn)
            if name not in best or w < best[name][0]:
                best[name] = (w, cpu)
    roof_elements = reps * threads * d
    rec = {
        "tile": f"h {h}, c {c}, k {k}, d {d}",
        "threads": threads,
        "native_per_s": elements / best["native"][0],
        "roofline_per_s": roof_elements / best["roofline"][0],
        "compiled_per_s": elements / best["compiled"][0],
        "native_per_cpu_s": elements / max(best["native"][1], 1e-9),
        "roofline_per_cpu_s": roof_elements / max(best["roofline"][1], 1e-9),
    }
    rec["ratio"] = rec["native_per_s"] / rec["roofline_per_s"]
    rec["ratio_cpu"] = rec["native_per_cpu_s"] / rec["roofline_per_cpu_s"]
    ref = kernels.EAGER["l1+heads"](y.double(), s.double(), a.double(), vo.double())
    got = fns["native"]()
    rec["max_rel_diff"] = max(float(((p.double() - q).abs() / q.abs()).max()) for p, q in zip(got, ref, strict=True))
    return rec


# --------------------------------------------------------------------------- 4. reference-style


def reference_style(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench_alti import (
        GPT2_SMALL,
        lens_heads,
        lens_tokens,
        make_layer,
        reference_style_heads,
        reference_style_tokens,
    )

    layer = make_layer(GPT2_SMALL, args.ref_n, torch.device("cpu"))
    out = []
    for kind, lens_fn, ref_fn in (
        ("heads", lens_heads, reference_style_heads),
        ("tokens", lens_tokens, reference_style_tokens),
    ):
        lens_fn(layer, "auto")  # warm
        ref_t = min(timed(lambda f=ref_fn: f(layer))[0] for _ in range(2))
        lens_t = min(timed(lambda f=lens_fn: f(layer, "auto"))[0] for _ in range(3))
        rec = {"kind": kind, "n": args.ref_n, "reference_s": ref_t, "auto_s": lens_t, "ratio": ref_t / lens_t}
        out.append(rec)
        status = "PASS" if rec["ratio"] >= REF_TARGETS[kind] else "FAIL"
        print(
            f"  GPT-2-small layer n={args.ref_n} {kind:<6}: reference-style {ref_t:.3f} s, "
            f"lens_alti auto {lens_t:.4f} s "
            f"= {rec['ratio']:.0f}x (target >= {REF_TARGETS[kind]:g}x) {status}",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 15, 113 and GPT-2 n = 128 only; fewer repeats")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds per case (minimum kept)")
    p.add_argument("--max-call-s", type=float, default=25.0, help="skip a backend estimated slower than this per call")
    p.add_argument("--max-case-s", type=float, default=60.0, help="stop repeating a case after this")
    p.add_argument("--kernel-repeats", type=int, default=15)
    p.add_argument("--first-call-n", type=int, default=113)
    p.add_argument("--ref-n", type=int, default=128)
    p.add_argument("--skip", nargs="+", default=[], choices=["steady", "first", "kernel", "reference"])
    p.add_argument("--sizes", type=int, nargs="+", help="SmolLM2 lengths (default 15 113 512)")
    p.add_argument("--gpt2-sizes", type=int, nargs="+", help="GPT-2-small lengths (default 128 1024)")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--json", help="write all results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.kernel_repeats = 1, 8
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads or cpus)
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(
        f"lens_alti backend benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
        f"native kernels {'available' if native.available() else 'unavailable: ' + str(native.failure())}, "
        f"load average {load0:.2f}"
    )
    results: dict[str, Any] = {"load_average_start": load0}

    if "steady" not in args.skip:
        print("\n== 1. steady state: attribute() seconds (min of interleaved repeats) ==")
        print(
            f"{'model':<9} {'n':>5} {'heads':>5} {'elements':>9} "
            + " ".join(f"{b:>7}" for b in BACKENDS)
            + f"  {'auto is':>8} {'best':>8} auto/best (target <= {AUTO_TARGET}x)"
        )
        sizes = args.sizes or ([15, 113] if args.quick else [15, 113, 512])
        gsizes = args.gpt2_sizes or ([128] if args.quick else [128, 1024])
        rows = []
        for name, caches in (("SmolLM2", smollm2_caches(sizes)), ("GPT-2", gpt2_caches(gsizes))):
            for n, cache in caches.items():
                for heads in (True, False):
                    rec = steady(name, n, cache, heads, args)
                    rows.append(rec)
                    print_steady(rec)
            del caches
        results["steady"] = rows
        print(
            "\nelements per CPU-second of whole calls (per-block overheads included; in brackets backend.py's rate,"
            " the slope of CPU seconds over elements, which excludes them)"
        )
        for b in ("native", "compiled", "eager"):
            for heads in (True, False):
                rates = [r["elements"] / r[b]["cpu_s"] for r in rows if r["heads"] == heads and "cpu_s" in r.get(b, {})
                         and r["elements"] > 1e9]  # fmt: skip
                if rates:
                    med = sorted(rates)[len(rates) // 2]
                    print(f"  {b:<8} heads {'on ' if heads else 'off'}: median {med:.2e} over {len(rates)} cases "
                          f"[{backend_mod.CPU_RATES[(b, heads)]:.1e}]")  # fmt: skip

    if "first" not in args.skip:
        print(f"\n== 2. first call in a fresh process (SmolLM2 n = {args.first_call_n}, heads=True) ==")
        results["first_call"] = first_calls(args)

    if "kernel" not in args.skip and native.available():
        print("\n== 3. per-head L1 kernel vs the measured roofline ==")
        k = kernel_vs_roofline(args)
        results["kernel"] = k
        status = "PASS" if k["ratio"] >= ROOF_TARGET else "FAIL"
        print(
            f"  tile {k['tile']}, {k['threads']} threads: native {k['native_per_s']:.2e}/s, roofline "
            f"{k['roofline_per_s']:.2e}/s: {k['ratio']:.2f} (target >= {ROOF_TARGET}) {status}\n"
            f"  per CPU-second (less sensitive to other load): native {k['native_per_cpu_s']:.2e}, roofline "
            f"{k['roofline_per_cpu_s']:.2e}: {k['ratio_cpu']:.2f}\n"
            f"  compiled torch kernel {k['compiled_per_s']:.2e}/s; native max relative diff vs float64 "
            f"{k['max_rel_diff']:.1e}",
            flush=True,
        )

    if "reference" not in args.skip:
        print("\n== 4. against the reference-style dense baselines (information-flow-routes / ALTI+ method) ==")
        results["reference"] = reference_style(args)

    load1 = os.getloadavg()[0]
    results["load_average_end"] = load1
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s; load average {load0:.2f} -> {load1:.2f} on "
        f"{os.cpu_count()} CPUs (above the thread count: other processes shared the cores and slowed every row)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
