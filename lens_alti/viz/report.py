"""Self-contained HTML reports: plotly figures (plotly.js embedded once) and tables."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1a202c; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #cbd5e0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #cbd5e0; padding: 3px 8px; text-align: right; }
th { background: #edf2f7; } .note { color: #4a5568; font-size: 0.92em; }
pre { background: #f7fafc; padding: 0.6em; overflow-x: auto; }
"""


class Html:
    """Markup to put into a report as it is (trusted HTML, e.g. `lens_alti.viz.context.context_html`)."""

    def __init__(self, markup: str) -> None:
        self.markup = str(markup)


def table_html(rows: Any, float_format: str = "{:.4f}") -> str:
    """HTML of a pandas DataFrame or a list of dicts."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return frame.to_html(index=False, float_format=float_format.format, border=0, escape=True)


def write_report(
    path: str | Path,
    title: str,
    sections: Sequence[tuple[str, Sequence[Any]]],
    *,
    notes: str = "",
) -> Path:
    """Write an HTML report. `sections`: (heading, items); an item is a plotly Figure, a
    pandas DataFrame, a string (inserted as escaped text in a paragraph) or an `Html` (inserted as it is)."""
    import pandas as pd

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f'<p class="note">{html.escape(notes)}</p>')
    first_figure = True
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, Html):
                parts.append(item.markup)
            elif isinstance(item, str):
                parts.append(f"<p>{html.escape(item)}</p>")
            elif isinstance(item, pd.DataFrame):
                parts.append(table_html(item))
            elif hasattr(item, "to_html"):
                parts.append(item.to_html(full_html=False, include_plotlyjs=first_figure))
                first_figure = False
            else:
                from lens_alti.errors import ArgumentTypeError

                raise ArgumentTypeError(
                    "sections", item, f"figures, DataFrames or strings (cannot put a {type(item).__name__} in a report)"
                )
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    out = Path(path)
    out.write_text(doc, encoding="utf-8")
    return out
