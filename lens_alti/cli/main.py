"""The `lens-alti` command: the parser and the dispatch to `demo` (cli/demo.py), `explain`
(cli/explain.py), `cite` (context attribution, cli/cite.py), `run` (the corpus runner, cli/corpus.py) and
`build-kernels` (the native kernels, ahead of time)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from typing import Any

from lens_alti.cli.cite import add_parser as add_cite_parser
from lens_alti.cli.cite import cite
from lens_alti.cli.demo import demo
from lens_alti.cli.explain import explain

DEFAULT_OUT = "lens_alti_demo.html"


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
    add_cite_parser(sub, common, _positive_int)
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
        {"demo": demo, "explain": explain, "cite": cite, "run": run, "build-kernels": build_kernels}[args.command](args)
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
