"""Figures of a context attribution (`lens_alti.context_attribution`, docs/spec.md §13).

- `context_figure(result)`: a plotly figure, one row per unit of the context in the text's order,
  each shaded by its score (blue raises the response's log-probability, red lowers it), the
  unit's text written in its row and in full on hover;
- `context_html(result)`: the context as HTML, each unit's characters shaded by its score, for
  the HTML report (`lens_alti.viz.report.Html`) or any page.
"""

from __future__ import annotations

import html
import textwrap
from typing import Any

from lens_alti.results.context import ContextAttribution
from lens_alti.validation import check_size, check_type
from lens_alti.viz.explain import _go

_RGB_POS, _RGB_NEG = (43, 108, 176), (197, 48, 48)  # the blue and red of the other figures


def _limit(result: ContextAttribution) -> float:
    return max(float(result.scores.abs().max()) if result.n_units else 0.0, 1e-12)


def _title(result: ContextAttribution) -> str:
    response = result.response if len(result.response) <= 60 else result.response[:57] + "..."
    return (
        f"Context attribution of the response {response!r} (log p = {result.response_log_prob:.3f}): "
        f"{result.n_units} units ({result.unit_kind})"
    )


def context_figure(result: ContextAttribution, *, width: int = 100, max_lines: int = 3) -> Any:
    """The units of the context, one row each in the text's order, shaded by score (ALTI-Logit of the
    response's log-probability): blue raises it, red lowers it. Each row shows up to `max_lines`
    lines of `width` characters of its unit; hover shows the whole unit, its rank and its score."""
    go = _go()
    check_type("result", result, ContextAttribution, "a ContextAttribution (from lens_alti.context_attribution)")
    width, max_lines = check_size("width", width, minimum=20), check_size("max_lines", max_lines)
    rank = {u: r + 1 for r, u in enumerate(result.ranking())}
    shown, hover = [], []
    for u, text in enumerate(result.units):
        lines = textwrap.wrap(" ".join(text.split()), width) or [""]
        cut = lines[:max_lines]
        if len(lines) > max_lines:
            cut[-1] = cut[-1][: width - 1] + "…"
        shown.append("<br>".join(html.escape(line) for line in cut))
        full = "<br>".join(html.escape(line) for line in textwrap.wrap(" ".join(text.split()), 80)[:12])
        hover.append(f"unit {u} (rank {rank[u]}): {float(result.scores[u]):+.4f}<br>{full}")
    lim = _limit(result)
    scores = result.scores.tolist()
    fig = go.Figure(
        go.Heatmap(
            z=[[s] for s in scores], x=["score"], y=[f"unit {u}" for u in range(result.n_units)],
            text=[[t] for t in shown], texttemplate="%{text}", textfont={"size": 11},
            customdata=[[h] for h in hover], hovertemplate="%{customdata}<extra></extra>",
            colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, ygap=2, colorbar={"title": "score"},
        )
    )
    line_height = 15 * min(max_lines, max(s.count("<br>") + 1 for s in shown)) + 8
    fig.update_layout(
        title=_title(result), yaxis_autorange="reversed", xaxis_visible=False,
        height=max(300, line_height * result.n_units + 160), width=max(700, 7 * width + 250),
    )
    return fig


def _shade(score: float, lim: float) -> str:
    r, g, b = _RGB_POS if score >= 0 else _RGB_NEG
    return f"rgba({r},{g},{b},{0.85 * min(1.0, abs(score) / lim):.3f})"


def context_html(result: ContextAttribution) -> str:
    """The context as an HTML fragment: each unit's text shaded by its score (blue raises the
    response's log-probability, red lowers it; the strongest unit is darkest), with its rank and
    score on hover; the text outside the units is left plain. Line breaks are kept."""
    check_type("result", result, ContextAttribution, "a ContextAttribution (from lens_alti.context_attribution)")
    lim = _limit(result)
    rank = {u: r + 1 for r, u in enumerate(result.ranking())}
    parts, pos = [], 0
    for u, (a, b) in enumerate(result.spans.tolist()):
        parts.append(html.escape(result.context[pos:a]))
        score = float(result.scores[u])
        parts.append(
            f'<span style="background:{_shade(score, lim)}" title="unit {u}, rank {rank[u]}: {score:+.4f}">'
            f"{html.escape(result.context[a:b])}</span>"
        )
        pos = b
    parts.append(html.escape(result.context[pos:]))
    body = "".join(parts).replace("\n", "<br>")
    head = (
        f"<p><b>Query:</b> {html.escape(result.query)}<br><b>Response:</b> {html.escape(result.response)} "
        f"(log p = {result.response_log_prob:.3f})</p>"
    )
    return f'{head}<div class="context" style="line-height:1.6">{body}</div>'
