"""Plotly figures that explain a prediction: ALTI-Logit token bars, head totals, routes.

- `logit_token_bar(attr)`: each input token's signed contribution to the logit (difference),
  with a slider that scrubs through the layers (the contribution accumulated up to layer l);
- `logit_position_picker(attr)`: the same bars for several explained positions (one per batch
  item of `attr`), with a menu to pick the position;
- `head_totals_heatmap(attr)`: layer × head direct logit attribution, diverging colours;
- `routes_figure(routes)`: the information-flow graph on a layers × positions grid, edge width
  = weight, colour = head / MLP / residual, hover names the head and the weight;
- `rollout_position_picker(result)`: ALTI rollout bars with a menu over explained positions and
  a slider over layers.

Every function returns a `plotly.graph_objects.Figure`; interactivity uses plotly's own
menus and sliders, so `fig.write_html` (or the report) stays one self-contained file.
"""

from __future__ import annotations

from typing import Any

import torch

from lens_alti.errors import LensAltiError

_POS, _NEG, SINK_COLOUR = "#2b6cb0", "#c53030", "#a0aec0"
KIND_COLOURS = {"head": "#dd6b20", "mlp": "#38a169", "residual": "#a0aec0"}


class FigureInputError(LensAltiError, ValueError):
    """A figure was asked for something its input does not hold."""


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lens_alti.viz needs plotly: pip install 'lens-alti[plot]'") from exc
    return go


def _batch(n: int, batch: int, what: str) -> int:
    if not -n <= batch < n:
        raise FigureInputError(f"batch {batch} is out of range for {what} of {n} item(s)")
    return batch % n


def _src_labels(attr: Any, batch: int) -> tuple[list[int], list[str]]:
    """Indices of the real input tokens of item `batch` (padding left out) and unique labels."""
    n_src = attr.tokens.shape[-1]
    n_source = getattr(attr, "n_source", 0) or 0
    mask = attr.attention_mask[batch].bool().tolist() if attr.attention_mask is not None else []
    if n_source:
        keep = list(range(n_source)) + [n_source + i for i, m in enumerate(mask) if m]
    else:
        keep = [i for i, m in enumerate(mask) if m] if len(mask) == n_src else list(range(n_src))
    toks = attr.str_tokens[batch] if getattr(attr, "str_tokens", None) is not None else None
    labels = [f"{i}: {toks[i]!r}" if toks is not None and i < len(toks) else str(i) for i in keep]
    sinks = _sinks(attr, batch)
    return keep, [f"{label} (sink)" if i in sinks else label for i, label in zip(keep, labels, strict=True)]


def _sinks(attr: Any, batch: int) -> set[int]:
    """The attention-sink positions of item `batch` (docs/spec.md §10), drawn apart and greyed."""
    sinks = getattr(attr, "sinks", None)
    return set() if sinks is None else set(sinks[batch].nonzero().flatten().tolist())


def _explained(attr: Any, batch: int) -> str:
    target = attr.target_str[batch] if getattr(attr, "target_str", None) else str(int(attr.target[batch]))
    what = f"logit of {target!r}"
    if attr.contrast is None and getattr(attr, "extra", {}).get("soft_contrast"):
        what = f"logit difference {target!r} − {attr.contrast_str[batch] if attr.contrast_str else 'mean logit'}"
    elif attr.contrast is not None:
        contrast = attr.contrast_str[batch] if getattr(attr, "contrast_str", None) else str(int(attr.contrast[batch]))
        what = f"logit difference {target!r} − {contrast!r}"
    return f"{what} at position {int(attr.position[batch])} (= {float(attr.logit[batch]):.3f})"


def _menu(buttons: list[dict[str, Any]], active: int = 0) -> dict[str, Any]:
    return {"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15, "active": active}


def _slider(steps: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    return {"active": len(steps) - 1, "currentvalue": {"prefix": prefix}, "steps": steps, "pad": {"t": 60}}


def _signed_bar(go: Any, labels: list[str], values: list[float], name: str = "", visible: bool = True) -> Any:
    """Blue bars push towards the target, red against it; attention sinks (labels ending in "(sink)") grey."""
    return go.Bar(
        x=labels, y=values, name=name, visible=visible,
        marker_color=[SINK_COLOUR if x.endswith("(sink)") else _POS if v >= 0 else _NEG for x, v in zip(
            labels, values, strict=True
        )],
        hovertemplate="%{x}: %{y:.4f}<extra></extra>",
    )


def _sink_note(attr: Any, batch: int) -> str:
    """"; sink <label> +v set aside" for the figure titles, or "" without a sink."""
    sinks = sorted(_sinks(attr, batch))
    if not sinks:
        return ""
    toks = attr.str_tokens[batch] if getattr(attr, "str_tokens", None) is not None else None
    names = ", ".join(repr(toks[i]) if toks is not None and i < len(toks) else str(i) for i in sinks)
    return f"<br>grey: attention sink {names}, {float(attr.sink[batch]):+.3f}, shown apart (not content)"


def logit_token_bar(attr: Any, *, batch: int = 0, layer_slider: bool = True) -> Any:
    """Signed bars of `attr.tokens[batch]`: blue pushes towards the target, red against it.

    With `layer_slider`, a slider shows the contribution accumulated through layer l
    (embedding term + Σ_{l' ≤ l} `by_layer`), so a reader can watch the prediction form.
    """
    go = _go()
    b = _batch(attr.tokens.shape[0], batch, "the attribution")
    keep, labels = _src_labels(attr, b)
    final = attr.tokens[b, keep].tolist()
    fig = go.Figure()
    if not layer_slider:
        fig.add_trace(_signed_bar(go, labels, final))
    else:
        by_layer = attr.by_layer[b][:, keep].double()
        embedding = (attr.tokens[b, keep].double() - by_layer.sum(0))  # the embedding term, on the explained token
        cumulative = embedding + by_layer.cumsum(0)
        n_layers = cumulative.shape[0]
        for layer in range(n_layers):
            name, shown = f"through layer {layer}", layer == n_layers - 1
            fig.add_trace(_signed_bar(go, labels, cumulative[layer].tolist(), name, shown))
        steps = [
            {
                "method": "update",
                "label": str(layer),
                "args": [{"visible": [i == layer for i in range(n_layers)]}],
            }
            for layer in range(n_layers)
        ]
        fig.update_layout(sliders=[_slider(steps, "through layer ")])
        lo, hi = float(cumulative.min().clamp(max=0)), float(cumulative.max().clamp(min=0))
        pad = 0.05 * (hi - lo or 1.0)
        fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_layout(
        title=f"ALTI-Logit: input tokens' contributions to the {_explained(attr, b)}{_sink_note(attr, b)}",
        yaxis_title="logit contribution", showlegend=False,
    )
    return fig


def logit_position_picker(attr: Any, *, labels: list[str] | None = None) -> Any:
    """ALTI-Logit token bars for each batch item of `attr` (e.g. one per explained position of
    the same text), with a drop-down menu to pick which one is shown. `labels`: menu entries."""
    go = _go()
    n = attr.tokens.shape[0]
    names = labels or [f"position {int(attr.position[b])}" for b in range(n)]
    if len(names) != n:
        raise FigureInputError(f"{len(names)} labels for {n} explained positions")
    fig = go.Figure()
    titles = []
    for b in range(n):
        keep, xs = _src_labels(attr, b)
        fig.add_trace(_signed_bar(go, xs, attr.tokens[b, keep].tolist(), names[b], b == 0))
        titles.append(f"ALTI-Logit: {_explained(attr, b)}{_sink_note(attr, b)}")
    buttons = [
        {
            "method": "update",
            "label": names[b],
            "args": [{"visible": [i == b for i in range(n)]}, {"title": {"text": titles[b]}}],
        }
        for b in range(n)
    ]
    fig.update_layout(
        title=titles[0], yaxis_title="logit contribution", showlegend=False,
        updatemenus=[_menu(buttons)],
    )
    return fig


def head_totals_heatmap(attr: Any, *, batch: int | None = None) -> Any:
    """Layer × head direct logit attribution (`head_totals`), mean over the batch unless `batch`
    is given; blue helps the target, red works against it (colour scale centred at 0)."""
    go = _go()
    totals = attr.head_totals.double()
    if batch is None:
        z, which = totals.mean(0), f"mean over {totals.shape[0]} item(s)"
    else:
        b = _batch(totals.shape[0], batch, "the attribution")
        z, which = totals[b], _explained(attr, b)
    lim = float(z.abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(), x=[f"H{h}" for h in range(z.shape[1])], y=[f"L{layer}" for layer in range(z.shape[0])],
            colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
            hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Heads' direct logit attribution ({which})", xaxis_title="head", yaxis_title="layer",
        yaxis_autorange="reversed", height=max(400, 18 * z.shape[0] + 150),
    )
    return fig


def _node_y(node: Any) -> float:
    """A routes `Node`'s height: after layer l at y = l; after layer l's attention block (mid) at l − 0.5."""
    return float(node.layer) - (0.5 if node.mid else 0.0)


def routes_figure(routes: Any, *, width_scale: float = 8.0, bins: int = 6) -> Any:
    """The routes graph on a grid: x = position, y = layer (mid-block nodes half a layer below).

    Edge width grows with the weight (in `bins` steps), colour says head / MLP / residual;
    hovering the middle of an edge names its layer, head and weight. Node size = importance.
    """
    go = _go()
    edges = routes.edges
    needed = {"kind", "head", "layer", "weight", "source_node", "receiver_node"}
    if not needed <= set(edges.columns):
        raise FigureInputError(f"routes.edges needs the columns {sorted(needed)}; it has {list(edges.columns)}")
    fig = go.Figure()
    w_max = float(edges.weight.max()) if len(edges) else 1.0
    for kind, colour in KIND_COLOURS.items():
        sub = edges[edges.kind == kind]
        if not len(sub):
            continue
        level = ((sub.weight / w_max) * bins).clip(upper=bins - 1e-9).astype(int)  # 0 .. bins-1
        for lv in sorted(set(level.tolist())):
            xs: list[Any] = []
            ys: list[Any] = []
            for row in sub[level == lv].itertuples(index=False):
                xs += [row.source_node.position, row.receiver_node.position, None]
                ys += [_node_y(row.source_node), _node_y(row.receiver_node), None]
            fig.add_trace(
                go.Scatter(
                    x=xs, y=ys, mode="lines", line={"color": colour, "width": 0.5 + width_scale * (lv + 1) / bins},
                    hoverinfo="skip", showlegend=False, legendgroup=kind,
                )
            )
        hover = [
            (f"layer {r.layer} head {r.head}" if kind == "head" else f"layer {r.layer} {kind}")
            + f"<br>position {r.source} → {r.receiver}<br>weight {r.weight:.4f}"
            for r in sub.itertuples(index=False)
        ]
        fig.add_trace(
            go.Scatter(
                x=[(r.source_node.position + r.receiver_node.position) / 2 for r in sub.itertuples(index=False)],
                y=[(_node_y(r.source_node) + _node_y(r.receiver_node)) / 2 for r in sub.itertuples(index=False)],
                mode="markers", marker={"color": colour, "size": 7, "opacity": 0.6}, name=kind, legendgroup=kind,
                text=hover, hovertemplate="%{text}<extra></extra>",
            )
        )
    nodes = list(routes.node_importance.items())
    toks = routes.str_tokens
    if nodes:
        imp = torch.tensor([v for _, v in nodes], dtype=torch.float64)
        size = (6 + 14 * imp / float(imp.max() or 1)).tolist()
        fig.add_trace(
            go.Scatter(
                x=[n.position for n, _ in nodes], y=[_node_y(n) for n, _ in nodes], mode="markers", name="node",
                marker={"color": "#2d3748", "size": size},
                text=[
                    f"{'mid-' if n.mid else ''}layer {n.layer}, position {n.position}"
                    + (f" {toks[n.position]!r}" if toks is not None and n.position < len(toks) else "")
                    + f"<br>importance {v:.4f}"
                    for n, v in nodes
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    positions = sorted({n.position for n, _ in nodes}) if nodes else []
    if toks is not None:
        positions = list(range(len(toks)))
    fig.update_layout(
        title=f"Information-flow routes to position {routes.position} (threshold {routes.threshold}, "
        f"{routes.weighting} weighting; {len(edges)} edges)",
        xaxis={
            "title": "position", "tickmode": "array", "tickvals": positions,
            "ticktext": [f"{p}: {toks[p]!r}" if toks is not None else str(p) for p in positions],
        },
        yaxis={"title": "layer (residual stream after it)", "range": [-0.7, routes.n_layers + 0.5]},
        height=max(500, 22 * routes.n_layers + 200), width=max(700, 60 * max(len(positions), 1) + 250),
        hovermode="closest",
    )
    return fig


def rollout_position_picker(result: Any, *, batch: int = 0) -> Any:
    """ALTI rollout bars of one text: a menu picks the explained position, a slider the layer
    (rollout after layer l). One trace per (position, layer): meant for texts of tens of tokens."""
    go = _go()
    b = _batch(result.rollout.shape[0], batch, "the result")
    keep = [i for i, m in enumerate(result.attention_mask[b].tolist()) if m]
    toks = result.str_tokens[b] if result.str_tokens is not None else None
    sinks = _sinks(result, b)
    labels = [f"{i}: {toks[i]!r}" if toks is not None else str(i) for i in keep]
    labels = [f"{x} (sink)" if i in sinks else x for i, x in zip(keep, labels, strict=True)]
    colours = [SINK_COLOUR if i in sinks else _POS for i in keep]
    n_layers = result.rollout.shape[1]
    roll = result.rollout[b][:, keep][:, :, keep]  # [layer, query, key]
    fig = go.Figure()
    for qi in range(len(keep)):
        for layer in range(n_layers):
            fig.add_trace(
                go.Bar(
                    x=labels, y=roll[layer, qi].tolist(), marker_color=colours,
                    visible=(qi == len(keep) - 1 and layer == n_layers - 1),
                    hovertemplate="%{x}: %{y:.4f}<extra></extra>",
                )
            )

    def visible(q: int, layer: int) -> list[bool]:
        return [qi == q and li == layer for qi in range(len(keep)) for li in range(n_layers)]

    last = len(keep) - 1
    def steps_for(q: int) -> list[dict[str, Any]]:
        return [
            {"method": "update", "label": str(layer), "args": [{"visible": visible(q, layer)}]}
            for layer in range(n_layers)
        ]

    # The menu shows a position after the last layer and re-targets the slider's steps at it.
    buttons = [
        {
            "method": "update",
            "label": labels[q],
            "args": [
                {"visible": visible(q, n_layers - 1)},
                {
                    "sliders[0].steps": steps_for(q),
                    "sliders[0].active": n_layers - 1,
                    "title.text": f"ALTI rollout of position {labels[q]}",
                },
            ],
        }
        for q in range(len(keep))
    ]
    steps = steps_for(last)
    fig.update_layout(
        title=f"ALTI rollout of position {labels[last]}",
        yaxis={"title": "contribution", "range": [0, float(roll.max()) * 1.05 or 1.0]},
        showlegend=False,
        updatemenus=[_menu(buttons, active=last)],
        sliders=[_slider(steps, "after layer ")],
    )
    return fig
