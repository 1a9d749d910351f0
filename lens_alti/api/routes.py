"""`routes` (information-flow routes, docs/spec.md §8): a cache or a model in, a Routes graph out.

The steps: check the arguments; open the run (shared with `logit_attribution`: a cache, or a
model whose layers run again one at a time); with a target, read the readout direction of the
explained item; hand `lens_alti.alti.routes.build_routes` the layers as a sequence that reads each
one (its attention record and MLP write for that item) only when the graph reaches it; assemble
the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, overload

import torch
from torch import Tensor

from lens_alti.alti.contributions import DEFAULT_CHUNK_BYTES
from lens_alti.alti.routes import RouteLayer, build_routes
from lens_alti.api.inputs import check_threshold, pick_item, token_labels, valid_mask
from lens_alti.api.logit import LogitRun, open_run, readout_parts
from lens_alti.api.options import DTYPES
from lens_alti.errors import InvalidArgumentError
from lens_alti.results.routes import Routes, empty_edges
from lens_alti.validation import check_choice, check_index, check_position

LOGIT_MODES = ("direct", "column")


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
    attention: str = "auto",
) -> Routes:
    """Information-flow routes (Ferrando & Voita 2024; docs/spec.md §8) of one position of one batch item.

    Built top-down from the node (n_layers, position): each reached receiver's parts (every head
    and source, the residual, the MLP) are scored by proximity share (`max(0, ‖y‖₁ − ‖y − part‖₁)`
    normalised over the receiver's parts, docs/spec.md §3); edges with weight ≥ `threshold` are kept
    and only their sources are expanded, so unreached receivers are never computed. Decoder-only models.

    Args:
        cache_or_model: an ActivationCache or the model with `tokens=` (a decoder-only model is run
            once recording each layer's input, and only the layers the graph reaches are run again,
            one at a time: memory linear in the input's length, docs/spec.md §12).
        position: the explained position of item `batch` (negative counts back from its last real token).
        threshold: edges below this weight are pruned (default 0.04, as in the paper); in (0, 1).
        target: with a target (id or one-token string) the graph explains the prediction
            of `target` (minus `contrast`): edges are weighted by positive logit updates (docs/spec.md §7,
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
        attention: with a model, how its attention runs: "recomputed", "eager" or "auto" (default),
            as for `attribute` (docs/spec.md §9).

    Returns:
        A Routes graph: `.edges` (DataFrame: layer, kind, head ("mlp"/"residual" or the head index),
        source, receiver, weight, ...), `.head_importance[layer, head]`, `.node_importance`,
        `.to_networkx()`, `.computed_receivers[layer]`.
    """
    threshold = check_threshold("threshold", threshold)
    check_choice("logit_mode", logit_mode, LOGIT_MODES)
    check_choice("dtype", dtype, DTYPES)
    if contrast is not None and target is None:
        raise InvalidArgumentError(
            "contrast", contrast, "None without a target (routes weigh edges by the logit difference target − contrast)"
        )
    run = open_run(cache_or_model, tokens, attention_mask, None, "routes", decoder_only=True, attention=attention,
                   max_chunk_bytes=DEFAULT_CHUNK_BYTES, dtype=dtype)
    lengths = run.source.lengths()
    n_batch, pos = lengths.batch, lengths.source
    batch = check_index("batch", batch, n_batch, what="batch items")
    valid = valid_mask(run.attention_mask, n_batch, pos, lengths.device, "attention_mask")
    n = check_position("position", pick_item(position, batch, n_batch), valid[batch].cpu(), where=f"batch item {batch}")
    target, contrast = pick_item(target, batch, n_batch), pick_item(contrast, batch, n_batch)
    direction = None
    if target is not None:
        item, row = torch.tensor([batch]), torch.tensor([n])
        readout = readout_parts(run, target, contrast, item, row, dtype)
        direction = readout.w[0]
    layers = RouteLayers(run, batch, valid[batch : batch + 1])
    show = progress if progress is not None else pos >= 512
    edges, head_imp, node_imp, computed = build_routes(
        layers, n, threshold, direction=direction, logit_mode=logit_mode, logit_layers=logit_layers, dtype=dtype,
        progress=show,
    )
    labels = token_labels(run.model, run.tokens, n_batch)
    import pandas as pd

    return Routes(
        edges=pd.DataFrame([e.__dict__ for e in edges]) if edges else empty_edges(),
        head_importance=head_imp,
        node_importance=node_imp,
        position=n,
        batch=batch,
        threshold=threshold,
        n_layers=len(layers),
        computed_receivers=computed,
        weighting="proximity" if direction is None else f"logit ({logit_mode})",
        str_tokens=None if labels is None else labels[batch],
        target=None if direction is None else int(readout.target[0]),
        contrast=None if direction is None or readout.contrast is None else int(readout.contrast[0]),
    )


class RouteLayers(Sequence[RouteLayer]):
    """Every layer's attention record and MLP write for batch item `batch` (`valid`: its `[1, pos]` mask),
    read when asked for (the last one kept), so a model's layers run again only where the graph goes."""

    def __init__(self, run: LogitRun, batch: int, valid: Tensor) -> None:
        self.run, self.batch, self.valid = run, batch, valid
        self.by_layer: dict[int, dict[str, Any]] = {}
        for step in run.logit_layout.steps:
            self.by_layer.setdefault(step.layer, {})[step.kind] = step
        self.order = sorted(self.by_layer)
        self._last: tuple[int, RouteLayer] | None = None

    def __len__(self) -> int:
        return len(self.order)

    @overload
    def __getitem__(self, index: int) -> RouteLayer: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RouteLayer]: ...
    def __getitem__(self, index: int | slice) -> RouteLayer | Sequence[RouteLayer]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        layer = self.order[index]
        if self._last is None or self._last[0] != layer:
            self._last = (layer, self._read(layer))
        return self._last[1]

    def _read(self, layer: int) -> RouteLayer:
        store = self.run.store(layer)
        steps = self.by_layer[layer]
        record = steps["self"].build(store)
        item, valid = slice(self.batch, self.batch + 1), self.valid
        block = replace(
            record,
            pattern=record.pattern[item] if bool(valid.all()) or record.pattern_rows is not None
            else record.pattern[item] * valid[:, None, None, :],
            pattern_rows=None if record.pattern_rows is None else _ItemRows(record.pattern_rows, self.batch, valid),
            b_O=record.b_O[item] if record.b_O is not None and record.b_O.dim() == 3 else record.b_O,
            values=record.values[item],
            residual=record.residual[item],
            target=record.target[item],
            norm=None if record.norm is None else replace(record.norm, scale=record.norm.scale[item]),
        )
        write = steps.get("write")
        mlp, parallel = None, False
        if write is not None:
            mlp, parallel = write.build(store).output[self.batch], write.parallel
        return RouteLayer(block, mlp, parallel)


class _ItemRows:
    """Recomputed attention rows of one batch item, padded keys zeroed (`PatternRows` of batch size 1)."""

    def __init__(self, rows: Any, batch: int, valid: Tensor) -> None:
        self.inner, self.batch, self.valid = rows, batch, valid
        b, h, q, k = rows.shape
        self.shape, self.dtype, self.device = (1, h, q, k), rows.dtype, rows.device

    def rows(self, positions: Tensor) -> Tensor:
        everyone = positions.new_zeros(self.inner.shape[0], positions.shape[1])
        everyone[self.batch] = positions[0]
        got = self.inner.rows(everyone)[self.batch : self.batch + 1]
        return got if bool(self.valid.all()) else got * self.valid[:, None, None, :].to(got.dtype)

    def span_rows(self, positions: Tensor) -> tuple[Tensor, int]:
        return self.rows(positions), 0
