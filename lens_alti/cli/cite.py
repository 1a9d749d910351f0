"""`lens-alti cite FILE --query ...`: which sentences (or paragraphs) of a text made the model answer as it did.

Context attribution with ALTI-Logit (`lens_alti.context_attribution`, docs/spec.md §13): the
response (generated greedily, or given with `--response`) is explained token by token, and each
unit of the context gets the sum of its tokens' signed contributions.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lens_alti.cli.explain import step


def _read(path: str) -> str:
    """The text of FILE ('-': standard input)."""
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def add_parser(sub: Any, common: argparse.ArgumentParser, positive_int: Any) -> None:
    """The `cite` subcommand's arguments (`positive_int`: the parser's check of counts)."""
    c = sub.add_parser(
        "cite", parents=[common],
        help="context attribution: which sentences or paragraphs of FILE made the model give its answer",
    )
    c.add_argument("file", help="the context: a UTF-8 text file ('-' reads standard input)")
    c.add_argument("--query", required=True, help="the question or instruction that follows the context")
    c.add_argument("--response", help="the response to explain (default: generated greedily)")
    c.add_argument("--units", default="sentence", choices=["sentence", "paragraph"], help="what to score")
    c.add_argument("--model", default="smollm2", help="'smollm2' (built-in), a local folder or a hub name")
    c.add_argument("--top", type=positive_int, default=5, help="how many units to list (default 5)")
    c.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="the longest generated response (default 32)"
    )
    c.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    c.add_argument("--out", help="write a self-contained HTML report here")
    c.add_argument("--save", help="write the result here (.safetensors; read it with lens_alti.load)")


def cite(args: argparse.Namespace) -> None:
    """Load the model, attribute the response to the units of the context, print the top units."""
    import lens_alti
    from lens_alti.models.pretrained import load_pretrained

    context = _read(args.file)
    t0 = step(f"loading {args.model}")
    model = load_pretrained(args.model)
    t1 = step("generating and explaining the response" if args.response is None else "explaining the response")
    result = lens_alti.context_attribution(
        model, context, args.query, args.response, units=args.units, chat=False if args.no_chat else None,
        max_new_tokens=args.max_new_tokens,
    )
    t2 = time.perf_counter()
    print(f"model: {args.model} ({result.architecture}); prompt {result.n_prompt} tokens, "
          f"{result.n_units} {args.units} units{' (chat template)' if result.chat else ''}")
    print(f"response{' (generated)' if result.generated else ''}: {result.response!r}")
    print(f"log p(response) = {result.response_log_prob:.4f} over {len(result.response_ids)} tokens; explained "
          f"(logit − mean logit, summed) = {float(result.explained.sum()):.4f}")
    print(f"  = units {float(result.scores.sum()):+.4f} + rest of the prompt {result.other:+.4f} "
          f"+ response tokens {result.response_score:+.4f} + MLPs and biases {float(result.not_to_tokens.sum()):+.4f}")
    print(f"\ntop {args.top} units (signed; negative = lowers the response's log-probability):")
    for u, text, score in result.top(args.top):
        short = " ".join(text.split())
        print(f"  {u:4d}  {score:+.4f}  {short[:100]}{'…' if len(short) > 100 else ''}")
    if args.save:
        print(f"\nresult: {result.save(args.save)}")
    if args.out:
        _report(args, result)
    print(f"\n(load {t1 - t0:.1f} s, attribution {t2 - t1:.1f} s)")


def _report(args: argparse.Namespace, result: Any) -> None:
    from lens_alti.viz.context import context_figure, context_html
    from lens_alti.viz.report import Html, write_report

    table = result.to_dataframe().sort_values("rank")
    sections = [
        ("The context, shaded by score", [
            "Each unit's signed contribution to the response's log-probability (ALTI-Logit, first order): "
            "blue raises it, red lowers it; hover a unit for its rank and score.",
            Html(context_html(result)),
        ]),
        ("Units by score", [table.head(args.top)]),
        ("Every unit", [context_figure(result)]),
    ]
    out = write_report(args.out, f"Context attribution: {args.query}", sections, notes=repr(result))
    print(f"report: {out}")
