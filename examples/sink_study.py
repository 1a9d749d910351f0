"""Held-out evaluation of explanations with the attention sink set aside (docs/spec.md §10).

    python examples/sink_study.py --model smollm2 --dev --json examples/sink_study_smollm2.json
    python examples/sink_study.py --model gemma3 --json examples/sink_study_gemma3.json
    python examples/sink_study.py --model smollm2 --direct --json examples/sink_study_direct.json
    python examples/sink_study.py --model gemma3 --sources --json examples/sink_study_sources_gemma3.json
    python examples/sink_study.py --model smollm2 --sources --json examples/sink_study_sources_smollm2.json
    python examples/sink_study.py --table docs/guides/sink-study-results.md examples/sink_study_smollm2.json \
        examples/sink_study_gemma3.json examples/sink_study_sources_*.json examples/sink_study_direct.json

Per model:

1. **Held-out IOI.** Names, places, objects and sentence frames written here, none of them in
   `lens_alti.analysis.ioi` (the project's own prompts), both name orders (ABB and BAB). For each
   prompt, contrastive ALTI-Logit (IO − S) and the library's own `top_tokens` (sinks left out):
   the IO name's rank, over the prompts whose top-1 prediction is the IO name; the sink's share of
   the whole; the same ranks with the sink-as-bias variant (docs/spec.md §10c), and token deletion of both.
2. **Subject–verb agreement and BLiMP-style minimal pairs** (`lens_alti.analysis.agreement`):
   the mean reciprocal rank of the deciding word under contrastive ALTI-Logit, ALTI rollout,
   attention (mean over heads and layers at the explained position) and erasure (the drop of the
   logit difference when the word is deleted), candidates = the real tokens that are neither a
   sink nor the explained position, next to the ALTI-Logit paper's GPT-2 small figures.
3. With `--dev` (SmolLM2): the comparison that chose the sink's treatment (docs/spec.md §10c), on the
   project's own 24 IOI prompts.
4. With `--sources` (alone): the held-out IOI ranks of part 1 read *before* the rollout: each layer's
   update at the source positions it reads (`LogitAttribution.heads` summed over layers and heads),
   to tell the direct reads from the rollout's mixing of positions (candidates: the real tokens
   that are neither a sink nor the explained position, in both rankings).
5. With `--direct` (alone): on the demo's 3 prompts, |ALTI-Logit head total| against each
   head's direct effect under ABC patching (docs/spec.md §11), and why they differ: the direct effect
   is the head total minus what the corrupted head still writes in the same direction, `c`.

Nothing here is tuned: the prompts, names, thresholds and methods were fixed before the numbers
were seen; the script is deterministic. Names that are not one token for a model's tokenizer are
left out for that model (reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.alti.logit import to_input_tokens  # noqa: E402
from lens_alti.alti.rollout import rollout  # noqa: E402
from lens_alti.alti.sinks import sink_bias_layers  # noqa: E402
from lens_alti.analysis import ablation, agreement  # noqa: E402
from lens_alti.analysis.batching import left_padded  # noqa: E402
from lens_alti.analysis.compare import reciprocal_ranks  # noqa: E402

# Held out: none of these names, places, objects or frames is in lens_alti/analysis/ioi.py.
NAMES = ("Robert", "Linda", "Michael", "Susan", "Kevin", "Rachel", "Brian", "Nancy", "Steven", "Karen",
         "George", "Helen", "Frank", "Amy", "Henry", "Julia", "Oscar", "Grace", "Victor", "Diana")
PLACES = ("museum", "restaurant", "airport", "cinema", "bakery", "harbor", "theatre", "farm")
OBJECTS = ("coin", "note", "map", "camera", "sandwich", "pen", "blanket", "cake")
FRAMES = (
    "Later that day {X} and {Y} walked into the {place}, and {S} handed the {obj} to",
    "At the {place}, {X} and {Y} were waiting in line. Then {S} passed the {obj} to",
    "On Sunday {X} and {Y} spent the morning at the {place}. In the end {S} lent the {obj} to",
    "Because {X} and {Y} were hungry at the {place}, {S} brought a {obj} to",
    "Outside the {place}, {X} met {Y}, and soon {S} offered the {obj} to",
    "Yesterday {X} and {Y} visited the {place}, where {S} showed a {obj} to",
)
PAPER_GPT2 = {"sva": {"ALTI-Logit": 0.604, "erasure": 0.410}, "blimp": {"ALTI-Logit": 0.739, "erasure": 0.625}}
CHUNK = 12


def held_out_ioi(model, n: int, seed: int) -> tuple[list[dict], list[str]]:
    """`n` held-out IOI prompts (half ABB, half BAB), names that are one token for this model only."""
    single = [x for x in NAMES if len(model.to_tokens(f" {x}", prepend_bos=False)[0]) == 1]
    rng, out = random.Random(seed), []
    combos = list(itertools.product(FRAMES, range(2)))
    while len(out) < n:
        frame, order = combos[len(out) % len(combos)]
        io, s = rng.sample(single, 2)
        x, y = (io, s) if order == 0 else (s, io)
        text = frame.format(X=x, Y=y, S=s, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
        out.append({"text": text, "io": f" {io}", "s": f" {s}", "order": "ABB" if order == 0 else "BAB"})
    return out, [x for x in NAMES if x not in single]


def bias_tokens(cache, attr, mask) -> torch.Tensor:
    """ALTI-Logit tokens with the sinks treated like a bias (docs/spec.md §10c)."""
    res = lens_alti.attribute(cache, attention_mask=mask)
    ro = rollout(sink_bias_layers(res.layers.double(), attr.sinks))
    heads = attr.heads.double()
    tok = to_input_tokens(heads[:, 0], None)
    for layer in range(1, heads.shape[1]):
        tok = tok + to_input_tokens(heads[:, layer], ro[:, layer - 1])
    tok[torch.arange(len(tok)), attr.position] += attr.embedding.double()
    return tok


def io_rank(attr, b: int, io_pos: int) -> int | None:
    """The IO name's rank in the library's own `top_tokens` (sinks left out), or None if absent."""
    order = [p for p, _, _ in attr.top_tokens(attr.tokens.shape[-1], batch=b)]
    return order.index(io_pos) + 1 if io_pos in order else None


def explained_chunks(model, prompts: list[dict]):
    """Per chunk of `CHUNK` IOI prompts: (prompts, left-padded ids, mask, IO ids, logits, cache, ALTI-Logit IO − S)."""
    for start in range(0, len(prompts), CHUNK):
        part = prompts[start : start + CHUNK]
        tokens, mask = left_padded(model, [p["text"] for p in part])
        io = [model.to_single_token(p["io"]) for p in part]
        s = [model.to_single_token(p["s"]) for p in part]
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        yield part, tokens, mask, io, logits, cache, lens_alti.logit_attribution(
            cache, io, s, attention_mask=mask, tokens=tokens
        )
        del logits, cache  # one chunk's cache alive at a time


def ioi_study(model, n: int, seed: int) -> dict:
    """Part 1: held-out IOI, IO rank by `top_tokens`, the sink's share, the bias variant and deletion."""
    prompts, dropped = held_out_ioi(model, n, seed)
    rows, single, std_scores, bias_scores = [], [], [], []
    for part, tokens, mask, io, logits, cache, attr in explained_chunks(model, prompts):
        bias = bias_tokens(cache, attr, mask)
        for b, p in enumerate(part):
            labels = attr.str_tokens[b]
            io_pos = max(i for i, t in enumerate(labels) if t == p["io"] and mask[b, i])
            variant = attr.tokens.clone()
            variant[b] = bias[b].to(variant.dtype)
            top1 = int(logits[b, -1].argmax())
            rows.append({
                **p, "right": top1 == io[b], "logit_diff": float(attr.logit[b]),
                "sink": float(attr.sink[b]), "sink_positions": attr.sinks[b].nonzero().flatten().tolist(),
                "rank": io_rank(attr, b, io_pos),
                "rank_bias": io_rank(dataclasses.replace(attr, tokens=variant), b, io_pos),
                "top": attr.top_tokens(3, batch=b), "top_with_sink": attr.top_tokens(3, batch=b, include_sink=True),
            })
            real = mask[b].bool()
            single.append(tokens[b, real])
            std_scores.append(attr.tokens[b, real].double())
            bias_scores.append(bias[b, real])
        del cache, logits
    right = [r for r in rows if r["right"]]
    summary = {"prompts": len(rows), "model_right": len(right), "names_not_one_token": dropped}
    for key in ("rank", "rank_bias"):
        ranks = [r[key] for r in right]
        summary[key] = {
            "first": sum(x == 1 for x in ranks) / max(len(ranks), 1),
            "mrr": sum(1 / x for x in ranks if x) / max(len(ranks), 1),
        }
    total = sum(abs(r["logit_diff"]) for r in rows)
    summary["sink_share_of_logit_diff"] = sum(r["sink"] for r in rows) / total if total else float("nan")
    first_is_sink = [r["top_with_sink"][0][0] in r["sink_positions"] for r in rows]
    summary["sink_first_with_sink_included"] = sum(first_is_sink) / len(rows)
    correct = [model.to_single_token(p["io"]) for p in prompts]
    rep = ablation.token_deletion(model, single, targets=correct,
                                  methods=(), rankings={"standard": std_scores, "sink as bias": bias_scores})
    summary["deletion_auc"] = rep.auc.to_dict("records")
    return {"summary": summary, "prompts": rows}


def erasure(model, tokens: torch.Tensor, correct: int, wrong: int) -> torch.Tensor:
    """Drop of the logit difference at the last position when each token is deleted (the last: 0)."""
    with torch.no_grad():
        full = model(tokens[None])[0, -1]
        base = float(full[correct] - full[wrong])
        out = torch.zeros(len(tokens), dtype=torch.float64)
        for j in range(len(tokens) - 1):
            keep = torch.ones(len(tokens), dtype=torch.bool)
            keep[j] = False
            row = model(tokens[keep][None])[0, -1]
            out[j] = base - float(row[correct] - row[wrong])
    return out


def task_study(model, items: list) -> dict:
    """Part 2: MRR of the deciding word under ALTI-Logit, ALTI rollout, attention and erasure."""
    usable, skipped = [], []
    for it in items:
        ok = all(len(model.to_tokens(w, prepend_bos=False)[0]) == 1 for w in (it.correct, it.wrong))
        (usable if ok else skipped).append(it)
    per_item = []
    for it in usable:
        tokens = model.to_tokens(it.text)
        c, w = model.to_single_token(it.correct), model.to_single_token(it.wrong)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        attr = lens_alti.logit_attribution(cache, c, w, tokens=tokens)
        res = lens_alti.attribute(cache, tokens=tokens)
        att = lens_alti.attribute(cache, measure="attention")
        n = tokens.shape[1]
        scores = {
            "ALTI-Logit": attr.tokens[0].double(),
            "ALTI rollout": res.rollout[0, -1, n - 1].double(),
            "attention": att.layers[0, :, n - 1].double().mean(0),
            "erasure": erasure(model, tokens[0], c, w),
        }
        cand = ~res.sinks[0].cpu()
        cand[n - 1] = False
        cue = agreement.cue_position(model, it)
        rr = {k: float(reciprocal_ranks(v[None], [cue], candidates=cand[None])[0]) for k, v in scores.items()}
        per_item.append({"text": it.text, "task": it.task, "right": float(attr.logit[0]) > 0, "rr": rr})
    out: dict = {"skipped_not_one_token": [it.text for it in skipped], "mrr": {}}
    groups = {"sva": ["sva"], "blimp": ["anaphor_gender", "anaphor_number", "determiner_noun"]}
    groups.update({t: [t] for t in groups["blimp"]})
    for name, tasks in groups.items():
        for subset in ("all", "model right"):
            sel = [r for r in per_item if r["task"] in tasks and (subset == "all" or r["right"])]
            if sel:
                out["mrr"][f"{name}, {subset}"] = {
                    "n": len(sel), **{k: sum(r["rr"][k] for r in sel) / len(sel) for k in sel[0]["rr"]}
                }
    out["items"] = per_item
    return out


def dev_study(model) -> dict:
    """Part 3 (docs/spec.md §10c): standard vs sink-as-bias on the project's own 24 IOI prompts."""
    from lens_alti.analysis.ioi import ioi_prompts, name_positions

    prompts = ioi_prompts(24)
    tokens, mask = left_padded(model, [p.text for p in prompts])
    io = [model.to_single_token(p.correct) for p in prompts]
    s = [model.to_single_token(p.wrong) for p in prompts]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    attr = lens_alti.logit_attribution(cache, io, s, attention_mask=mask, tokens=tokens)
    bias = bias_tokens(cache, attr, mask)
    answer = torch.tensor([name_positions(attr.str_tokens[b], p)["IO"] for b, p in enumerate(prompts)])
    cand = mask.bool() & ~attr.sinks.cpu()
    out: dict = {}
    for name, scores in (("standard", attr.tokens), ("sink as bias", bias)):
        rr = reciprocal_ranks(scores, answer, candidates=cand)
        out[name] = {"mrr": float(rr.mean()), "first": float((rr == 1).double().mean())}
    single = [tokens[b, mask[b].bool()] for b in range(len(prompts))]
    rep = ablation.token_deletion(model, single, targets=io, methods=(), rankings={
        "standard": [attr.tokens[b, mask[b].bool()] for b in range(len(prompts))],
        "sink as bias": [bias[b, mask[b].bool()] for b in range(len(prompts))],
    })
    out["deletion_auc"] = rep.auc.to_dict("records")
    return out


def source_study(model, n: int, seed: int) -> dict:
    """Part 4: the IO name's rank by ALTI-Logit `tokens` and by the unmapped per-source updates, over the
    held-out prompts the model gets right; how often a miss is won by the token just before the IO name."""
    prompts, _ = held_out_ioi(model, n, seed)
    mapped, unmapped, previous = [], [], 0
    for part, _tokens, mask, io, logits, cache, attr in explained_chunks(model, prompts):
        cand = mask.bool() & ~attr.sinks.cpu()
        cand[:, -1] = False
        pos = torch.tensor([max(i for i, t in enumerate(attr.str_tokens[b]) if t == p["io"] and mask[b, i])
                            for b, p in enumerate(part)])
        a = reciprocal_ranks(attr.tokens, pos, candidates=cand)
        u = reciprocal_ranks(attr.heads.sum((1, 2)), pos, candidates=cand)
        for b in range(len(part)):
            if int(logits[b, -1].argmax()) == io[b]:
                mapped.append(float(a[b]))
                unmapped.append(float(u[b]))
                top = int(torch.where(cand[b], attr.tokens[b].cpu(), float("-inf")).argmax())
                previous += int(a[b] < 1 and top == int(pos[b]) - 1)
        del cache, logits
    k = max(len(mapped), 1)
    return {
        "n": len(mapped), "tokens": {"first": sum(x == 1 for x in mapped) / k, "mrr": sum(mapped) / k},
        "sources": {"first": sum(x == 1 for x in unmapped) / k, "mrr": sum(unmapped) / k},
        "misses": sum(x < 1 for x in mapped), "misses_won_by_the_previous_token": previous,
    }


def direct_study(model) -> dict:
    """Part 5 (docs/spec.md §11): |ALTI-Logit head total| `t` against the direct effect `d` of ABC patching
    (`head_patching(...).per_prompt_direct`) on the demo's prompts. In a pre-norm decoder
    `d = t − c` exactly, `c` being what the head writes on the corrupted prompt read through the clean
    readout direction: `c = t − d` says how much of each head's contribution survives the corruption."""
    from lens_alti.analysis.ablation import logit_diff, spearman
    from lens_alti.analysis.ioi import abc_corruption, ioi_prompts
    from lens_alti.analysis.patching import head_patching

    prompts = ioi_prompts(3)
    tokens, mask = left_padded(model, [p.text for p in prompts])
    corrupted, _ = left_padded(model, abc_corruption(prompts))
    io = [model.to_single_token(p.correct) for p in prompts]
    s = [model.to_single_token(p.wrong) for p in prompts]
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, attention_mask=mask)
    t = lens_alti.logit_attribution(clean, io, s, attention_mask=mask).head_totals.double().cpu()  # [b, l, h]
    patched = head_patching(model, tokens, corrupted, logit_diff(io, s), attention_mask=mask,
                            corrupted_mask=mask, progress=True)
    d = patched.per_prompt_direct.permute(2, 0, 1)  # [b, l, h]
    T, D, C = t.abs().mean(0).flatten(), d.abs().mean(0).flatten(), (t - d).abs().mean(0).flatten()
    big = (T >= 0.05) | (D >= 0.05)
    top_t, top_d = set(T.argsort(descending=True)[:10].tolist()), set(D.argsort(descending=True)[:10].tolist())
    return {
        "spearman_all": spearman(T, D), "top10_overlap": len(top_t & top_d),
        "heads": T.numel(), "heads_keeping_half": int((C >= 0.5 * T).sum()),
        "heads_over_0.05": int(big.sum()), "spearman_over_0.05": spearman(T[big], D[big]),
        "spearman_rest": spearman(T[~big], D[~big]), "share_of_sum_t_over_0.05": float(T[big].sum() / T.sum()),
    }


def markdown(paths: list[str]) -> str:
    """The results of one or more runs as the markdown page of docs/guides."""
    runs = [json.load(open(p)) for p in paths]
    lines = ["# Sink study: results", "",
             "Written by `examples/sink_study.py` (see its docstring for the commands); do not edit by hand.", "",
             "## Held-out IOI: the IO name's rank in `top_tokens` (sink left out)", "",
             "| model | prompts | model right | IO first | MRR | sink's share of the logit difference "
             "| sink first if included | IO first, sink as bias | MRR, sink as bias |",
             "|---|---|---|---|---|---|---|---|---|"]
    studies = [r for r in runs if "ioi" in r]
    for r in studies:
        s = r["ioi"]["summary"]
        lines.append(
            f"| {r['model']} | {s['prompts']} | {s['model_right']} | {s['rank']['first']:.1%} | {s['rank']['mrr']:.3f} "
            f"| {s['sink_share_of_logit_diff']:.1%} | {s['sink_first_with_sink_included']:.1%} "
            f"| {s['rank_bias']['first']:.1%} | {s['rank_bias']['mrr']:.3f} |"
        )
    lines += ["", "Token deletion of the IO name's probability (AUC over k = 1..4; comprehensiveness higher is "
              "better, sufficiency lower is better):", "", "| model | ranking | comprehensiveness | sufficiency |",
              "|---|---|---|---|"]
    for r in studies:
        for row in r["ioi"]["summary"]["deletion_auc"]:
            lines.append(
                f"| {r['model']} | {row['method']} | {row['comprehensiveness']:.4f} | {row['sufficiency']:.4f} |"
            )
    lines += ["", "## Subject–verb agreement and minimal pairs: MRR of the deciding word", "",
              "| model | set | n | ALTI-Logit | ALTI rollout | attention | erasure |", "|---|---|---|---|---|---|---|"]
    for r in studies:
        for name, m in r["tasks"]["mrr"].items():
            lines.append(f"| {r['model']} | {name} | {m['n']} | {m['ALTI-Logit']:.3f} | {m['ALTI rollout']:.3f} "
                         f"| {m['attention']:.3f} | {m['erasure']:.3f} |")
    for name, m in PAPER_GPT2.items():
        paper = "GPT-2 small (Ferrando et al. 2023)"
        lines.append(f"| {paper} | {name} | | {m['ALTI-Logit']:.3f} | | | {m['erasure']:.3f} |")
    sources = [r for r in runs if r.get("sources")]
    if sources:
        lines += ["", "## Held-out IOI before the rollout: the IO name's rank by the direct reads", "",
                  "Over the prompts the model gets right; candidates: real tokens, neither a sink nor the explained "
                  "position. `tokens`: ALTI-Logit mapped to the input through the rollout; `sources`: each layer's "
                  "update at the positions it reads, summed (`LogitAttribution.heads`).", "",
                  "| model | n | IO first (tokens) | MRR (tokens) | IO first (sources) | MRR (sources) "
                  "| misses won by the token before the IO name |", "|---|---|---|---|---|---|---|"]
        for r in sources:
            x = r["sources"]
            lines.append(
                f"| {r['model']} | {x['n']} | {x['tokens']['first']:.1%} | {x['tokens']['mrr']:.3f} "
                f"| {x['sources']['first']:.1%} | {x['sources']['mrr']:.3f} "
                f"| {x['misses_won_by_the_previous_token']} of {x['misses']} |"
            )
    direct = next((r for r in runs if r.get("direct")), None)
    if direct:
        d = direct["direct"]
        share = f"{d['share_of_sum_t_over_0.05']:.0%}"
        lines += [
            "", f"## |ALTI-Logit head total| against direct-effect patching ({direct['model']}, the demo's 3 prompts)",
            "", "| heads | Spearman | top-10 overlap |", "|---|---|---|",
            f"| all {d['heads']} | {d['spearman_all']:.3f} | {d['top10_overlap']}/10 |",
            f"| the {d['heads_over_0.05']} with \\|t\\| or \\|d\\| ≥ 0.05 ({share} of Σ\\|t\\|) "
            f"| {d['spearman_over_0.05']:.3f} | |",
            f"| the other {d['heads'] - d['heads_over_0.05']} | {d['spearman_rest']:.3f} | |",
            "", f"In {d['heads_keeping_half']} of {d['heads']} heads the corrupted prompt's write, read through "
            "the same direction, keeps at least half of the head's clean contribution: the direct effect "
            "(clean − corrupted) is then a small difference of two similar numbers.",
        ]
    dev = next((r["dev"] for r in runs if r.get("dev")), None)
    if dev:
        lines += ["", "## The choice of the sink's treatment (docs/spec.md §10c), on the project's 24 IOI prompts", "",
                  "| treatment | IO MRR | IO first |", "|---|---|---|"]
        lines += [f"| {k} | {v['mrr']:.3f} | {v['first']:.1%} |" for k, v in dev.items() if k != "deletion_auc"]
        lines += ["", "| treatment | comprehensiveness | sufficiency |", "|---|---|---|"]
        lines += [f"| {row['method']} | {row['comprehensiveness']:.4f} | {row['sufficiency']:.4f} |"
                  for row in dev["deletion_auc"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="smollm2 or gemma3 (lens_alti.models.pretrained)")
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev", action="store_true", help="also the comparison of docs/spec.md §10c (project prompts)")
    ap.add_argument("--direct", action="store_true", help="only part 5 (docs/spec.md §11), on the demo's prompts")
    ap.add_argument("--sources", action="store_true", help="only part 4: IOI ranks before the rollout")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--table", nargs="+", metavar=("OUT", "JSON"), help="no model run: write OUT from the JSONs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.table:
        with open(args.table[0], "w") as f:
            f.write(markdown(args.table[1:]))
        return
    torch.set_num_threads(args.threads)
    from lens_alti.models.pretrained import load_pretrained

    t0 = time.perf_counter()
    model = load_pretrained(args.model)
    out: dict = {"model": args.model, "seconds": {}}
    if args.direct or args.sources:
        key = "direct" if args.direct else "sources"
        out[key] = direct_study(model) if args.direct else source_study(model, args.prompts, args.seed)
        print(json.dumps(out[key], indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    out["ioi"] = ioi_study(model, args.prompts, args.seed)
    out["seconds"]["ioi"] = time.perf_counter() - t0
    print(json.dumps(out["ioi"]["summary"], indent=1))
    items = agreement.subject_verb_agreement(seed=args.seed) + agreement.minimal_pairs(seed=args.seed)
    out["tasks"] = task_study(model, items)
    out["seconds"]["tasks"] = time.perf_counter() - t0 - out["seconds"]["ioi"]
    print(json.dumps(out["tasks"]["mrr"], indent=1))
    if args.dev:
        out["dev"] = dev_study(model)
        print(json.dumps(out["dev"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
