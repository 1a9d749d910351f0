"""Context attribution on SmolLM2-135M: ALTI-Logit against ablations and against ContextCite.

    PYTHONPATH=. python examples/context_study.py --lengths 512,1024 --prompts 10 \\
        --json examples/context_study_results.json --guide docs/guides/context-attribution-study.md

Each prompt (`lens_alti.analysis.context.context_prompts`) is several passages about similar
people; one passage says where the asked person was born, the question asks for that city, and the
response explained is the city (the gold answer, the same for every method). The units are the
passages (paragraphs). For each prompt:

- ALTI-Logit: `lens_alti.context_attribution(model, context, query, answer, units="paragraph")`;
- ContextCite (Cohen-Wang et al. 2024, `pip install context-cite`), run on the same weights, the
  same prompt (its own template and the chat template, as lens_alti builds it) and the same units
  (a partitioner that removes units as `lens_alti.api.inputs.remove_units` does), with its
  defaults: 64 random ablations keeping each unit with probability 1/2, a LASSO surrogate;
- the ground truth: log p(answer) with each unit removed (leave-one-out) and with the top-k units
  of each ranking removed (ContextCite's top-k log-probability drop), k = 1, 3, 5 (only k smaller
  than the number of units).

Reported per length and overall: top-1 accuracy (the fact's passage ranked first), Spearman's rho
with the leave-one-out drops, the top-k drops, and the wall time per example of each method. The
JSON is rewritten after every prompt, and `--resume` skips the prompts it already holds. The
guide's results table (between its `results:start` / `results:end` markers) is rewritten from
the JSON. Nothing is tuned: prompts, units, metrics and ContextCite's settings were fixed before
any number was seen. ContextCite must be importable (it is not a lens_alti dependency: install it
in a separate environment, see the guide); `--no-contextcite` runs the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.analysis import context as evaluation  # noqa: E402
from lens_alti.analysis.ablation import spearman  # noqa: E402
from lens_alti.api.inputs import DEFAULT_TEMPLATE, context_tokens, remove_units, text_units  # noqa: E402
from lens_alti.models.pretrained import load_smollm2, smollm2_path  # noqa: E402

KS = (1, 3, 5)


class Scorer:
    """The Hugging Face model with PyTorch's SDPA attention (the fastest forward pass here), its
    tokenizer and configuration: what `lens_alti.analysis.context` needs to score ablated prompts."""

    def __init__(self, hf: Any, tokenizer: Any) -> None:
        self.hf, self.tokenizer = hf, tokenizer
        self.cfg = argparse.Namespace(default_prepend_bos=True)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(ids).logits

    def parameters(self) -> Any:
        return self.hf.parameters()


def contextcite_runner(hf: Any, tokenizer: Any) -> Any:
    """A function (context, query, spans, answer, prompt ids) → (scores, seconds), or None without context_cite."""
    try:
        from context_cite import ContextCiter
        from context_cite.context_partitioner import BaseContextPartitioner
    except ImportError:
        return None

    class Units(BaseContextPartitioner):  # ContextCite's sources are lens_alti's units
        def __init__(self, context: str, spans: list[tuple[int, int]]) -> None:
            super().__init__(context)
            self.spans = spans

        @property
        def num_sources(self) -> int:
            return len(self.spans)

        def split_context(self) -> None:
            pass

        def get_source(self, index: int) -> str:
            a, b = self.spans[index]
            return self.context[a:b]

        def get_context(self, mask: Any = None) -> str:
            if mask is None:
                return self.context
            return remove_units(self.context, self.spans, [u for u, keep in enumerate(mask) if not keep])

    def run(context: str, query: str, spans: list[tuple[int, int]], answer: str, prompt_ids: list[int]) -> Any:
        t = time.perf_counter()
        cc = ContextCiter(hf, tokenizer, context, query, partitioner=Units(context, spans),
                          prompt_template=DEFAULT_TEMPLATE)
        ids, prompt = cc._get_prompt_ids(return_prompt=True)
        cc._cache["output"] = prompt + answer  # the response to attribute: the gold answer, as for ALTI-Logit
        if list(ids) != list(prompt_ids):
            raise RuntimeError("ContextCite's prompt ids differ from lens_alti's")
        scores = torch.as_tensor(cc.get_attributions(verbose=False), dtype=torch.float64)
        return scores, time.perf_counter() - t, list(cc._response_ids)

    return run


def one_prompt(model: Any, scorer: Scorer, cite: Any, length: int, seed: int) -> dict[str, Any]:
    """Every method and the ground truth on the prompt of `length` and `seed`."""
    count = lambda c, q: len(context_tokens(model, c, q)[0])  # noqa: E731
    case = evaluation.context_prompt_case(length, seed, count)
    spans = text_units(case.context, "paragraph")
    assert len(spans) == case.n_passages
    prompt_ids = context_tokens(model, case.context, case.query)[0]
    row: dict[str, Any] = {"length": length, "seed": seed, "tokens": len(prompt_ids), "units": len(spans),
                           "fact": case.fact, "answer": case.answer, "person": case.person}
    t = time.perf_counter()
    ours = lens_alti.context_attribution(model, case.context, case.query, case.answer, units="paragraph")
    row["alti_logit_seconds"] = time.perf_counter() - t
    answer_ids = ours.response_ids.tolist()
    row["answer_tokens"] = len(answer_ids)
    row["log_prob_bridge"] = ours.response_log_prob
    row["max_completeness_gap"] = float(ours.completeness_gap.abs().max())
    rankings = {"ALTI-Logit": ours.scores.double()}
    with torch.no_grad():
        logits = scorer(torch.tensor([prompt_ids + answer_ids]))[0, len(prompt_ids) - 1]
    row["model_answers_first_token"] = bool(int(logits.argmax()) == answer_ids[0])
    if cite is not None:
        scores, seconds, cc_ids = cite(case.context, case.query, spans, case.answer, prompt_ids)
        if cc_ids != answer_ids:
            raise RuntimeError(f"ContextCite's response ids {cc_ids} differ from lens_alti's {answer_ids}")
        rankings["ContextCite"], row["contextcite_seconds"] = scores, seconds
    t = time.perf_counter()
    full, loo = evaluation.leave_one_out(scorer, case.context, case.query, answer_ids, spans)
    row["log_prob"], row["loo"], row["loo_seconds"] = full, loo.tolist(), time.perf_counter() - t
    rankings["leave-one-out"] = loo
    drops: dict[frozenset[int], float] = {}
    for name, scores in rankings.items():
        order = [int(i) for i in scores.argsort(descending=True, stable=True)]
        metrics: dict[str, Any] = {"scores": scores.tolist(), **evaluation.rank_metrics(scores, loo, case.fact)}
        for k in (k for k in KS if k < len(spans)):
            key = frozenset(order[:k])
            if key not in drops:
                drops[key] = evaluation.top_k_drop(scorer, case.context, case.query, answer_ids, spans, order, k, full)
            metrics[f"top{k}_drop"] = drops[key]
        row[name] = metrics
    return row


def _mean(values: list[float]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


SECONDS = {"ALTI-Logit": "alti_logit_seconds", "ContextCite": "contextcite_seconds", "leave-one-out": "loo_seconds"}


def groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The groups every table reports: each length, all prompts, and the prompts on which removing
    the fact's passage lowers log p(answer) the most (leave-one-out ranks the fact first)."""
    lengths = sorted({r["length"] for r in rows})
    out = [(f"≤ {n}", [r for r in rows if r["length"] == n]) for n in lengths]
    out.append(("all", rows))
    out.append(("all, LOO ranks the fact first", [r for r in rows if r["leave-one-out"]["top1"] == 1.0]))
    return [(label, group) for label, group in out if group]


def _position_rho(scores: list[float]) -> float:
    return spearman(torch.tensor(scores), torch.arange(len(scores), dtype=torch.float64))


def summary(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One line per (group, method): top-1, Spearman with leave-one-out and with the unit's position
    in the text, top-k drops, seconds per example."""
    out = []
    for label, group in groups(rows):
        for m in methods:
            line: dict[str, Any] = {
                "group": label, "method": m, "prompts": len(group),
                "tokens": _mean([r["tokens"] for r in group]), "units": _mean([r["units"] for r in group]),
                "top1": _mean([r[m]["top1"] for r in group]),
                "spearman_loo": _mean([r[m]["spearman_loo"] for r in group]),
                "spearman_position": _mean([_position_rho(r[m]["scores"]) for r in group]),
            }
            for k in KS:
                vals = [r[m].get(f"top{k}_drop") for r in group]
                line[f"top{k}_drop"] = _mean([v for v in vals if v is not None])
                line[f"top{k}_n"] = sum(v is not None for v in vals)
            line["seconds"] = _mean([r.get(SECONDS[m]) for r in group])
            out.append(line)
    return out


def task_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per group: the model on the task, and the time of ContextCite over ALTI-Logit's."""
    out = []
    for label, group in groups(rows):
        ratios = [r["contextcite_seconds"] / r["alti_logit_seconds"] for r in group if "contextcite_seconds" in r]
        out.append({
            "group": label, "prompts": len(group), "tokens": _mean([r["tokens"] for r in group]),
            "log_prob": _mean([r["log_prob"] for r in group]),
            "model_first_token": _mean([float(r["model_answers_first_token"]) for r in group]),
            "model_answer_correct": _mean([float(r["model_answer_correct"]) for r in group if "model_answer" in r]),
            "loo_fact_first": _mean([r["leave-one-out"]["top1"] for r in group]),
            "loo_fact_drop": _mean([r["loo"][r["fact"]] for r in group]),
            "time_ratio_median": sorted(ratios)[len(ratios) // 2] if ratios else float("nan"),
        })
    return out


def markdown(lines: list[dict[str, Any]], task: list[dict[str, Any]]) -> str:
    """The two results tables: the task, then the methods."""
    text = ("| prompts | n | mean tokens | mean log p(answer) | model's answer names the city | model's first "
            "token = answer's | LOO ranks the fact first | mean LOO drop of the fact | ContextCite time / "
            "ALTI-Logit time (median) |\n|---|---|---|---|---|---|---|---|---|\n")
    for x in task:
        text += (f"| {x['group']} | {x['prompts']} | {x['tokens']:.0f} | {x['log_prob']:.2f} | "
                 f"{x['model_answer_correct']:.2f} | {x['model_first_token']:.2f} | {x['loo_fact_first']:.2f} | "
                 f"{x['loo_fact_drop']:.2f} | {x['time_ratio_median']:.1f} |\n")
    text += ("\n| prompts | method | n | units | top-1 | Spearman (LOO) | drop k=1 | drop k=3 | drop k=5 | "
             "s / example | Spearman (position) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for x in lines:
        drops = [f"{x[f'top{k}_drop']:.2f} ({x[f'top{k}_n']})" if x[f"top{k}_n"] else "–" for k in KS]
        text += (f"| {x['group']} | {x['method']} | {x['prompts']} | {x['units']:.1f} | {x['top1']:.2f} | "
                 f"{x['spearman_loo']:.2f} | {' | '.join(drops)} | {x['seconds']:.1f} | "
                 f"{x['spearman_position']:.2f} |\n")
    return text


def write_guide(path: str, table: str, extra: str) -> None:
    """Replace the text between the guide's results markers with the table."""
    page = Path(path)
    text = page.read_text(encoding="utf-8")
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    page.write_text(before + start + "\n" + table + extra + rest.split(end, 1)[1].join(["\n" + end, ""]),
                    encoding="utf-8")


def model_answers(path: str, scorer: Scorer, max_new_tokens: int = 16) -> None:
    """Add to each row of the JSON at `path` the model's own greedy answer (Hugging Face `generate` on the
    same weights, SDPA attention) and whether it names the right city; rows that have one are kept."""
    out = json.loads(Path(path).read_text())
    count = lambda c, q: len(context_tokens(scorer, c, q)[0])  # noqa: E731
    for row in out["rows"]:
        if "model_answer" in row:
            continue
        case = evaluation.context_prompt_case(row["length"], row["seed"], count)
        ids = torch.tensor([context_tokens(scorer, case.context, case.query)[0]])
        with torch.no_grad():
            new = scorer.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=scorer.tokenizer.eos_token_id)[0, ids.shape[1] :]
        row["model_answer"] = scorer.tokenizer.decode(new, skip_special_tokens=True)
        row["model_answer_correct"] = case.answer in row["model_answer"]
        Path(path).write_text(json.dumps(out, indent=1))


def tables(path: str, guide: str | None) -> None:
    """Recompute the summaries of the JSON at `path`, rewrite it, print the tables and write them into `guide`."""
    out = json.loads(Path(path).read_text())
    methods = [m for m in SECONDS if m in out["rows"][0]]
    out["summary"], out["task"] = summary(out["rows"], methods), task_summary(out["rows"])
    Path(path).write_text(json.dumps(out, indent=1))
    table = markdown(out["summary"], out["task"])
    print(table)
    if guide:
        write_guide(guide, table, "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,1024", help="prompt lengths in tokens (at most), comma-separated")
    ap.add_argument("--prompts", default="10", help="prompts per length: one number, or one per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="examples/context_study_results.json")
    ap.add_argument("--guide", help="rewrite this guide page's results table from the JSON")
    ap.add_argument("--resume", action="store_true", help="keep the prompts the JSON already holds")
    ap.add_argument("--no-contextcite", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tables-only", action="store_true", help="no model run: the tables (and guide) from the JSON")
    ap.add_argument("--answers", action="store_true",
                    help="only add the model's own greedy answers to the JSON's rows, then the tables")
    args = ap.parse_args()
    if args.tables_only:
        return tables(args.json, args.guide)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.prompts.split(",")]
    counts = counts * len(lengths) if len(counts) == 1 else counts
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path(), attn_implementation="sdpa", local_files_only=True)
    if args.answers:
        from transformers import AutoTokenizer

        model_answers(args.json, Scorer(hf.eval(), AutoTokenizer.from_pretrained(smollm2_path())))
        return tables(args.json, args.guide)
    model = load_smollm2()
    scorer = Scorer(hf.eval(), model.tokenizer)
    cite = None if args.no_contextcite else contextcite_runner(hf, model.tokenizer)
    methods = ["ALTI-Logit", *([] if cite is None else ["ContextCite"]), "leave-one-out"]
    out: dict[str, Any] = {"rows": []}
    if args.resume and Path(args.json).is_file():
        out = json.loads(Path(args.json).read_text())
    done = {(r["length"], r["seed"]) for r in out["rows"]}
    out["setup"] = {
        "model": "SmolLM2-135M-Instruct (fp32)", "units": "paragraph (one passage each)", "ks": list(KS),
        "contextcite": "context-cite 0.0.4, 64 ablations, keep probability 0.5, LASSO alpha 0.01" if cite else None,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "attention": "lens_alti: the bridge (rows at <= 512 and <= 1024 tokens: timed when logit_attribution ran "
                     "run_with_cache with eager attention; later rows: streaming, recomputed rows); ContextCite and "
                     "the ablations: the same weights with SDPA attention",
    }
    order = [(seed, length) for seed in range(args.seed, args.seed + max(counts))
             for length, n in zip(lengths, counts, strict=True) if seed < args.seed + n]
    for seed, length in order:  # interleaved: a run stopped early still covers every length
        if (length, seed) in done:
            continue
        row = one_prompt(model, scorer, cite, length, seed)
        out["rows"].append(row)
        out["summary"], out["task"] = summary(out["rows"], methods), task_summary(out["rows"])
        Path(args.json).write_text(json.dumps(out, indent=1))
        times = ", ".join(f"{k} {row[k]:.1f} s" for k in row if k.endswith("_seconds"))
        print(f"length {length} seed {seed}: {row['tokens']} tokens, {row['units']} units; "
              + ", ".join(f"{m} top-1 {row[m]['top1']:.0f} rho {row[m]['spearman_loo']:.2f}" for m in methods)
              + f"; {times}", flush=True)
    out["summary"], out["task"] = summary(out["rows"], methods), task_summary(out["rows"])
    Path(args.json).write_text(json.dumps(out, indent=1))
    tables(args.json, args.guide)


if __name__ == "__main__":
    main()
