"""A head-ranking study in one call: every lens_alti ranking against every intervention.

`head_ranking_study(model, tokens, correct, wrong, corrupted_tokens=...)` explains the logit
difference `correct − wrong` at the last position of each prompt and ranks the heads by

- "ALTI head share": `attribute(heads=True).head_outputs` at the explained position (mixing);
- "|ALTI-Logit head total|": |direct logit attribution| of each head (`logit_attribution`);
- "routes (logit)" / "routes (proximity)": head importance in the information-flow routes
  graph, with and without logit weighting (`routes`), which credits heads acting through
  later heads;
- the attention-weight baselines of `compare.attention_head_scores`;

(each a mean over prompts; signed scores are taken in absolute value per prompt, as the
truths are), and compares them with |zero / mean ablation effect| and, given corrupted
prompts, |activation-patching effect| (total) and |direct-effect patching| (docs/spec.md §11) in
one `compare.head_ranking_table`, whose `matched` rows pair each ranking with the truth of its
kind: |ALTI-Logit head total| with direct-effect patching, routes with total effects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import lens_alti
from lens_alti.analysis import ablation, compare, patching
from lens_alti.api.inputs import token_ids
from lens_alti.errors import InvalidArgumentError
from lens_alti.validation import check_choice


@dataclass
class HeadRankingStudy:
    """Rankings and truths (`[layer, head]` tensors, higher = more important), the comparison
    `table` (see `compare.head_ranking_table`) and the objects they came from."""

    rankings: dict[str, Tensor]
    truths: dict[str, Tensor]
    table: Any
    attribution: Any
    result: Any
    clean_metric: float
    ablations: dict[str, Any] = field(default_factory=dict)
    patching: Any = None
    routes: dict[str, list[Any]] = field(default_factory=dict)

    def misses(self, ranking: str, truth: str, k: int = 10) -> Any:
        """The truth's top-k heads and where `ranking` puts them (rank 1 = first), with both scores."""
        import pandas as pd

        if ranking not in self.rankings or truth not in self.truths:
            which, value, have = ("ranking", ranking, self.rankings) if ranking not in self.rankings else (
                "truth", truth, self.truths
            )
            raise InvalidArgumentError(which, value, "one of " + ", ".join(map(repr, have)))
        r, t = self.rankings[ranking], self.truths[truth]
        n_heads = r.shape[1]
        rank_of = torch.empty(r.numel(), dtype=torch.long)
        rank_of[torch.sort(r.flatten(), descending=True, stable=True).indices] = torch.arange(1, r.numel() + 1)
        top = torch.sort(t.flatten(), descending=True, stable=True).indices[:k]
        return pd.DataFrame(
            [
                {
                    "head": f"L{int(i) // n_heads}H{int(i) % n_heads}",
                    truth: float(t.flatten()[i]),
                    f"rank by {ranking}": int(rank_of[i]),
                    ranking: float(r.flatten()[i]),
                }
                for i in top
            ]
        )


def _ids(model: Any, ids: Sequence[int] | Tensor | Sequence[str], n: int, what: str) -> Tensor:
    if isinstance(ids, (str, int)) or len(ids) != n:
        raise InvalidArgumentError(what, ids, f"one token id or one-token string per prompt ({n})")
    return token_ids(model, ids, n, what, int(model.cfg.d_vocab)).cpu()


def head_ranking_study(
    model: Any,
    tokens: Tensor,
    correct: Sequence[int] | Tensor | Sequence[str],
    wrong: Sequence[int] | Tensor | Sequence[str],
    *,
    corrupted_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    ablations: Sequence[str] = ("zero", "mean"),
    routes: Sequence[str] = ("logit", "proximity"),
    threshold: float = 0.04,
    ks: Sequence[int] = (10, 20),
    result: Any = None,
    progress: bool = False,
) -> HeadRankingStudy:
    """Rank heads by each method and compare with ablation and patching (see the module docstring).

    `tokens`: `[batch, pos]` prompts, left-padded with `attention_mask`; the explained position
    is each prompt's last token. `correct` / `wrong`: one token id (or one-token string) per
    prompt; the metric is the logit difference correct − wrong. `corrupted_tokens`: prompts
    aligned with `tokens` for activation patching (e.g. IOI ABC corruption); None skips patching.
    `routes`: which routes weightings to rank by ("logit", "proximity"; empty skips routes —
    they are built per prompt and cost the most). `result`: an `attribute(heads=True)` result of
    these prompts, to reuse (else computed here).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise InvalidArgumentError("tokens", f"shape {tuple(tokens.shape)}", "[batch, pos] token ids")
    for i, weighting in enumerate(routes):
        check_choice(f"routes[{i}]", weighting, ("logit", "proximity"))
    b = tokens.shape[0]
    c, w = _ids(model, correct, b, "correct"), _ids(model, wrong, b, "wrong")
    metric = ablation.logit_diff(c, w)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, **kwargs)
    if result is None:
        result = lens_alti.attribute(cache, heads=True, tokens=tokens, attention_mask=attention_mask)
    elif result.head_outputs is None or result.head_outputs.shape[0] != tokens.shape[0]:
        raise InvalidArgumentError("result", result, "attribute(cache, heads=True) of these same prompts")
    labels = result.str_tokens  # label with the model's own token strings, as `attribute` does
    attr = lens_alti.logit_attribution(cache, c, w, attention_mask=attention_mask, tokens=labels)
    rankings: dict[str, Tensor] = {
        "ALTI head share": result.head_outputs[:, :, :, -1].double().mean(0).cpu(),
        "|ALTI-Logit head total|": attr.head_totals.double().abs().mean(0).cpu(),
    }
    built: dict[str, list[Any]] = {}
    for weighting in routes:
        graphs = []
        items: Any = range(b)
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc=f"routes ({weighting})", unit="prompt")
        for i in items:
            target = (int(c[i]), int(w[i])) if weighting == "logit" else (None, None)
            graphs.append(
                lens_alti.routes(
                    cache, -1, threshold=threshold, target=target[0], contrast=target[1], batch=i,
                    attention_mask=attention_mask, tokens=labels, progress=False,
                )
            )
        built[weighting] = graphs
        rankings[f"routes ({weighting})"] = torch.stack([g.head_importance.double().cpu() for g in graphs]).mean(0)
    rankings.update(compare.attention_head_scores(cache, attention_mask=attention_mask))
    truths: dict[str, Tensor] = {}
    done: dict[str, Any] = {}
    for kind in ablations:
        table = ablation.head_ablation(
            model, tokens, metric, attention_mask=attention_mask, result=result, ablation=kind, progress=progress
        )
        done[kind] = table
        truths[f"|{kind} ablation|"] = compare.head_scores(table.table, "abs_effect")
    patched = None
    if corrupted_tokens is not None:
        patched = patching.head_patching(
            model, tokens, corrupted_tokens, metric, attention_mask=attention_mask, corrupted_mask=attention_mask,
            progress=progress,
        )
        truths["|patching|"] = patched.effects("abs_effect")
        truths["|direct patching|"] = patched.effects("abs_direct_effect")
    if not truths:
        raise InvalidArgumentError(
            "ablations", ablations, "at least one ablation ('zero', 'mean') or corrupted_tokens (nothing to compare)"
        )
    table = compare.head_ranking_table(rankings, truths, ks=ks)
    return HeadRankingStudy(
        rankings, truths, table, attr, result, float(metric(logits).mean()), done, patched, built
    )
