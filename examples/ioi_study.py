"""Worked example: ALTI vs interventions on indirect-object prompts, SmolLM2-135M.

    python examples/ioi_study.py --prompts 24 --json ioi.json

Prints (1) where the final position takes its information from (ALTI rollout shares of
the indirect object, the subject's two mentions and the rest), (2) the head-ablation
comparison (zero and mean ablation, Spearman/Kendall between ALTI head share and
|effect| on the logit difference), (3) token-deletion faithfulness (comprehensiveness /
sufficiency AUC of ALTI rollout, attention rollout and random rankings).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402

import lens_alti  # noqa: E402
from lens_alti.analysis import ablation  # noqa: E402
from lens_alti.analysis.ioi import ioi_prompts, left_padded  # noqa: E402
from lens_alti.models.pretrained import load_smollm2  # noqa: E402


def role_shares(result: lens_alti.AltiResult, model, prompts) -> dict[str, float]:
    """Mean rollout share of the last position on: IO name, S1, S2, BOS, everything else."""
    shares = {"indirect object (IO)": [], "subject 1st (S1)": [], "subject 2nd (S2)": [], "BOS": [], "other": []}
    for b, p in enumerate(prompts):
        real = torch.nonzero(result.attention_mask[b]).flatten().tolist()
        row = result.rollout[b, -1, real[-1]]
        toks = [result.str_tokens[b][i] for i in real]
        io = [real[i] for i, t in enumerate(toks) if t == p.correct]
        s = [real[i] for i, t in enumerate(toks) if t == p.wrong]
        named = {"indirect object (IO)": io[:1], "subject 1st (S1)": s[:1], "subject 2nd (S2)": s[1:2], "BOS": real[:1]}
        used = set(sum(named.values(), []))
        for k, idx in named.items():
            shares[k].append(float(row[idx].sum()))
        shares["other"].append(float(row[[i for i in real if i not in used]].sum()))
    return {k: sum(v) / len(v) for k, v in shares.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="save the numbers here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = load_smollm2()
    prompts = ioi_prompts(args.prompts, args.seed)
    tokens, mask = left_padded(model, [p.text for p in prompts])
    correct = [model.to_single_token(p.correct) for p in prompts]
    wrong = [model.to_single_token(p.wrong) for p in prompts]
    metric = ablation.logit_diff(correct, wrong)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    result = lens_alti.attribute(cache, attention_mask=mask, tokens=tokens, heads=True)
    acc = float((logits[:, -1].argmax(-1) == torch.tensor(correct)).float().mean())
    out = {"prompts": len(prompts), "top1_accuracy": acc, "clean_logit_diff": float(metric(logits).mean())}
    print(f"{len(prompts)} prompts; top-1 = IO name for {acc:.0%}; mean logit diff {out['clean_logit_diff']:.3f}")
    out["rollout_shares"] = role_shares(result, model, prompts)
    print("\nALTI rollout of the last position, mean share per role:")
    for k, v in out["rollout_shares"].items():
        print(f"  {k:22s} {v:.3f}")
    out["head_ablation"] = {}
    for kind in ("zero", "mean"):
        table = ablation.head_ablation(
            model, tokens, metric, attention_mask=mask, result=result, ablation=kind, progress=True
        )
        top_effect = table.top(10)
        top_alti = set(map(tuple, table.top(10, by="alti")[["layer", "head"]].values.tolist()))
        overlap = sum(tuple(x) in top_alti for x in top_effect[["layer", "head"]].values.tolist())
        out["head_ablation"][kind] = {
            "spearman": table.spearman,
            "kendall": table.kendall,
            "top10_overlap": overlap,
            "top_by_effect": top_effect.to_dict("records"),
            "top_by_alti": table.top(10, by="alti").to_dict("records"),
        }
        print(
            f"\n{kind} ablation: Spearman {table.spearman:.3f}, Kendall {table.kendall:.3f}, "
            f"top-10 overlap {overlap}/10"
        )
        print(top_effect.to_string(index=False, float_format="{:.3f}".format))
    single = [tokens[b, mask[b].bool()] for b in range(len(prompts))]
    rep = ablation.token_deletion(model, single, ks=(1, 2, 3, 4), targets=correct)
    out["token_deletion_auc"] = rep.auc.to_dict("records")
    print("\ntoken deletion (probability of the IO name), AUC over k = 1..4:")
    print(rep.auc.to_string(index=False, float_format="{:.4f}".format))
    out["seconds"] = time.perf_counter() - t0
    print(f"\n({out['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
