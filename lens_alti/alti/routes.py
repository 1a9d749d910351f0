"""Information-flow routes (Ferrando & Voita 2024; docs/spec.md §8), built top-down over reached receivers only.

For one batch item and one explained position N, the graph starts at the top node (L, N) and
goes down one sublayer at a time. Each reached receiver's parts are scored like the per-head
contributions of docs/spec.md §3 (`max(0, ‖y‖₁ − ‖y − part‖₁)`, normalised over the receiver's parts),
edges below the threshold are dropped, and only the sources of kept edges become receivers of
the step below. Receivers that the graph never reaches are never computed.

Model-agnostic: receives `AttentionBlock` records (batch size 1) and MLP outputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.alti.decompose import decompose, group_heads
from lens_alti.alti.kernels import get_kernel
from lens_alti.alti.logit import channel_groups
from lens_alti.alti.rows import row_block
from lens_alti.errors import UnsupportedModelError

if TYPE_CHECKING:
    from lens_alti.reading.records import AttentionBlock

# Memory budget of one chunk of receivers' [head, receiver, source, d] temporaries.
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RouteLayer:
    """One layer for the routes: its attention record (batch size 1) and its MLP output.

    `mlp[q, d]`: the MLP's write (sequential: `resid_post − resid_mid`; parallel: `hook_mlp_out`),
    None for attention-only layers. `parallel`: attention and MLP both read the layer input
    (no mid node); then the parts of `resid_post` are the residual, the heads and the MLP.
    """

    block: AttentionBlock
    mlp: Float[Tensor, "q d"] | None
    parallel: bool


@dataclass(frozen=True, order=True)
class Node:
    """A node of the routes graph: the residual stream of one position at one height (docs/spec.md §8).

    `Node(l, i)`: the residual stream at position `i` after `l` layers (`l = 0` the embeddings,
    `l = n_layers` the output). `Node(l, i, mid=True)`: position `i` after layer l's attention
    block, before its MLP (`l` counted from 1, so it sits between `Node(l - 1, i)` and
    `Node(l, i)`); sequential blocks only: parallel and attention-only layers have no mid node.
    Hashable and ordered (by layer, position, mid); `str(node)` is `(l, i)` or `(l, i, mid)`.
    """

    layer: int
    position: int
    mid: bool = False

    def __str__(self) -> str:
        return f"({self.layer}, {self.position}{', mid' if self.mid else ''})"


@dataclass
class Edge:
    """One kept edge of the routes graph: a part of `receiver_node`, read from `source_node`.

    `layer`: the 0-based block the part belongs to; `kind`: "head", "mlp" or "residual"; `head`:
    the head index, or "mlp"/"residual"; `source`, `receiver`: the two nodes' positions; `weight`:
    the part's share of its receiver; `weighting`: "proximity" or "logit".
    """

    layer: int
    kind: str  # "head", "mlp", "residual"
    head: int | str
    source: int
    receiver: int
    weight: float
    weighting: str
    source_node: Node
    receiver_node: Node


def restrict_receivers(block: AttentionBlock, positions: Tensor) -> AttentionBlock:
    """The record (batch size 1) with only the receivers `positions` (sources untouched)."""
    return replace(row_block(block, positions.view(1, -1)), residual_column="last", receivers=None)


def receiver_parts(
    block: AttentionBlock,
    positions: Tensor,
    mlp: Tensor | None,
    dtype: torch.dtype,
    direction: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-head and residual (and parallel MLP) shares of the receivers `positions` (docs/spec.md §3, §8).

    Returns `(heads[r, h, k], residual[r], mlp[r] or None, logit)`: shares normalised over the
    receiver's parts (rows sum to 1, or 0 when every part scores 0). `mlp` given: a parallel
    block, `y = x + attn + mlp`. With `direction[d]` also returns the parts' logit updates
    `(heads[r, h, k], residual[r], mlp[r] or 0)` read through it, packed as one tensor
    `[r, h*k + 2]` (heads flattened, residual, mlp).
    """
    sub = restrict_receivers(block, positions)
    tv = decompose(sub, dtype=dtype)
    A = tv.weights[0]  # [h, r, k]
    vo = tv.vo[0]  # [h, k, d]
    h, r, k = A.shape
    kmax = int(positions.max()) + 1
    if kmax < k and not bool(A[:, :, kmax:].any()):  # causal: no source after the last receiver
        A, vo, k = A[:, :, :kmax], vo[:, :kmax], kmax
    y = tv.resultant[0]
    mlp_rows = None if mlp is None else mlp[positions].to(dtype)
    if mlp_rows is not None:
        y = y + mlp_rows
    scale = tv.scale[0] if tv.scale is not None else torch.ones_like(y)
    y_l1 = y.abs().sum(-1)
    G = channel_groups(block)  # > 1: channels grouped into heads; a head's part sums its channels
    kernel = get_kernel("l1+heads", False) if G == 1 else get_kernel("l1", False)
    d = y.shape[-1]
    rows = max(1, _CHUNK_BYTES // max(1, h * k * d * y.element_size()))
    heads = A.new_zeros(r, h // G, k)
    for i0 in range(0, r, rows):
        i1 = min(r, i0 + rows)
        if G == 1:
            per_head, _ = kernel(y[i0:i1], scale[i0:i1], A[:, i0:i1], vo)
        else:
            per_head = torch.stack(
                [kernel(y[i0:i1], scale[i0:i1], A[c0 : c0 + G, i0:i1], vo[c0 : c0 + G]) for c0 in range(0, h, G)]
            )
        heads[i0:i1] = (y_l1[i0:i1, None, None] - per_head.transpose(0, 1)).clamp(min=0)
    residual = (y_l1 - (y - tv.residual[0]).abs().sum(-1)).clamp(min=0)
    mlp_score = None if mlp_rows is None else (y_l1 - (y - mlp_rows).abs().sum(-1)).clamp(min=0)
    total = heads.sum((1, 2)) + residual + (0 if mlp_score is None else mlp_score)
    safe = torch.where(total > 0, total, 1)

    def norm(t: Tensor) -> Tensor:
        shape = (-1, *([1] * (t.dim() - 1)))
        return torch.where(total.view(shape) > 0, t / safe.view(shape), 0)
    logit = None
    if direction is not None:
        w = direction.to(dtype)
        sw = scale * w  # [r, d]
        vo_w = torch.einsum("hkd,rd->rhk", vo, sw)
        head_logit = group_heads(A.transpose(0, 1) * vo_w, G)  # [r, H, k]
        res_logit = tv.residual[0] @ w
        mlp_logit = torch.zeros_like(res_logit) if mlp_rows is None else mlp_rows @ w
        logit = torch.cat([head_logit.reshape(r, -1), res_logit[:, None], mlp_logit[:, None]], dim=1)
    return norm(heads), norm(residual), None if mlp_score is None else norm(mlp_score), logit


def logit_shares(values: Tensor) -> Tensor:
    """Logit weighting: each part's positive logit update over the sum of positive updates (rows)."""
    pos = values.clamp(min=0)
    total = pos.sum(-1, keepdim=True)
    return torch.where(total > 0, pos / torch.where(total > 0, total, 1), 0)


def build_routes(
    layers: Sequence[RouteLayer],
    position: int,
    threshold: float,
    *,
    direction: Tensor | None = None,
    logit_mode: str = "direct",
    logit_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[list[Edge], Tensor, dict[Node, float], list[int]]:
    """The routes graph from node (L, position) down to the embeddings (docs/spec.md §8).

    `direction[d]`: the logit direction at the residual stream of the explained position
    (docs/spec.md §7, the final norm linearised). With it:
    - `logit_mode="direct"` (default): the top node's parts are all the direct parts of the
      logit (docs/spec.md §7: every head's output at `position` from each source, every MLP, the
      embedding), weighted by their positive logit updates; each kept part is an edge into the
      top node from the node it reads (a head of layer l from `(l, j)`, an MLP from its mid node,
      the embedding from `(0, position)`), and the graph continues below with proximity;
    - `logit_mode="column"`: the receivers at `position` in the top `logit_layers` layers (all by
      default) weight their own parts (heads, residual, MLP) by logit update instead of proximity.
    Returns (kept edges, head importance `[layer, head]`, node importance `{Node: float}`, number
    of receivers computed per layer `[layer]`). `layers` may read each layer when indexed: a layer
    that no kept edge reaches is never asked for (except all of them once by the "direct" mode).
    """
    if logit_mode not in ("direct", "column"):
        raise ValueError(f"logit_mode must be 'direct' or 'column', got {logit_mode!r}")
    n_layers = len(layers)
    graph = _Graph(n_layers, position)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers, desc="lens_alti routes", unit="layer")
    if direction is not None and logit_mode == "direct":
        _direct_edges(layers, position, direction, threshold, dtype, graph)
    else:
        graph.reached[n_layers, False].add(position)
    column = direction is not None and logit_mode == "column"
    logit_from = 0 if logit_layers is None else n_layers - logit_layers
    for layer in range(n_layers - 1, -1, -1):
        weigh = direction if column and layer >= logit_from else None  # this layer's logit weighting
        if graph.reached[layer + 1, False] or graph.reached[layer + 1, True]:  # else the layer is never read
            spec = graph.seen(layer, layers[layer])
            _mlp_edges(graph, spec, layer, position, threshold, dtype, weigh)
            _attention_edges(graph, spec, layer, position, threshold, dtype, weigh)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return graph.edges, graph.head_importance(), graph.importance, graph.computed


class _Graph:
    """The routes graph while it is built top-down from `top = Node(n_layers, position)`.

    `edges`: the kept edges, in the order kept; `importance[node]`: Σ over kept paths from the top
    node of the product of weights; `heads[layer, head]`: head importance, float64;
    `computed[layer]`: receivers computed per attention block; `reached[(level, mid)]`: the
    positions i whose node `Node(level, i, mid)` is the source of a kept edge (or the top node):
    the receivers below; `counts[layer]`: the number of heads of each layer read.
    """

    def __init__(self, n_layers: int, position: int) -> None:
        self.n_layers = n_layers
        self.top = Node(n_layers, position)
        self.importance: dict[Node, float] = {self.top: 1.0}
        self.heads: defaultdict[tuple[int, int], float] = defaultdict(float)
        self.counts: dict[int, int] = {}
        self.edges: list[Edge] = []
        self.computed: list[int] = [0] * n_layers
        self.reached: defaultdict[tuple[int, bool], set[int]] = defaultdict(set)

    def seen(self, layer: int, spec: RouteLayer) -> RouteLayer:
        """Note layer `layer`'s number of heads (`head_importance[layer, head]` needs one for all layers)."""
        self.counts[layer] = spec.block.pattern.shape[1] // channel_groups(spec.block)
        if len(set(self.counts.values())) > 1:
            raise UnsupportedModelError(
                f"routes: the layers have different numbers of heads ({sorted(set(self.counts.values()))}; hybrid "
                "models, per-layer head counts, mixers without heads count as one part): head_importance[layer, "
                "head] needs one head count"
            )
        return spec

    def head_importance(self) -> Tensor:
        """`[layer, head]` float64: the importance of every head (0 for layers the graph never reached)."""
        n_heads = next(iter(self.counts.values()), 0)
        out = torch.zeros(self.n_layers, n_heads, dtype=torch.float64)
        for (layer, head), value in self.heads.items():
            out[layer, head] = value
        return out

    def keep(
        self, layer: int, kind: str, head: int | str, weight: float, how: str, source: Node, receiver: Node
    ) -> None:
        """Keep the edge `source` → `receiver`: a part of `receiver` of weight `weight` (`how`: the weighting)."""
        self.edges.append(Edge(layer, kind, head, source.position, receiver.position, weight, how, source, receiver))
        self.importance[source] = self.importance.get(source, 0.0) + self.importance[receiver] * weight
        if kind == "head":
            self.heads[layer, int(head)] += self.importance[receiver] * weight
        self.reached[source.layer, source.mid].add(source.position)

    def receivers(self, level: int, mid: bool) -> Tensor | None:
        """The reached positions `[r]` (sorted) at `Node(level, ·, mid)`, or None when there are none."""
        found = self.reached[level, mid]
        return torch.tensor(sorted(found)) if found else None


def _mlp_edges(
    graph: _Graph, spec: RouteLayer, layer: int, position: int, threshold: float, dtype: torch.dtype,
    direction: Tensor | None,
) -> None:
    """Edges into the reached `Node(layer + 1, i)` of a sequential MLP block (others: nothing).

    The receiver `resid_post_i[d]` has two parts, `x^mid_i` ("residual") and `mlp(x^mid_i)`
    ("mlp"), both read from `Node(layer + 1, i, mid=True)`, scored by proximity share; with
    `direction[d]` (logit weighting in this layer) the explained position's two parts are
    weighted by their positive logit updates instead.
    """
    top = layer + 1
    positions = graph.receivers(top, False) if spec.mlp is not None and not spec.parallel else None
    if positions is None or spec.mlp is None:
        return
    mid = spec.block.target[0, positions].to(dtype)  # [r, d]
    mlp_rows = spec.mlp[positions].to(dtype)  # [r, d]
    post = mid + mlp_rows
    y_l1 = post.abs().sum(-1)
    s_mid = (y_l1 - (post - mid).abs().sum(-1)).clamp(min=0)
    s_mlp = (y_l1 - (post - mlp_rows).abs().sum(-1)).clamp(min=0)
    shares = torch.stack([s_mid, s_mlp], -1)  # [r, 2]
    total = shares.sum(-1, keepdim=True)
    shares = torch.where(total > 0, shares / total.clamp(min=1e-30), 0)
    for idx, i in enumerate(positions.tolist()):
        how = "proximity"
        row = shares[idx]
        if direction is not None and i == position:
            w = direction.to(dtype)
            row, how = logit_shares(torch.stack([mid[idx] @ w, mlp_rows[idx] @ w])), "logit"
        source, receiver = Node(top, i, mid=True), Node(top, i)
        for kind, weight in (("residual", float(row[0])), ("mlp", float(row[1]))):
            if weight >= threshold:
                graph.keep(layer, kind, kind, weight, how, source, receiver)


def _attention_edges(
    graph: _Graph, spec: RouteLayer, layer: int, position: int, threshold: float, dtype: torch.dtype,
    direction: Tensor | None,
) -> None:
    """Edges into the reached receivers of attention block `layer` (computed for those only).

    Receivers: `Node(layer + 1, i, mid=True)` before a sequential MLP, else `Node(layer + 1, i)`.
    Parts: the residual and (parallel blocks) the MLP, read from `Node(layer, i)`, and each head
    and source j, read from `Node(layer, j)`; shares from `receiver_parts`, or with `direction[d]`
    the explained position's parts weighted by their positive logit updates.
    """
    sequential_mlp = spec.mlp is not None and not spec.parallel
    positions = graph.receivers(layer + 1, sequential_mlp)
    if positions is None:
        return
    mlp = spec.mlp if spec.parallel else None
    heads, residual, mlp_share, logit = receiver_parts(spec.block, positions, mlp, dtype, direction)
    graph.computed[layer] += len(positions)
    for idx, i in enumerate(positions.tolist()):
        receiver = Node(layer + 1, i, mid=sequential_mlp)
        how = "proximity"
        h_row, r_w = heads[idx], float(residual[idx])  # h_row[h, k]
        m_w = None if mlp_share is None else float(mlp_share[idx])
        if logit is not None and i == position:
            shares = logit_shares(logit[idx])
            h_row = shares[:-2].view(heads.shape[1], heads.shape[2])
            r_w, m_w = float(shares[-2]), (None if mlp_share is None else float(shares[-1]))
            how = "logit"
        if r_w >= threshold:
            graph.keep(layer, "residual", "residual", r_w, how, Node(layer, i), receiver)
        if m_w is not None and m_w >= threshold:
            graph.keep(layer, "mlp", "mlp", m_w, how, Node(layer, i), receiver)
        for h, j in (h_row >= threshold).nonzero().tolist():
            graph.keep(layer, "head", h, float(h_row[h, j]), how, Node(layer, j), receiver)


def _direct_edges(
    layers: Sequence[RouteLayer],
    position: int,
    direction: Tensor,
    threshold: float,
    dtype: torch.dtype,
    graph: _Graph,
) -> None:
    """Edges into the top node from every direct part of the logit, weighted by positive logit update."""
    w = direction.to(dtype)
    at = torch.tensor([position])
    values: list[Tensor] = []
    labels: list[tuple[str, int, int | str, Node]] = []  # (kind, layer, head, source node) of each part
    embedding = None
    for layer in range(len(layers)):
        spec = graph.seen(layer, layers[layer])
        if layer == 0:  # the embedding is layer 0's residual
            embedding = (spec.block.residual[0, position].to(dtype) @ w)[None]
        *_, logit = receiver_parts(spec.block, at, spec.mlp if spec.parallel else None, dtype, direction)
        assert logit is not None  # internal: receiver_parts returns the logit updates when given a direction
        graph.computed[layer] += 1
        n_h = spec.block.pattern.shape[1] // channel_groups(spec.block)
        k = (logit.shape[1] - 2) // n_h
        values.append(logit[0, :-2])
        labels += [("head", layer, h, Node(layer, j)) for h in range(n_h) for j in range(k)]
        if spec.parallel and spec.mlp is not None:
            values.append(logit[0, -1:])
            labels.append(("mlp", layer, "mlp", Node(layer, position)))
        elif spec.mlp is not None:
            values.append((spec.mlp[position].to(dtype) @ w)[None])
            labels.append(("mlp", layer, "mlp", Node(layer + 1, position, mid=True)))
    assert embedding is not None  # internal: a route has at least one layer
    values.append(embedding)
    labels.append(("residual", 0, "residual", Node(0, position)))
    shares = logit_shares(torch.cat(values))
    for idx in (shares >= threshold).nonzero().flatten().tolist():
        kind, layer, head, node = labels[idx]
        graph.keep(layer, kind, head, float(shares[idx]), "logit", node, graph.top)
