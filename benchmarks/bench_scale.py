"""Model scale and corpus scale: streaming, positions=, and the corpus runner, measured in one run.

Sections (each prints its ratios against a baseline measured in the same run):
1. stream:    a random 12-layer GPT-2-small, n = --n (2048): `attribute(model, tokens, heads=True,
              positions=[-1])` (streaming) vs `run_with_cache` + `attribute(cache, heads=True)`:
              peak extra memory, time, and the largest difference of the shared numbers.
2. positions: the same model, n = --n-positions (1024), streaming per-head with `positions=[-1]`
              vs all positions: time and memory ratio.
3. corpus:    `run_corpus` on --corpus (200) short sentences with the built-in SmolLM2-135M vs
              calling `attribute` on the same batches in a loop: items/s and the runner's overhead.
4. llama:     (`--device cuda`) an 8B-LLaMA-shaped model (32 layers, d_model 4096, 32 heads, 8 kv
              heads), random bf16 weights, n = 4096, streaming with positions=[-1] and heads=True:
              peak GPU memory and time. `--llama-tiny` runs the same code path on a 2-layer,
              d_model 256 model (n = 256), e.g. on a CPU.

Usage: `python benchmarks/bench_scale.py [--device cuda] [--n 2048] [--skip corpus] [--llama-tiny]
[--json out.json]`. CPU memory is the peak process RSS (sampled every 5 ms, plus the kernel's
VmHWM) minus the RSS before the call; CUDA memory is `torch.cuda.max_memory_allocated` minus the
memory allocated before the call. MB = 10⁶ bytes. Timings are only meaningful on an idle machine:
the run prints the load average at its start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_alti import PeakMemory, first_call, local_tokenizer, measure  # noqa: E402

import lens_alti  # noqa: E402

MB = 1e6


def gpt2_small(device: torch.device, n_ctx: int) -> Any:
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=max(1024, n_ctx))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=local_tokenizer(), device=device)


def _ids(n: int, device: torch.device) -> torch.Tensor:
    return torch.randint(4, 1000, (1, n), generator=torch.Generator().manual_seed(n)).to(device)


def _warm(bridge: Any, device: torch.device) -> None:
    """Compile the kernels once (dynamic shapes) so no timed call pays for compilation."""
    ids = _ids(256, device)
    first_call(lambda: lens_alti.attribute(bridge, tokens=ids, heads=True, backend="compiled"), device)
    first_call(lambda: lens_alti.attribute(bridge, tokens=ids, heads=True, positions=[-1], backend="compiled"), device)


def bare_forward(n: int, device: torch.device) -> tuple[float, int]:
    """(seconds, peak extra bytes) of the model's own forward pass at length n, no hooks, no lens_alti.

    The floor of any streaming method. Run in a fresh process, as the first large call after the
    model is built (like the streaming measurement): within one process, the call measured second
    starts from a heap that the first left larger than a trim gets back, which flatters it.
    """
    here = str(pathlib.Path(__file__).resolve().parent)
    code = (
        f"import sys, time, torch; sys.path.insert(0, {here!r})\n"
        "from bench_scale import gpt2_small, _ids\n"
        "from bench_alti import PeakMemory\n"
        f"d = torch.device({str(device)!r}); bridge = gpt2_small(d, {n}); ids = _ids({n}, d)\n"
        "with torch.no_grad(): bridge(ids[:, :8])\n"
        "with torch.no_grad(), PeakMemory(d) as mem:\n"
        "    t0 = time.perf_counter(); bridge(ids); t = time.perf_counter() - t0\n"
        "print('BARE', t, mem.extra)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    _, seconds, extra = next(line for line in out.splitlines() if line.startswith("BARE")).split()
    return float(seconds), int(extra)


def bench_stream(bridge: Any, n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    ids = _ids(n, device)

    def cache_path() -> Any:
        _, cache = bridge.run_with_cache(ids)
        return lens_alti.attribute(cache, heads=True)

    def streaming() -> Any:
        return lens_alti.attribute(bridge, tokens=ids, heads=True, positions=[-1])

    stream = measure(streaming, device, args.repeats, args.max_seconds)
    print(f"  (streaming measured first: {stream.seconds:.2f} s, {stream.peak_bytes / MB:.1f} MB)", flush=True)
    bare_s, bare_bytes = bare_forward(n, device)
    full = measure(cache_path, device, args.repeats, args.max_seconds)
    s, f = stream.output, full.output
    # fp32 rounding between the kernels used for one row and for all rows (not a difference of paths)
    rows_diff = max(
        float((s.heads[:, :, :, 0] - f.heads[:, :, :, -1]).abs().max()),
        float((s.rollout[:, :, 0] - f.rollout[:, :, -1]).abs().max()),
        float((s.layers[:, :, 0] - f.layers[:, :, -1]).abs().max()),
    )
    full.output = f = None  # free the all-positions result before the check
    # streaming vs the cache path with the same options (untimed)
    _, cache = bridge.run_with_cache(ids)
    c = lens_alti.attribute(cache, heads=True, positions=[-1])
    del cache
    fields = ("heads", "rollout", "layers", "heads_residual")
    diff = max(float((getattr(s, k) - getattr(c, k)).abs().max()) for k in fields)
    return {
        "n": n,
        "cache_s": full.seconds, "cache_peak_mb": full.peak_bytes / MB,
        "stream_s": stream.seconds, "stream_peak_mb": stream.peak_bytes / MB,
        "forward_s": bare_s, "forward_peak_mb": bare_bytes / MB,
        "stream_over_forward": stream.peak_bytes / max(bare_bytes, 1),
        "memory_ratio": full.peak_bytes / max(stream.peak_bytes, 1),
        "time_ratio": full.seconds / stream.seconds,
        "max_abs_diff": diff,
        "rows_vs_all_positions_diff": rows_diff,
    }


def bench_positions(bridge: Any, n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    ids = _ids(n, device)
    last = measure(lambda: lens_alti.attribute(bridge, tokens=ids, heads=True, positions=[-1]), device,
                   args.repeats, args.max_seconds)
    every = measure(lambda: lens_alti.attribute(bridge, tokens=ids, heads=True), device, args.repeats,
                    args.max_seconds)
    diff = float((last.output.heads[:, :, :, 0] - every.output.heads[:, :, :, -1]).abs().max())
    return {
        "n": n,
        "all_s": every.seconds, "all_peak_mb": every.peak_bytes / MB,
        "last_s": last.seconds, "last_peak_mb": last.peak_bytes / MB,
        "time_ratio": every.seconds / last.seconds,
        "memory_ratio": every.peak_bytes / max(last.peak_bytes, 1),
        "max_abs_diff": diff,
    }


def bench_corpus(n_items: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from lens_alti.analysis.ioi import ioi_prompts
    from lens_alti.cli.corpus import RunOptions, _attribute, plan_batches, read_corpus, run_corpus
    from lens_alti.models.pretrained import load_smollm2

    model = load_smollm2(device=str(device))
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "sentences.jsonl"
        prompts = ioi_prompts(n_items)
        data.write_text("".join(json.dumps({"text": p.text}) + "\n" for p in prompts))
        opts = RunOptions(model="smollm2", data=str(data), batch_size=args.batch_size, max_length=128)
        batches, _ = plan_batches(read_corpus(data), lambda t: model.to_tokens(t)[0].cpu(), opts.batch_size, 128)
        pad = model.tokenizer.pad_token_id or 0
        _attribute(model, batches[0], opts, pad)  # warm-up
        loops, runs = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            for batch in batches:
                _attribute(model, batch, opts, pad)
            loops.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_corpus(opts, pathlib.Path(tmp) / f"out{rep}", model=model, progress=False, device=str(device))
            runs.append(time.perf_counter() - t0)
    loop_s, run_s = min(loops), min(runs)
    return {
        "items": n_items, "batch_size": opts.batch_size,
        "loop_s": loop_s, "runner_s": run_s,
        "items_per_s": n_items / run_s, "overhead": run_s / loop_s - 1,
    }


def llama_8b_shape(device: torch.device, tiny: bool) -> Any:
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    cfg = transformers.LlamaConfig(**shape, attn_implementation="eager")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            "llama-8b-shape", hf_model=hf, tokenizer=local_tokenizer(), device=device, dtype=dtype
        )


def bench_llama(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = llama_8b_shape(device, args.llama_tiny)
    boot_s = time.perf_counter() - t0
    n = 256 if args.llama_tiny else args.llama_n
    ids = _ids(n, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        res = lens_alti.attribute(model, tokens=ids, heads=True, positions=[-1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    cfg = model.cfg
    dense = cfg.n_layers * cfg.n_heads * n * n
    return {
        "n": n, "tiny": args.llama_tiny, "layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
        "boot_s": boot_s, "weights_mb": weights / MB, "stream_s": seconds, "stream_peak_extra_mb": mem.extra / MB,
        "cache_patterns_bf16_mb_estimate": dense * 2 / MB, "per_head_all_positions_fp32_mb_estimate": dense * 4 / MB,
        "max_reconstruction_error": float(res.reconstruction_error.max()),
        "heads_shape": list(res.heads.shape),
    }


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=2048, help="sequence length of the streaming-vs-cache section")
    parser.add_argument("--n-positions", type=int, default=1024)
    parser.add_argument("--corpus", type=int, default=200, help="sentences for the corpus section")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--llama-n", type=int, default=4096)
    parser.add_argument("--llama-tiny", action="store_true", help="section 4 on a 2-layer d_model 256 model")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stream", "positions", "corpus", "llama"])
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.llama_tiny:
        args.skip = [*args.skip, "llama"]
    print(f"lens_alti {lens_alti.__version__}, torch {torch.__version__}, device {device}, "
          f"{os.cpu_count()} CPUs, load average {_load()}", flush=True)
    out: dict[str, Any] = {"device": str(device), "load_start": _load()}
    torch.set_grad_enabled(False)
    if {"stream", "positions"} - set(args.skip):
        bridge = gpt2_small(device, max(args.n, args.n_positions))
        _warm(bridge, device)
        if "stream" not in args.skip:
            r = out["stream"] = bench_stream(bridge, args.n, args, device)
            print(f"\n[stream] GPT-2-small, n = {r['n']}, heads=True, positions=[-1]")
            print(f"  cache path (run_with_cache + attribute(cache, heads=True)): {r['cache_s']:8.2f} s "
                  f"{r['cache_peak_mb']:9.1f} MB")
            print(f"  streaming (attribute(model, tokens, positions=[-1]))      : {r['stream_s']:8.2f} s "
                  f"{r['stream_peak_mb']:9.1f} MB")
            print(f"  the model's bare forward pass (no hooks, no lens_alti)     : {r['forward_s']:8.2f} s "
                  f"{r['forward_peak_mb']:9.1f} MB (streaming peak = {r['stream_over_forward']:.2f}x this; "
                  "memory that no streaming method can go below)")
            print(f"  memory ratio cache/stream {r['memory_ratio']:.1f}x (target >= 5x: "
                  f"{'PASS' if r['memory_ratio'] >= 5 else 'FAIL'}); time ratio cache/stream "
                  f"{r['time_ratio']:.2f}x (target >= 1: {'PASS' if r['time_ratio'] >= 1 else 'FAIL'}); "
                  f"max|diff| streaming vs cache path {r['max_abs_diff']:.1e} "
                  f"({'PASS' if r['max_abs_diff'] <= 1e-6 else 'FAIL'}); the last row vs the all-positions result "
                  f"{r['rows_vs_all_positions_diff']:.1e} (fp32 rounding of the one-row kernels)", flush=True)
        if "positions" not in args.skip:
            r = out["positions"] = bench_positions(bridge, args.n_positions, args, device)
            print(f"\n[positions] GPT-2-small, n = {r['n']}, streaming, heads=True")
            print(f"  all positions: {r['all_s']:8.2f} s {r['all_peak_mb']:9.1f} MB")
            print(f"  positions=[-1]: {r['last_s']:7.2f} s {r['last_peak_mb']:9.1f} MB")
            print(f"  time ratio {r['time_ratio']:.1f}x, memory ratio {r['memory_ratio']:.1f}x, "
                  f"max|diff| {r['max_abs_diff']:.1e}", flush=True)
        del bridge
    if "corpus" not in args.skip:
        r = out["corpus"] = bench_corpus(args.corpus, args, device)
        print(f"\n[corpus] SmolLM2-135M, {r['items']} sentences, batch size {r['batch_size']}, positions=last")
        print(f"  attribute() in a loop: {r['loop_s']:.2f} s; lens-alti runner: {r['runner_s']:.2f} s "
              f"({r['items_per_s']:.1f} items/s)")
        print(f"  runner overhead {100 * r['overhead']:+.1f} % (target <= 10 %: "
              f"{'PASS' if r['overhead'] <= 0.10 else 'FAIL'})", flush=True)
    if "llama" not in args.skip:
        r = out["llama"] = bench_llama(args, device)
        what = "tiny LLaMA (code-path check)" if r["tiny"] else "8B-LLaMA shape, random bf16"
        print(f"\n[llama] {what}: {r['layers']} layers, d_model {r['d_model']}, n = {r['n']}, "
              f"heads=True, positions=[-1]")
        print(f"  weights {r['weights_mb']:.0f} MB; streaming {r['stream_s']:.2f} s, peak extra "
              f"{r['stream_peak_extra_mb']:.0f} MB (a cache would hold {r['cache_patterns_bf16_mb_estimate']:.0f} MB "
              f"of patterns; all-position per-head results {r['per_head_all_positions_fp32_mb_estimate']:.0f} MB); "
              f"max reconstruction error {r['max_reconstruction_error']:.1e}", flush=True)
    out["load_end"] = _load()
    print(f"\nload average at the end: {out['load_end']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
