"""The `lens-alti` command."""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"


def _explain(text: str, model_name: str, position: int, k: int, heads: bool) -> None:
    import torch

    import lens_alti
    from lens_alti.pretrained import load_pretrained

    t0 = time.perf_counter()
    model = load_pretrained(model_name)
    tokens = model.to_tokens(text)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and tokens.shape[1] > n_ctx:
        raise ValueError(f"the text is {tokens.shape[1]} tokens long; {model_name} takes at most {n_ctx}")
    t1 = time.perf_counter()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    t2 = time.perf_counter()
    result = lens_alti.attribute(cache, tokens=tokens, heads=heads)
    t3 = time.perf_counter()

    str_tokens = result.str_tokens[0]
    pos = position if position >= 0 else len(str_tokens) + position
    if not 0 <= pos < len(str_tokens):
        raise ValueError(f"--position {position} is outside the {len(str_tokens)} tokens of the text")
    probs = torch.softmax(logits[0, pos].float(), dim=-1)
    top_p, top_id = probs.max(dim=-1)
    print(f"model: {model_name} ({result.architecture}, {result.n_layers} layers, weights {result.weight_processing})")
    print(f"text: {text!r} ({len(str_tokens)} tokens)")
    print(f"position {pos} {str_tokens[pos]!r} predicts {model.to_string(top_id)!r} (p = {float(top_p):.3f})")
    print(f"max reconstruction error over layers: {float(result.reconstruction_error.max()):.2e} of max|y|")
    print(f"\ntop {k} input tokens by ALTI rollout (l1) for position {pos}:")
    for idx, tok, val in result.top_sources(pos, k=k):
        print(f"  {idx:4d}  {tok!r:>14}  {val:.4f}  {'#' * round(val * 60)}")
    if heads and result.head_outputs is not None:
        share = result.head_outputs[0, :, :, pos]
        flat = share.flatten().topk(min(k, share.numel()))
        print(f"\nheads whose output contributes most to position {pos} (share of the block's parts):")
        for val, i in zip(flat.values.tolist(), flat.indices.tolist(), strict=False):
            print(f"  L{i // share.shape[1]}H{i % share.shape[1]}  {val:.4f}")
    print(f"\n(load {t1 - t0:.1f} s, forward {t2 - t1:.2f} s, ALTI {t3 - t2:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-alti", description="ALTI contributions for TransformerLens models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the indirect-object example on the built-in SmolLM2-135M")
    demo.add_argument("--top", type=int, default=8, help="how many input tokens to list")
    explain = sub.add_parser("explain", help="explain one position of a text")
    explain.add_argument("text")
    explain.add_argument(
        "--model", default="smollm2", help="'smollm2' (built-in), 'minilm', a local folder or a hub name"
    )
    explain.add_argument("--position", type=int, default=-1)
    explain.add_argument("--top", type=int, default=8)
    explain.add_argument("--heads", action="store_true", help="also rank heads")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from lens_alti.errors import LensAltiError

    warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")
    try:
        if args.command == "demo":
            _explain(DEFAULT_PROMPT, "smollm2", -1, args.top, heads=True)
        else:
            _explain(args.text, args.model, args.position, args.top, args.heads)
    except (ImportError, ValueError, OSError, LensAltiError) as exc:
        print(f"lens-alti: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
