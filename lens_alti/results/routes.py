"""The result of `lens_alti.routes` (information-flow routes, docs/spec.md §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from lens_alti.alti.routes import Node


@dataclass
class Routes:
    """Information-flow routes graph (docs/spec.md §8) for one explained position of one batch item.

    Nodes are `Node`s (`lens_alti.alti.routes.Node`, also `lens_alti.results.Node`): `Node(l, i)` the
    residual stream at position i after l layers (`l = 0` the embeddings, `l = n_layers` the
    output), `Node(l, i, mid=True)` after layer l's attention block (l counted from 1, sequential
    blocks only); `str(node)` is `(l, i)` or `(l, i, mid)`. Edges go from a source node to a
    receiver node one step up:
        edges: pandas DataFrame, one row per kept edge: `layer` (0-based block index), `kind`
            ("head", "mlp" or "residual"), `head` (the head index, or "mlp"/"residual"),
            `source` and `receiver` (positions), `weight` (the part's share of its receiver,
            proximity or logit weighting), `weighting` ("proximity" or "logit"), `source_node`,
            `receiver_node` (`Node`s).
        head_importance: `[layer, head]` Σ over kept edges through the head of
            (edge weight × its receiver's node importance).
        node_importance: {Node: Σ over kept paths from the top node of the product of weights}.
        computed_receivers: `[layer]` how many receivers each attention block was computed for
            (the cost; a full `attribute(heads=True)` computes every position in every layer).
    """

    edges: Any
    head_importance: Float[Tensor, "layer head"]
    node_importance: dict[Node, float]
    position: int
    batch: int
    threshold: float
    n_layers: int
    computed_receivers: list[int]
    weighting: str
    str_tokens: list[str] | None = None
    target: int | None = None
    contrast: int | None = None

    @property
    def top_node(self) -> Node:
        """`Node(n_layers, position)`: the explained position's output, where the graph starts."""
        return Node(self.n_layers, self.position)

    def to_networkx(self) -> Any:
        """A networkx MultiDiGraph: the `Node`s as node ids (attributes `importance`, `layer`,
        `position`, `mid`, `token`), edges source → receiver with `weight`, `kind`, `head`, `layer`."""
        import networkx as nx

        graph = nx.MultiDiGraph()
        for node, imp in self.node_importance.items():
            pos = node.position
            token = self.str_tokens[pos] if self.str_tokens is not None and pos < len(self.str_tokens) else str(pos)
            graph.add_node(node, importance=imp, layer=node.layer, position=pos, mid=node.mid, token=token)
        for row in self.edges.itertuples(index=False):
            graph.add_edge(
                row.source_node, row.receiver_node, weight=row.weight, kind=row.kind, head=row.head, layer=row.layer
            )
        return graph

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """(layer, head, importance), most important first."""
        flat = self.head_importance.flatten()
        idx = flat.topk(min(k, flat.numel())).indices
        n_heads = self.head_importance.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in idx]

    def __repr__(self) -> str:
        return (
            f"Routes(position={self.position}, batch={self.batch}, threshold={self.threshold}, "
            f"edges={len(self.edges)}, nodes={len(self.node_importance)}, weighting={self.weighting!r}, "
            f"computed_receivers={sum(self.computed_receivers)})"
        )


def empty_edges() -> Any:
    """The edges DataFrame of a graph without edges: the columns and dtypes of `Routes.edges`."""
    import pandas as pd

    return pd.DataFrame(
        {
            "layer": pd.Series(dtype="int64"),
            "kind": pd.Series(dtype="object"),
            "head": pd.Series(dtype="object"),
            "source": pd.Series(dtype="int64"),
            "receiver": pd.Series(dtype="int64"),
            "weight": pd.Series(dtype="float64"),
            "weighting": pd.Series(dtype="object"),
            "source_node": pd.Series(dtype="object"),
            "receiver_node": pd.Series(dtype="object"),
        }
    )


