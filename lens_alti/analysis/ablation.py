"""Does ablating what ALTI calls important change the model's behaviour?

Three comparisons between ALTI and interventions run through TransformerLens hooks:
- `head_ablation`: ablate each head (zero or mean) and compare the metric change with
  ALTI's head contributions, with Spearman and Kendall rank correlations;
- `circuit_comparison`: ablate a set of heads, recompute ALTI, report what moved;
- `token_deletion`: delete the tokens ALTI rollout ranks highest / lowest (against
  attention rollout and random rankings): comprehensiveness, sufficiency and AUC.

Metrics map logits `[batch, pos, vocab]` to one number per prompt `[batch]`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import lens_alti
from lens_alti.analysis.checks import (
    check_metric,
    check_model,
    check_prompt_tokens,
    check_receiver,
    estimate_ablation_memory,
    model_dims,
    pattern_edits_ignored,
)
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, UnsupportedModelError
from lens_alti.reading.cache import with_heads_switched_off
from lens_alti.reading.hooks import AttentionPoint, attention_hook
from lens_alti.results import AltiResult
from lens_alti.validation import (
    check_choice,
    check_heads,
    check_index,
    check_int,
    check_position,
    check_size,
    check_token_ids,
)

Metric = Callable[[Tensor], Tensor]


def logit_diff(correct: Sequence[int] | Tensor, wrong: Sequence[int] | Tensor, position: int = -1) -> Metric:
    """logit[correct] − logit[wrong] at `position`, one token id pair per prompt."""
    c, w = check_token_ids("correct", correct), check_token_ids("wrong", wrong, count=len(correct))
    check_int("position", position)

    def metric(logits: Tensor) -> Tensor:
        _check_ids(logits, position, correct=c, wrong=w)
        row = logits[:, position].float()
        idx = torch.arange(row.shape[0], device=row.device)
        return row[idx, c.to(row.device)] - row[idx, w.to(row.device)]

    return metric


def logprob(target: Sequence[int] | Tensor, position: int = -1) -> Metric:
    """log p(target) at `position`, one token id per prompt."""
    t = check_token_ids("target", target)
    check_int("position", position)

    def metric(logits: Tensor) -> Tensor:
        _check_ids(logits, position, target=t)
        lp = logits[:, position].float().log_softmax(-1)
        return lp[torch.arange(lp.shape[0], device=lp.device), t.to(lp.device)]

    return metric


def kl_to_clean(clean_logits: Tensor, position: int = -1) -> Metric:
    """KL(clean ‖ intervened) of the next-token distribution at `position` (0 on the clean run)."""
    if not isinstance(clean_logits, Tensor) or clean_logits.dim() != 3:
        raise InvalidArgumentError("clean_logits", clean_logits, "logits [batch, pos, vocab]")
    clean = clean_logits[:, check_index("position", position, clean_logits.shape[1], what="positions")]
    clean = clean.float().log_softmax(-1)

    def metric(logits: Tensor) -> Tensor:
        if logits.shape[0] != clean.shape[0] or logits.shape[-1] != clean.shape[-1]:
            raise InvalidArgumentError(
                "logits", f"shape {tuple(logits.shape)}", f"[{clean.shape[0]}, pos, {clean.shape[-1]}]"
            )
        lp = logits[:, position].float().log_softmax(-1)
        return (clean.exp() * (clean - lp)).sum(-1)

    return metric


def _check_ids(logits: Tensor, position: int, **ids: Tensor) -> None:
    """Token ids of a metric against the logits it is applied to: one per prompt, inside the vocabulary."""
    check_index("position", position, logits.shape[1], what="positions of the logits")
    for name, t in ids.items():
        check_token_ids(name, t, vocab_size=logits.shape[-1], count=logits.shape[0])


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), as for Spearman's rho."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    rx, ry = _ranks(x.double().flatten()), _ranks(y.double().flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def kendall(x: Tensor, y: Tensor) -> float:
    """Kendall's tau-b (handles ties)."""
    x, y = x.double().flatten(), y.double().flatten()
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    iu = torch.triu_indices(len(x), len(x), 1)
    dx, dy = dx[iu[0], iu[1]], dy[iu[0], iu[1]]
    s = float((dx * dy).sum())
    n0 = float(dx.abs().sum() * dy.abs().sum())
    return s / n0**0.5 if n0 > 0 else float("nan")


def _attn_name(model: Any, layer: int, point: AttentionPoint) -> str:
    """The hook `point` of layer `layer`'s attention; `model` must have `blocks` (decoder-only or encoder)."""
    if not hasattr(model, "blocks"):
        raise InvalidArgumentError("model", model, "a decoder-only or encoder model (with `blocks`)")
    return attention_hook(layer, point)


@dataclass
class HeadAblationTable:
    """Per-head ALTI contribution vs ablation effect.

    `table` (pandas DataFrame): layer, head, alti (mean over prompts of the head's output
    share at the receiver, `AltiResult.head_outputs`), effect (metric(clean) −
    metric(ablated), mean over prompts; positive = the head helps), abs_effect.
    `spearman` / `kendall`: rank correlations between alti and abs_effect.
    """

    table: Any
    spearman: float
    kendall: float
    clean_metric: float
    ablation: str
    result: AltiResult

    def top(self, k: int = 10, by: str = "abs_effect") -> Any:
        return self.table.sort_values(by, ascending=False).head(k)


@torch.no_grad()
def head_ablation(
    model: Any,
    tokens: Tensor,
    metric: Metric,
    *,
    position: int = -1,
    ablation: str = "zero",
    attention_mask: Tensor | None = None,
    result: AltiResult | None = None,
    progress: bool = False,
) -> HeadAblationTable:
    """Ablate every head in turn and compare the metric change with ALTI's head contributions.

    Zero ablation sets the head's `hook_z` to 0; mean ablation to its mean over the
    prompts' real tokens. One forward pass per layer (all heads of the layer batched).
    """
    import pandas as pd

    check_choice("ablation", ablation, ("zero", "mean"))
    check_model(model)
    check_metric(metric)
    tokens, attention_mask = check_prompt_tokens(model, tokens, attention_mask)
    position = check_receiver(position, tokens, attention_mask)
    estimate_ablation_memory(model, tokens, heads=True)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits, cache = model.run_with_cache(tokens, **kwargs)
    if result is None:
        attributed = lens_alti.attribute(cache, heads=True, attention_mask=attention_mask)
        assert isinstance(attributed, AltiResult)  # a decoder-only model's cache
        result = attributed
    if result.head_outputs is None:
        raise InvalidArgumentError("result", result, "a result of lens_alti.attribute(..., heads=True)")
    clean = metric(logits)
    b = tokens.shape[0]
    n_layers, n_heads = result.head_outputs.shape[1:3]
    mask = torch.ones(tokens.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = []
    layers: Any = range(n_layers)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="head ablation", unit="layer")
    for layer in layers:
        name = _attn_name(model, layer, "z")
        if name not in cache.keys():  # a mixer layer (Mamba-2, gated DeltaNet): its heads have no hook_z
            raise UnsupportedModelError(
                f"head_ablation: layer {layer} has no attention hook_z ({name}): it is not an attention layer "
                "(a linear-recurrent mixer), so its heads cannot be ablated by zeroing z. Head ablation covers "
                "models whose every layer is attention"
            )
        z_clean = cache[name]
        m = mask.to(z_clean.device)[..., None, None].to(z_clean.dtype)
        mean_z = (z_clean * m).sum((0, 1)) / m.sum((0, 1)).clamp(min=1)  # [head, d_head]

        def ablate(z: Tensor, hook: Any, mean_z: Tensor = mean_z) -> Tensor:
            z = z.clone().view(n_heads, b, *z.shape[1:])
            for h in range(n_heads):
                z[h, :, :, h] = 0 if ablation == "zero" else mean_z[h]
            return z.view(n_heads * b, *z.shape[2:])

        rep = {"attention_mask": attention_mask.repeat(n_heads, 1)} if attention_mask is not None else {}
        ablated = model.run_with_hooks(tokens.repeat(n_heads, 1), fwd_hooks=[(name, ablate)], **rep)
        values = metric_batched(metric, ablated, n_heads, b)
        for h in range(n_heads):
            effect = clean - values[h]
            alti = result.head_outputs[:, layer, h, position]  # position: checked real in every prompt
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "alti": float(alti.mean()),
                    "effect": float(effect.mean()),
                    "abs_effect": float(effect.abs().mean()),
                }
            )
    table = pd.DataFrame(rows)
    a, e = torch.tensor(table["alti"].values), torch.tensor(table["abs_effect"].values)
    return HeadAblationTable(table, spearman(a, e), kendall(a, e), float(clean.mean()), ablation, result)


def metric_batched(metric: Metric, logits: Tensor, n_heads: int, batch: int) -> Tensor:
    """Apply a per-prompt metric to logits of `n_heads` stacked copies of the batch: `[n_heads, batch]`."""
    return torch.stack([metric(logits[h * batch : (h + 1) * batch]) for h in range(n_heads)])


@dataclass
class CircuitComparison:
    """ALTI and the metric before and after zero-ablating a set of heads.

    `table` (DataFrame): for every layer (and "rollout"), every source token: the
    contribution to the receiver `before`, `after` and `delta`. `metric_before/after`:
    means over prompts. `ablated_through`: "hook_pattern" (the heads' attention set to 0) or
    "hook_z" (their output set to 0, on models that ignore pattern edits; the same run).
    """

    heads: list[tuple[int, int]]
    before: AltiResult
    after: AltiResult
    metric_before: float
    metric_after: float
    table: Any = field(repr=False)
    ablated_through: str = "hook_pattern"

    @property
    def metric_change(self) -> float:
        return self.metric_after - self.metric_before


@torch.no_grad()
def circuit_comparison(
    model: Any,
    tokens: Tensor,
    heads: Sequence[tuple[int, int]],
    *,
    metric: Metric | None = None,
    position: int = -1,
    batch: int = 0,
    attention_mask: Tensor | None = None,
) -> CircuitComparison:
    """Zero-ablate `heads` [(layer, head), ...], recompute ALTI, and report what changed.

    The heads are ablated by zeroing their attention pattern (so their output is 0), which
    keeps the ablated run exactly decomposable: ALTI after ablation passes the same
    reconstruction check as before. A model that ignores edits of `hook_pattern`
    (TransformerLens 4.x's BERT bridge) has the heads' `hook_z` zeroed instead, which is the
    same run; its recorded patterns of those heads are then set to 0 before ALTI reads them
    (`result.ablated_through` says which). The table is for prompt `batch`, receiver `position`.
    """
    import pandas as pd

    check_model(model)
    n_layers, n_heads, _ = model_dims(model)
    heads = check_heads("heads", heads, n_layers, n_heads, allow_empty=True)
    if metric is not None:
        check_metric(metric)
    tokens, attention_mask = check_prompt_tokens(model, tokens, attention_mask)
    batch = check_index("batch", batch, tokens.shape[0], what="prompts")
    estimate_ablation_memory(model, tokens, heads=False)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits, cache = model.run_with_cache(tokens, **kwargs)
    before = lens_alti.attribute(cache, attention_mask=attention_mask, tokens=tokens)
    assert isinstance(before, AltiResult)  # a decoder-only model's cache
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)

    def make_hook(hs: list[int]) -> Callable[[Tensor, Any], Tensor]:
        def hook(pattern: Tensor, hook: Any) -> Tensor:
            pattern = pattern.clone()
            pattern[:, hs] = 0
            return pattern

        return hook

    def zero_z(hs: list[int]) -> Callable[[Tensor, Any], Tensor]:
        def hook(z: Tensor, hook: Any) -> Tensor:
            z = z.clone()
            z[:, :, hs] = 0
            return z

        return hook

    patterns = {_attn_name(model, layer, "pattern"): hs for layer, hs in by_layer.items()}
    z_names = {_attn_name(model, layer, "z"): hs for layer, hs in by_layer.items()}
    with model.hooks(fwd_hooks=[(name, make_hook(hs)) for name, hs in patterns.items()]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hook_pattern returned a modified tensor.*")  # tried below
        logits_after, cache_after = model.run_with_cache(tokens, **kwargs)
    through = "hook_pattern"
    if pattern_edits_ignored(cache, cache_after, z_names):  # e.g. TransformerLens 4.x BERT: zero z instead
        with model.hooks(fwd_hooks=[(name, zero_z(hs)) for name, hs in z_names.items()]):
            logits_after, cache_after = model.run_with_cache(tokens, **kwargs)
        cache_after, through = with_heads_switched_off(cache_after, patterns), "hook_z"
    after = lens_alti.attribute(cache_after, attention_mask=attention_mask, tokens=tokens)
    assert isinstance(after, AltiResult)

    keep = before.attention_mask[batch].bool()
    pos = check_position("position", position, before.attention_mask[batch], where=f"prompt {batch}")
    labels = before.str_tokens[batch] if before.str_tokens else None
    rows = []
    for layer in [*range(before.n_layers), "rollout"]:
        src_b = before.rollout[batch, -1] if layer == "rollout" else before.layers[batch, layer]
        src_a = after.rollout[batch, -1] if layer == "rollout" else after.layers[batch, layer]
        for j in torch.nonzero(keep).flatten().tolist():
            b_val, a_val = float(src_b[pos, j]), float(src_a[pos, j])
            rows.append(
                {
                    "layer": layer,
                    "source": j,
                    "token": labels[j] if labels else str(j),
                    "before": b_val,
                    "after": a_val,
                    "delta": a_val - b_val,
                }
            )
    m_before = float(metric(logits).mean()) if metric else float("nan")
    m_after = float(metric(logits_after).mean()) if metric else float("nan")
    return CircuitComparison(heads, before, after, m_before, m_after, pd.DataFrame(rows), through)


@dataclass
class DeletionReport:
    """Token-deletion faithfulness of rankings (ALTI rollout, attention rollout, random, ALTI-Logit).

    `curves` (DataFrame): method, k, comprehensiveness = p − p(top-k deleted),
    sufficiency = p − p(bottom-k deleted), means over prompts (p: probability of the
    target token at the receiver, the last position). Higher comprehensiveness and lower
    sufficiency mean a more faithful ranking. `auc` (DataFrame): per method, the mean
    over k of each curve (area under the curve with k normalised to [0, 1]).
    """

    curves: Any
    auc: Any


DELETION_METHODS = ("alti", "attention_rollout", "random", "alti_logit", "alti_logit_contrast")


def _scores(
    method: str, model: Any, tokens: Tensor, generator: torch.Generator, target: int = 0, contrast: int | None = None
) -> Tensor:
    """Ranking scores `[pos]` of every input token for the last position.

    "alti_logit": ALTI-Logit of the target's logit (signed: the bottom of the ranking are the
    tokens that push hardest against the target); "alti_logit_contrast": of target − contrast."""
    if method == "random":
        return torch.rand(tokens.shape[-1], generator=generator)
    _, cache = model.run_with_cache(tokens[None])
    if method == "alti":
        res = lens_alti.attribute(cache)
        assert isinstance(res, AltiResult)  # a decoder-only model's cache
        return res.rollout[0, -1, -1].cpu()
    if method == "attention_rollout":
        return lens_alti.attention_rollout(cache)[0, -1, -1].cpu()
    if method in ("alti_logit", "alti_logit_contrast"):
        other = contrast if method == "alti_logit_contrast" else None
        return lens_alti.logit_attribution(cache, target, other, heads=False).tokens[0].cpu()
    raise InvalidArgumentError("methods", method, f"one of {', '.join(map(repr, DELETION_METHODS))}")


def _prob(model: Any, tokens: Tensor, target: int) -> float:
    logits = model(tokens[None])
    return float(logits[0, -1].float().softmax(-1)[target])


@torch.no_grad()
def token_deletion(
    model: Any,
    prompts: Sequence[Tensor],
    *,
    ks: Sequence[int] = (1, 2, 3, 4),
    methods: Sequence[str] = ("alti", "attention_rollout", "random"),
    targets: Sequence[int] | None = None,
    contrasts: Sequence[int] | None = None,
    keep_first: bool = True,
    baseline_token: int | None = None,
    seed: int = 0,
    rankings: Mapping[str, Sequence[Tensor]] | None = None,
) -> DeletionReport:
    """Delete (or replace with `baseline_token`) the top-k / bottom-k ranked input tokens.

    `prompts`: 1-D token tensors; the receiver is each prompt's last token, which is never
    deleted, nor the first (BOS) when `keep_first`. `targets`: token ids whose probability
    is tracked (default: each prompt's clean prediction). `contrasts`: token ids for the
    "alti_logit_contrast" ranking (ALTI-Logit of target − contrast), required by it.
    `rankings`: more rankings to compare, by name: one 1-D score tensor per prompt, as long as it
    (e.g. a variant of a method computed elsewhere); they are reported like the `methods`.
    """
    import pandas as pd

    check_model(model)
    _, _, vocab = model_dims(model)
    if isinstance(prompts, (Tensor, str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InvalidArgumentError("prompts", prompts, "a non-empty list of 1-D token tensors, one per prompt")
    first = 1 if keep_first else 0
    checked = []
    for n, prompt in enumerate(prompts):
        t = check_token_ids(f"prompts[{n}]", prompt, vocab_size=vocab)
        if t.shape[0] < first + 2:
            raise InvalidArgumentError(
                f"prompts[{n}]", f"{t.shape[0]} tokens", f"at least {first + 2} tokens: the receiver (last), "
                f"{'the kept first token, ' if keep_first else ''}and one token to delete"
            )
        checked.append(t)
    ks = [check_size(f"ks[{i}]", k) for i, k in enumerate(ks)]
    if not ks:
        raise InvalidArgumentError("ks", ks, "at least one k ≥ 1")
    methods = [check_choice("methods", m, DELETION_METHODS) for m in methods]
    given = _given_rankings(rankings, checked)
    if targets is not None:
        targets = check_token_ids("targets", targets, vocab_size=vocab, count=len(checked)).tolist()
    if baseline_token is not None:
        baseline_token = int(check_token_ids("baseline_token", [baseline_token], vocab_size=vocab)[0])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, tokens in enumerate(checked):
        target = int(model(tokens[None])[0, -1].argmax()) if targets is None else int(targets[n])
        p = _prob(model, tokens, target)
        candidates = torch.arange(first, tokens.shape[-1] - 1)
        contrast = None if contrasts is None else int(contrasts[n])
        for method in [*methods, *given]:
            if method == "alti_logit_contrast" and contrast is None:
                raise InvalidArgumentError(
                    "contrasts", None, "one token id per prompt: the 'alti_logit_contrast' ranking needs contrasts="
                )
            scores = given[method][n] if method in given else _scores(method, model, tokens, gen, target, contrast)
            order = candidates[scores[candidates].argsort(descending=True)]
            for k in ks:
                if k > len(candidates):
                    continue
                row = {"prompt": n, "method": method, "k": k}
                for name, drop in (("comprehensiveness", order[:k]), ("sufficiency", order[len(order) - k :])):
                    row[name] = p - _prob(model, _delete(tokens, drop, baseline_token), target)
                rows.append(row)
    if not rows:
        raise InvalidArgumentError("ks", ks, "values no larger than the number of deletable tokens of some prompt")
    per_prompt = pd.DataFrame(rows)
    curves = per_prompt.groupby(["method", "k"], sort=False)[["comprehensiveness", "sufficiency"]].mean().reset_index()
    auc = curves.groupby("method", sort=False)[["comprehensiveness", "sufficiency"]].mean().reset_index()
    return DeletionReport(curves, auc)


def _given_rankings(rankings: Mapping[str, Sequence[Tensor]] | None, prompts: list[Tensor]) -> dict[str, list[Tensor]]:
    """`rankings` checked: one finite 1-D score tensor per prompt, as long as the prompt."""
    if rankings is None:
        return {}
    if not isinstance(rankings, Mapping):
        raise ArgumentTypeError("rankings", rankings, "a mapping of names to one 1-D score tensor per prompt")
    out = {}
    for name, scores in rankings.items():
        if name in DELETION_METHODS or isinstance(scores, (Tensor, str)) or len(scores) != len(prompts):
            raise InvalidArgumentError(
                f"rankings[{name!r}]", scores, f"a new name (not one of {DELETION_METHODS}) with one score tensor "
                f"per prompt ({len(prompts)})"
            )
        rows = [torch.as_tensor(s).detach().double().cpu() for s in scores]
        for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
            if row.shape != prompt.shape or not torch.isfinite(row).all():
                raise InvalidArgumentError(
                    f"rankings[{name!r}][{i}]", f"shape {tuple(row.shape)}",
                    f"{prompt.shape[0]} finite scores, one per token",
                )
        out[str(name)] = rows
    return out


def _delete(tokens: Tensor, positions: Tensor, baseline_token: int | None) -> Tensor:
    if baseline_token is not None:
        out = tokens.clone()
        out[positions] = baseline_token
        return out
    keep = torch.ones(tokens.shape[-1], dtype=torch.bool)
    keep[positions] = False
    return tokens[keep]
