"""Orchestration of `routes` (spec §8): cache or model in, a Routes graph out.

Reads the decoder's attention records and MLP writes (`lens_alti.reading`), hands them to
`lens_alti.alti.routes.build_routes` for the explained item, and assembles the result.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.logit import readout_direction
from lens_alti.api.logit import _labels, _valid, explained_rows, logit_inputs, token_ids


@torch.no_grad()
def routes(
    cache_or_model: Any,
    position: Any = -1,
    *,
    threshold: float = 0.04,
    target: Any = None,
    contrast: Any = None,
    batch: int = 0,
    attention_mask: Tensor | None = None,
    tokens: Any = None,
    logit_mode: str = "direct",
    logit_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Any:
    """Information-flow routes (Ferrando & Voita 2024; spec §8) of one position of one batch item.

    Built top-down from the node (n_layers, position): each reached receiver's parts (every head
    and source, the residual, the MLP) are scored by proximity share (`max(0, ‖y‖₁ − ‖y − part‖₁)`
    normalised over the receiver's parts, spec §3); edges with weight ≥ `threshold` are kept and
    only their sources are expanded, so unreached receivers are never computed. Decoder-only models.

    Args:
        cache_or_model: an ActivationCache or the model with `tokens=`.
        position: the explained position (negative counts from the last real token).
        threshold: edges below this weight are pruned (default 0.04, as in the paper).
        target: with a target (id or one-token string) the graph explains the prediction
            of `target` (minus `contrast`): edges are weighted by positive logit updates (spec §7,
            normalised) instead of proximity where `logit_mode` says.
        contrast: None, or an id / one-token string whose logit is subtracted from `target`'s.
        logit_mode: with a target, "direct" (default): the top node's parts are all direct parts
            of the logit (every head's output at `position` from each source, in every layer;
            every MLP; the embedding), each an edge from the node it reads; below them, proximity;
            "column": the receivers at `position` in the top `logit_layers` layers (default all)
            weight their own parts (heads, residual, MLP).
        batch: which batch item of the cache to explain.
        attention_mask: `[batch, pos]` as for `attribute`.
        tokens: ids or strings for node labels (and the input when a model is given).

    Returns:
        A Routes graph: `.edges` (DataFrame: layer, kind, head ("mlp"/"residual" or the head index),
        source, receiver, weight, ...), `.head_importance[layer, head]`, `.node_importance`,
        `.to_networkx()`, `.computed_receivers[layer]`.
    """
    import pandas as pd

    from lens_alti.alti.routes import RouteLayer, build_routes
    from lens_alti.results.routes import Routes, empty_edges

    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if logit_mode not in ("direct", "column"):
        raise ValueError(f"logit_mode must be 'direct' or 'column', got {logit_mode!r}")
    if contrast is not None and target is None:
        raise ValueError("contrast needs a target: routes weighted by the logit difference target − contrast")
    cache, tokens, model, layout, llayout = logit_inputs(
        cache_or_model, tokens, attention_mask, None, "routes", decoder_only=True
    )
    x0 = cache[llayout.embedding_hook]
    n_batch, pos = x0.shape[:2]
    if not 0 <= batch < n_batch:
        raise ValueError(f"batch must be in 0..{n_batch - 1}, got {batch}")
    valid = _valid(attention_mask, n_batch, pos, x0.device, "attention_mask")
    rows = explained_rows(position, valid)
    n = int(rows[batch])
    item = slice(batch, batch + 1)

    def pick(which: Any) -> Any:  # one per batch item: the one of `batch`
        if isinstance(which, (list, tuple, Tensor)) and not isinstance(which, str) and len(which) == n_batch > 1:
            return which[batch]
        return which

    target, contrast = pick(target), pick(contrast)
    direction = None
    if target is not None:
        tgt = token_ids(model, target, 1, "target")
        readout = llayout.readout(cache)
        W_U = readout.W_U.to(dtype=dtype, device=x0.device)
        u = W_U[:, tgt].T
        if contrast is not None:
            u = u - W_U[:, token_ids(model, contrast, 1, "contrast")].T
        x_final = readout.final_residual[batch, n][None]
        norm = readout.norm
        w, _ = readout_direction(x_final, norm.kind, norm.gain, norm.bias, norm.eps, u, u.new_zeros(1))
        direction = w[0]

    layers: list[RouteLayer] = []
    steps = llayout.steps
    by_layer: dict[int, dict[str, Any]] = {}
    for step in steps:
        by_layer.setdefault(step.layer, {})[step.kind] = step
    vk = valid[item]
    for layer in sorted(by_layer):
        record = by_layer[layer]["self"].build(cache)
        block = replace(
            record,
            pattern=record.pattern[item] if bool(vk.all()) else record.pattern[item] * vk[:, None, None, :],
            b_O=record.b_O[item] if record.b_O is not None and record.b_O.dim() == 3 else record.b_O,
            values=record.values[item],
            residual=record.residual[item],
            target=record.target[item],
            norm=None if record.norm is None else replace(record.norm, scale=record.norm.scale[item]),
        )
        write = by_layer[layer].get("write")
        mlp = None
        parallel = False
        if write is not None:
            w_rec = write.build(cache)
            mlp = w_rec.output[batch]
            parallel = f"blocks.{layer}.hook_mlp_out" in write.hooks
        layers.append(RouteLayer(block, mlp, parallel))
    show = progress if progress is not None else pos >= 512
    edges, head_imp, node_imp, computed = build_routes(
        layers, n, threshold, direction=direction, logit_mode=logit_mode, logit_layers=logit_layers, dtype=dtype,
        progress=show,
    )
    frame = pd.DataFrame([e.__dict__ for e in edges]) if edges else empty_edges()
    labels = _labels(model, tokens, n_batch)
    return Routes(
        edges=frame,
        head_importance=head_imp,
        node_importance=node_imp,
        position=n,
        batch=batch,
        threshold=threshold,
        n_layers=len(layers),
        computed_receivers=computed,
        weighting="proximity" if direction is None else f"logit ({logit_mode})",
        str_tokens=None if labels is None else labels[batch],
        target=None if target is None else int(token_ids(model, target, 1, "target")[0]),
        contrast=None if contrast is None else int(token_ids(model, contrast, 1, "contrast")[0]),
    )
