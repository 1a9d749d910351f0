"""Plotly figures of ALTI results. Needs the `plot` extra (`pip install lens-alti[plot]`).

Every function returns a `plotly.graph_objects.Figure`; `fig.write_html(path)` embeds
plotly.js, so the file works offline.
"""

from __future__ import annotations

from typing import Any

from lens_alti.errors import InvalidArgumentError
from lens_alti.results import AltiResult, Seq2SeqAltiResult
from lens_alti.validation import check_index, check_position, check_type

_SCALE = "Blues"


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lens_alti.viz.plotting needs plotly: pip install 'lens-alti[plot]'") from exc
    return go


def _labels(result: AltiResult, batch: int) -> tuple[list[int], list[str]]:
    """Indices of real (unpadded) positions and their labels, made unique for plotly axes."""
    keep = [i for i, m in enumerate(result.attention_mask[batch].tolist()) if m]
    toks = result.str_tokens[batch] if result.str_tokens is not None else [str(i) for i in range(len(keep))]
    return keep, [f"{i}: {toks[i]!r}" if result.str_tokens is not None else str(i) for i in keep]


def _layer_index(n_layers: int, layer: int) -> int:
    return check_index("layer", layer, n_layers, what="layers")


def _checked(result: Any, batch: int, cls: type = AltiResult) -> int:
    """Check the result's type and the batch index (returned non-negative)."""
    what = "an AltiResult (for an encoder-decoder: result.encoder)" if cls is AltiResult else "a Seq2SeqAltiResult"
    check_type("result", result, cls, what)
    mask = result.attention_mask if cls is AltiResult else result.target_mask
    return check_index("batch", batch, mask.shape[0], what="batch items")


def token_heatmap(result: AltiResult, layer: int = -1, *, batch: int = 0, rollout: bool = False) -> Any:
    """Receivers (rows) x sources (columns) contributions of one layer, or the rollout after it."""
    go = _go()
    batch = _checked(result, batch)
    layer = _layer_index(result.n_layers, layer)
    keep, labels = _labels(result, batch)
    mat = (result.rollout if rollout else result.layers)[batch, layer][keep][:, keep]
    kind = "rollout" if rollout else "layer contributions"
    fig = go.Figure(
        go.Heatmap(
            z=mat.tolist(), x=labels, y=labels, colorscale=_SCALE, zmin=0,
            hovertemplate="receiver %{y}<br>source %{x}<br>%{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"ALTI {kind}, layer {layer} ({result.measure})",
        xaxis_title="source token", yaxis_title="receiver position", yaxis_autorange="reversed",
        width=max(500, 28 * len(keep) + 250), height=max(450, 28 * len(keep) + 200),
    )
    return fig


def rollout_heatmap(result: AltiResult, layer: int = -1, *, batch: int = 0) -> Any:
    """The rollout matrix after `layer` (default the last): how much each input token reaches each position."""
    return token_heatmap(result, layer, batch=batch, rollout=True)


def head_heatmap(result: AltiResult, position: int = -1, *, batch: int = 0) -> Any:
    """Layer x head share of each head's output in its block, for one receiver (needs heads=True)."""
    go = _go()
    batch = _checked(result, batch)
    if result.head_outputs is None:
        raise InvalidArgumentError(
            "result", result, "a result with per-head contributions: call lens_alti.attribute(cache, heads=True)"
        )
    keep, labels = _labels(result, batch)
    pos = check_position("position", position, result.attention_mask[batch], where=f"batch item {batch}")
    share = result.head_outputs[batch, :, :, result.row_of(pos, batch)]
    fig = go.Figure(
        go.Heatmap(
            z=share.tolist(),
            x=[f"H{h}" for h in range(share.shape[1])],
            y=[f"L{layer}" for layer in range(share.shape[0])],
            colorscale=_SCALE,
            zmin=0,
            hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>",
        )
    )
    label = labels[keep.index(pos)] if pos in keep else str(pos)
    fig.update_layout(
        title=f"Head contributions to position {label}", xaxis_title="head", yaxis_title="layer",
        yaxis_autorange="reversed", height=max(400, 18 * share.shape[0] + 150),
    )
    return fig


def saliency_bar(result: AltiResult, position: int = -1, *, batch: int = 0, layer: int = -1) -> Any:
    """Bar chart of one rollout row: each input token's share in `position` after `layer`."""
    go = _go()
    batch = _checked(result, batch)
    keep, labels = _labels(result, batch)
    pos = check_position("position", position, result.attention_mask[batch], where=f"batch item {batch}")
    row = result.rollout[batch, _layer_index(result.n_layers, layer), result.row_of(pos, batch)][keep]
    sinks = set() if result.sinks is None else set(result.sinks[batch].nonzero().flatten().tolist())
    colours = ["#a0aec0" if i in sinks else "#2b6cb0" for i in keep]  # attention sinks grey (docs/spec.md §10)
    shown = [f"{x} (sink)" if i in sinks else x for i, x in zip(keep, labels, strict=True)]
    bar = go.Bar(x=shown, y=row.tolist(), marker_color=colours, hovertemplate="%{x}: %{y:.4f}<extra></extra>")
    fig = go.Figure(bar)
    note = ""
    if sinks:
        share = float(row[[keep.index(i) for i in sorted(sinks)]].sum())
        note = f"<br>grey: attention sink, {share:.3f} of the position, shown apart (not content)"
    fig.update_layout(title=f"ALTI rollout for position {labels[keep.index(pos)]}{note}", yaxis_title="contribution")
    return fig


def source_target_split(result: Seq2SeqAltiResult, *, batch: int = 0) -> Any:
    """Stacked bars of each target token's source vs target-prefix share, plus the ALTI+ total heatmap."""
    go = _go()
    from plotly.subplots import make_subplots

    batch = _checked(result, batch, Seq2SeqAltiResult)

    s_keep = [i for i, m in enumerate(result.source_mask[batch].tolist()) if m]
    t_keep = [i for i, m in enumerate(result.target_mask[batch].tolist()) if m]
    src = result.source_str_tokens[batch] if result.source_str_tokens else [str(i) for i in range(max(s_keep) + 1)]
    tgt = result.target_str_tokens[batch] if result.target_str_tokens else [str(i) for i in range(max(t_keep) + 1)]
    t_labels = [f"{i}: {tgt[i]!r}" for i in t_keep]
    s_len = result.source_mask.shape[-1]
    cols = s_keep + [s_len + i for i in t_keep]
    x_labels = [f"src {src[i]!r}" for i in s_keep] + [f"tgt {tgt[i]!r}" for i in t_keep]
    total = result.total[batch, -1][t_keep][:, cols]
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.35, 0.65], subplot_titles=("source vs target prefix", "ALTI+ total")
    )
    for name, share in (("source", result.source_contribution), ("target prefix", result.target_contribution)):
        fig.add_trace(go.Bar(y=t_labels, x=share[batch, t_keep].tolist(), name=name, orientation="h"), 1, 1)
    fig.add_trace(go.Heatmap(z=total.tolist(), x=x_labels, y=t_labels, colorscale=_SCALE, zmin=0, showscale=True), 1, 2)
    fig.update_layout(
        barmode="stack",
        title="Where each prediction takes its information from",
        height=max(400, 30 * len(t_keep) + 200),
    )
    fig.update_yaxes(autorange="reversed")
    return fig
