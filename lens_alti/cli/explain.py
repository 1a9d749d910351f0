"""`lens-alti explain TEXT`: ALTI of one position of a text, with `--target` ALTI-Logit and routes.

The model is never cached whole: every entry point is given the model and the tokens
(`attribute(model, tokens=...)`, `logit_attribution(model, ...)`, `routes(model, ...)`), which
check their memory before running it. Texts of at most `--max-interactive` tokens are explained
at every position (the report's heatmaps and position picker); longer ones at the explained
position only, holding one layer at a time (docs/spec.md §12).

Also the printing and report helpers `lens-alti demo` shares (`step`, `print_top`, `top_table`,
`decoder_report_items`).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def step(msg: str) -> float:
    """Print a progress line on stderr; return the time (`time.perf_counter()`)."""
    print(f"[lens-alti] {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


def print_top(result: Any, pos: int, k: int) -> None:
    """Print the `k` input tokens with the largest rollout contribution to position `pos` (batch item 0),
    the attention sink set aside (docs/spec.md §10) and said so."""
    print(f"\ntop {k} input tokens by ALTI rollout ({result.measure}) for position {pos}:")
    for idx, tok, val in result.top_sources(pos, k=k):
        print(f"  {idx:4d}  {tok!r:>16}  {val:.4f}  {'#' * round(val * 60)}")
    note = sink_note(result.sinks, result.str_tokens, float(result.sink_share[0, result.row_of(pos)]), "share")
    if note:
        print(note)


def sink_note(sinks: Any, labels: Any, value: float, what: str) -> str:
    """"  set aside: attention sink ... (its share / contribution)" for batch item 0, or "" without one."""
    if sinks is None or not bool(sinks[0].any()):
        return ""
    where = sinks[0].nonzero().flatten().tolist()
    names = ", ".join(f"{i} {labels[0][i]!r}" if labels is not None else str(i) for i in where)
    return (
        f"  set aside: attention sink {names} ({what} {value:+.4f}; it carries no content, "
        "docs/spec.md §10; include_sink=True lists it)"
    )


def decoder_report_items(result: Any, pos: int) -> list[tuple[str, list[Any]]]:
    """The report sections every decoder explanation ends with: rollout, layer-wise and head figures
    (the `[n, n]` heatmaps only for a result computed at every position)."""
    from lens_alti.viz import plotting

    sections = [("Rollout for the explained position", [plotting.saliency_bar(result, pos)])]
    if result.positions is None:
        sections += [
            ("Rollout after the last layer", [plotting.rollout_heatmap(result)]),
            ("Layer-wise contributions, last layer", [plotting.token_heatmap(result, -1)]),
        ]
    if result.head_outputs is not None:
        sections.append(("Heads", [plotting.head_heatmap(result, pos)]))
    return sections


def top_table(result: Any, pos: int, k: int) -> Any:
    """The `k` top sources of position `pos` as a DataFrame (position, token, rollout contribution), the
    attention sinks last, marked as set aside (docs/spec.md §10)."""
    import pandas as pd

    rows = [(p, t, v, "") for p, t, v in result.top_sources(pos, k=k)]
    if result.sinks is not None:
        row = result.row_of(pos)
        labels = result.str_tokens[0] if result.str_tokens is not None else None
        for j in result.sinks[0].nonzero().flatten().tolist():
            name = labels[j] if labels is not None else str(j)
            rows.append((j, name, float(result.rollout[0, -1, row, j]), "attention sink: set aside, not content"))
    return pd.DataFrame(rows, columns=["position", "token", "rollout contribution", "note"])


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
    args: argparse.Namespace, model: Any, tokens: Any, logits: Any, pos: int, result: Any
) -> list[tuple[str, list[Any]]]:
    """Print ALTI-Logit and routes for --target [--contrast] at `pos`; return the report sections.

    `logits`: every position's logits for a text explained at every position (the position picker), else None.
    """
    import lens_alti
    from lens_alti.viz import explain as figures

    target = _token_id(model, args.target, "--target")
    contrast = None if args.contrast is None else _token_id(model, args.contrast, "--contrast")
    labels = result.str_tokens  # the model's own token strings (as `attribute` shows them) label the figures
    attr = lens_alti.logit_attribution(model, target, contrast, position=pos, tokens=tokens)
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
    note = sink_note(attr.sinks, attr.str_tokens, float(attr.sink[0]), "contribution")
    if note:
        print(note)
    print("heads with the largest direct logit attribution:")
    print("  " + ", ".join(f"L{layer}H{h} {v:+.3f}" for layer, h, v in attr.top_heads(args.top)))
    graph = lens_alti.routes(model, pos, target=target, contrast=contrast, tokens=tokens, threshold=args.threshold)
    print(f"routes ({graph.weighting} weighting, threshold {graph.threshold}): {len(graph.edges)} edges; top heads:")
    print("  " + ", ".join(f"L{layer}H{h} {v:.3f}" for layer, h, v in graph.top_heads(args.top)))
    sections: list[tuple[str, list[Any]]] = [
        (
            f"ALTI-Logit: which input tokens push the {what}",
            [
                "Each input token's signed contribution (blue: towards, red: against; grey: the attention "
                "sink, a position heads attend to when they have nothing to read, shown apart from the "
                "content). The slider shows the contribution accumulated through each layer.",
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
    if logits is not None:
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
    """`lens-alti explain TEXT`: load the model, run ALTI, print the top sources; `--out` writes a report."""
    import torch

    import lens_alti
    from lens_alti.models.pretrained import load_pretrained

    smol = args.model.lower().startswith("smollm2")
    first = " (the first SmolLM2 load converts its GGUF once, ~20 s)" if smol else ""
    t0 = step(f"loading {args.model}{first}")
    model = load_pretrained(args.model)
    if hasattr(model, "encoder_blocks"):
        return _explain_seq2seq(args, model)
    tokens = model.to_tokens(args.text, truncate=False)  # truncation would hide a text that is too long
    from lens_alti.analysis.checks import check_context
    from lens_alti.api.logit import next_token_logits
    from lens_alti.validation import check_position

    n = tokens.shape[1]
    check_context(model, n, "text")
    pos = check_position("--position", args.position, None, n, where="the text")
    whole = n <= args.max_interactive  # every position: the report's heatmaps and position picker
    t1 = step("running the model and ALTI" + ("" if whole else f" at position {pos}, one layer at a time"))
    result = lens_alti.attribute(model, tokens=tokens, heads=args.heads, positions=None if whole else [pos])
    assert isinstance(result, lens_alti.AltiResult) and result.str_tokens is not None  # not an encoder-decoder
    t2 = time.perf_counter()
    words = result.str_tokens[0]
    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    logits = None
    if causal and whole:
        with torch.no_grad():
            logits = model(tokens)
    print(f"model: {args.model} ({result.architecture}, {result.n_layers} layers, weights {result.weight_processing})")
    print(f"text: {args.text!r} ({len(words)} tokens)")
    if causal:
        row = logits[0, pos] if logits is not None else next_token_logits(model, tokens, pos)[0]
        p, top = row.float().softmax(-1).max(-1)
        print(f"position {pos} {words[pos]!r} predicts {model.to_string(top)!r} (p = {float(p):.3f})")
    print(f"max reconstruction error over layers: {float(result.reconstruction_error.max()):.2e} of max|y|")
    print_top(result, pos, args.top)
    if args.contrast is not None and args.target is None:
        raise ValueError("--contrast needs --target (explain the logit difference target − contrast)")
    prediction = [] if args.target is None else _prediction_sections(args, model, tokens, logits, pos, result)
    if args.out:
        from lens_alti.viz.report import write_report

        top = ("Top sources", [top_table(result, pos, args.top)])
        sections = [top, *prediction, *decoder_report_items(result, pos)]
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
