"""Do head rankings agree with interventions? One comparison table per study.

A head ranking is a `[layer, head]` tensor of scores, higher = more important (ALTI head
share, |ALTI-Logit head total|, routes head importance, attention-weight baselines). The
ground truths are `[layer, head]` tensors of |ablation effect| and |patching effect|
(`lens_alti.analysis.ablation.head_ablation`, `lens_alti.analysis.patching.head_patching`).

`head_ranking_table` compares every ranking with every truth: Spearman's rho and Kendall's
tau-b (rank correlations, ties averaged) and the top-k overlap (how many of the k heads that
the truth ranks highest the ranking also puts in its top k), over all heads and over the
heads of the second half of the layers (where a task's output heads usually sit). Each ranking
and truth has a *kind* (docs/spec.md §11): "direct" (a head's own effect on the logit:
|ALTI-Logit head total|, direct-effect patching), "total" (through every later layer: routes,
ablation, total-effect patching), "mixing" (ALTI head share) or "attention"; a row whose ranking
and truth are of one kind is a *matched* pair, the comparison that tests the ranking's claim.

Token level: `reciprocal_ranks` gives the reciprocal rank of a chosen input token (e.g. the
IOI indirect-object name) under a per-token attribution; its mean is the MRR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_alti.analysis.ablation import kendall, spearman
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, MissingHooksError, OutOfRangeError
from lens_alti.reading.hooks import pattern_hook


def _as_scores(name: str, x: Any) -> Tensor:
    t = torch.as_tensor(x).detach().double().cpu()
    if t.ndim != 2:
        raise InvalidArgumentError(name, f"shape {tuple(t.shape)}", "a [layer, head] tensor of head scores")
    if not torch.isfinite(t).all():
        raise InvalidArgumentError(name, "scores with NaN or Inf", "a finite score for every head (rank correlations)")
    return t


def top_k_indices(scores: Tensor, k: int) -> set[int]:
    """Flat indices of the k highest scores (ties broken by position, first wins)."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    return set(order[:k].tolist())


def top_k_overlap(scores: Tensor, truth: Tensor, k: int) -> float:
    """How many of the `k` heads ranked highest by `truth` are among the `k` highest `scores`.

    NaN when there are no more than `k` heads (the overlap would be `k` whatever the scores)."""
    if scores.numel() <= k:
        return float("nan")
    return float(len(top_k_indices(scores, k) & top_k_indices(truth, k)))


def rank_agreement(scores: Tensor, truth: Tensor, *, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Spearman, Kendall and top-k overlaps between two equally shaped score tensors."""
    s, t = scores.double().flatten(), truth.double().flatten()
    if s.shape != t.shape:
        raise InvalidArgumentError("truth", f"{t.numel()} heads", f"as many heads as scores ({s.numel()})")
    out = {"spearman": spearman(s, t), "kendall": kendall(s, t)}
    for k in ks:
        out[f"top{k}"] = top_k_overlap(s, t, k)
    return out


KINDS: dict[str, str] = {
    "|ALTI-Logit head total|": "direct",
    "|direct patching|": "direct",
    "routes (logit)": "total",
    "routes (proximity)": "total",
    "|patching|": "total",
    "|zero ablation|": "total",
    "|mean ablation|": "total",
    "ALTI head share": "mixing",
    "attention off the first token": "attention",
    "max attention (not first)": "attention",
}


def head_ranking_table(
    rankings: Mapping[str, Any],
    truths: Mapping[str, Any],
    *,
    ks: Sequence[int] = (10, 20),
    late_from: int | None = None,
    kinds: Mapping[str, str] | None = None,
) -> Any:
    """One row per (truth, ranking, head set): Spearman, Kendall and top-k overlaps.

    `rankings`, `truths`: name → `[layer, head]` scores (higher = more important; pass
    absolute values where the sign is not importance). Head sets: all heads, and the heads
    of layers ≥ `late_from` (default: the second half, `n_layers // 2`). `kinds`: name → kind
    ("direct", "total", ...) for names that `KINDS` does not know. Returns a pandas DataFrame
    with columns truth, truth kind, ranking, ranking kind, matched (both kinds known and equal),
    heads, n, spearman, kendall, top{k}...
    """
    import pandas as pd

    if not rankings or not truths:
        which, value = ("rankings", rankings) if not rankings else ("truths", truths)
        raise InvalidArgumentError(which, value, "at least one ranking and one truth")
    truth_t = {name: _as_scores(f"truth {name!r}", x) for name, x in truths.items()}
    rank_t = {name: _as_scores(f"ranking {name!r}", x) for name, x in rankings.items()}
    shape = next(iter(truth_t.values())).shape
    labelled = {**{f"truth {k!r}": v for k, v in truth_t.items()}, **{f"ranking {k!r}": v for k, v in rank_t.items()}}
    for name, t in labelled.items():
        if t.shape != shape:
            raise InvalidArgumentError(name, f"shape {tuple(t.shape)}", f"the others' [layer, head] = {tuple(shape)}")
    n_layers = shape[0]
    late = n_layers // 2 if late_from is None else int(late_from)
    if not 0 <= late < n_layers:
        raise OutOfRangeError("late_from", late_from, f"a layer in 0..{n_layers - 1}")
    kind = {**KINDS, **(kinds or {})}
    rows = []
    for tname, truth in truth_t.items():
        for rname, scores in rank_t.items():
            sets = ((f"all {n_layers} layers", slice(None)), (f"layers {late}-{n_layers - 1}", slice(late, None)))
            tk, rk = kind.get(tname, ""), kind.get(rname, "")
            for label, sl in sets:
                row = {
                    "truth": tname, "truth kind": tk, "ranking": rname, "ranking kind": rk,
                    "matched": bool(tk) and tk == rk, "heads": label, "n": scores[sl].numel(),
                }
                row.update(rank_agreement(scores[sl], truth[sl], ks=ks))
                rows.append(row)
    return pd.DataFrame(rows)


def head_scores(table: Any, column: str) -> Float[Tensor, "layer head"]:
    """One column of a per-head table (columns `layer`, `head`, ...) as a `[layer, head]` tensor."""
    if column not in table.columns or "layer" not in table.columns or "head" not in table.columns:
        raise InvalidArgumentError(
            "column", column, f"a column of a table that also has 'layer' and 'head' (it has {list(table.columns)})"
        )
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    out = torch.full((n_layers, n_heads), float("nan"), dtype=torch.float64)
    layers = torch.tensor(table["layer"].to_numpy().tolist())
    heads = torch.tensor(table["head"].to_numpy().tolist())
    out[layers, heads] = torch.tensor(table[column].to_numpy().tolist(), dtype=torch.float64)
    return out


def _query_index(mask: Bool[Tensor, "batch pos"], position: int) -> Int[Tensor, " batch"]:
    """The explained position of each prompt: `position`-th real token (negative counts from the end)."""
    idx = []
    for row in mask:
        real = torch.nonzero(row).flatten()
        if not -len(real) <= position < len(real):
            raise OutOfRangeError("position", position, f"a position within every prompt's {len(real)} real tokens")
        idx.append(int(real[position]))
    return torch.tensor(idx)


@torch.no_grad()
def attention_head_scores(
    cache: Any, *, position: int = -1, attention_mask: Tensor | None = None
) -> dict[str, Float[Tensor, "layer head"]]:
    """Attention-weight baselines for ranking heads, means over prompts, at the explained position:

    - "attention off the first token": 1 − the attention weight on the first real token
      (BOS, the usual attention sink), i.e. how much the head attends to content;
    - "max attention (not first)": the largest attention weight on any other real token.

    Reads `blocks.{l}.attn.hook_pattern` `[batch, head, query, key]` from a decoder-only cache.
    """
    model = getattr(cache, "model", None)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if n_layers is None:
        raise ArgumentTypeError("cache", cache, "the ActivationCache of a TransformerLens model")
    names = [pattern_hook(layer) for layer in range(n_layers)]
    missing = [n for n in names if n not in cache.keys()]
    if missing:
        raise MissingHooksError(missing, "attention_head_scores reads every layer's attention pattern.")
    patterns = torch.stack([cache[n].float().cpu() for n in names], dim=1)  # [batch, layer, head, q, k]
    batch, pos = patterns.shape[0], patterns.shape[-1]
    mask = torch.ones(batch, pos, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if mask.shape != (batch, pos):
        raise InvalidArgumentError("attention_mask", f"shape {tuple(mask.shape)}", f"the cache's [{batch}, {pos}]")
    q = _query_index(mask, position)
    first = mask.float().argmax(-1)
    rows = patterns[torch.arange(batch), :, :, q]  # [batch, layer, head, key]
    keys = mask.clone()
    keys[torch.arange(batch), first] = False
    off_first = 1 - rows[torch.arange(batch), :, :, first]
    max_other = rows.masked_fill(~keys[:, None, None, :], 0).amax(-1)
    return {
        "attention off the first token": off_first.mean(0).double(),
        "max attention (not first)": max_other.mean(0).double(),
    }


def reciprocal_ranks(
    scores: Float[Tensor, "batch pos"],
    answer: Int[Tensor, " batch"] | Sequence[int],
    *,
    candidates: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " batch"]:
    """1 / rank of position `answer[b]` among the `candidates` of prompt b, by descending score.

    Ties count against the answer (rank = 1 + the number of other candidates scoring at
    least as high), so a constant attribution never scores well. `candidates`: the positions
    that compete (default: all); the answer must be one of them. The MRR is the mean.
    """
    s = torch.as_tensor(scores).double().cpu()
    a = torch.as_tensor(answer).long().cpu()
    if s.ndim != 2:
        raise InvalidArgumentError("scores", f"shape {tuple(s.shape)}", "a [batch, pos] tensor")
    if a.shape != (s.shape[0],):
        raise InvalidArgumentError("answer", f"shape {tuple(a.shape)}", f"one position per prompt, [{s.shape[0]}]")
    cand = torch.ones_like(s, dtype=torch.bool) if candidates is None else torch.as_tensor(candidates).bool().cpu()
    if cand.shape != s.shape:
        raise InvalidArgumentError("candidates", f"shape {tuple(cand.shape)}", f"the shape of scores, {tuple(s.shape)}")
    rows = torch.arange(s.shape[0])
    if not ((0 <= a) & (a < s.shape[1])).all() or not cand[rows, a].all():
        raise OutOfRangeError("answer", a.tolist(), "one of the candidate positions of each prompt")
    own = s[rows, a]
    at_least = ((s >= own[:, None]) & cand).sum(-1) - 1  # the other candidates scoring ≥ the answer
    return 1.0 / (1 + at_least).double()
