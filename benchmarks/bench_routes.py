"""Benchmark `lens_alti.routes` (top-down, only reached receivers) against `attribute(heads=True)`.

Both compute the same per-head contributions (docs/spec.md §3); routes computes them only for the
receivers its pruned graph reaches, `attribute(heads=True)` for every position of every layer.
One run measures, on the same cache, the wall time of each, the number of receivers routes
computed, and the ratio. Usage:

    python benchmarks/bench_routes.py [--pos 1024] [--layers 6] [--smollm2] [--repeat 3]

Timings on shared CPUs are noisy; the ratio of the two, measured in the same run, is the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import lens_alti  # noqa: E402


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    out = fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _random_gpt2(layers: int, pos: int) -> Any:
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from tests.support.tokenizer import VOCAB, tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=256, n_head=8, vocab_size=VOCAB, n_positions=max(pos, 64))
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    return TransformerBridge.boot_transformers("bench", hf_model=hf, tokenizer=tokenizer(), device="cpu")


def bench(model: Any, tokens: torch.Tensor, name: str, repeat: int, target: int | None) -> None:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    t_attr, _ = _time(lambda: lens_alti.attribute(cache, heads=True, progress=False), repeat)
    t_routes, graph = _time(lambda: lens_alti.routes(cache, threshold=0.04, progress=False), repeat)
    print(f"\n{name}: {n_layers} layers, {n_pos} positions, {model.cfg.n_heads} heads, d_model {model.cfg.d_model}")
    print(f"  attribute(heads=True)        {t_attr:8.3f} s   receivers computed {n_layers * n_pos}")
    print(
        f"  routes(threshold=0.04)       {t_routes:8.3f} s   receivers computed {sum(graph.computed_receivers)}"
        f"  ({len(graph.edges)} edges)   -> {t_attr / t_routes:.1f}x faster"
    )
    if target is not None:
        t_logit, g2 = _time(lambda: lens_alti.routes(cache, threshold=0.04, target=target, progress=False), repeat)
        print(
            f"  routes(target=..., logit)    {t_logit:8.3f} s   receivers computed {sum(g2.computed_receivers)}"
            f"  ({len(g2.edges)} edges)   -> {t_attr / t_logit:.1f}x faster"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pos", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (real weights) on a long text")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = _random_gpt2(args.layers, args.pos)
    tokens = torch.randint(4, 1000, (1, args.pos), generator=torch.Generator().manual_seed(0))
    bench(model, tokens, "random GPT-2 (d 256)", args.repeat, target=7)
    if args.smollm2:
        from lens_alti.analysis.ioi import ioi_prompts
        from lens_alti.models.pretrained import load_smollm2

        smol = load_smollm2()
        text = " ".join(p.text + " " + p.correct.strip() + "." for p in ioi_prompts(40))
        toks = smol.to_tokens(text)[:, : args.pos]
        bench(smol, toks, "SmolLM2-135M", args.repeat, target=int(smol.to_single_token(" Mary")))


if __name__ == "__main__":
    main()
