"""Figures of a context attribution (lens_alti.viz.context) and the report's `Html` item."""

from __future__ import annotations

import pytest

import lens_alti
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError
from lens_alti.viz.context import context_figure, context_html
from lens_alti.viz.report import Html, write_report
from tests.support.context_model import copy_bridge
from tests.support.errors import raises_exactly

CONTEXT = "w1 w2 w3 . w4 w5 .\n\nw6 w7 paris w8 . w9 w10 .\n\nw11 w12 w13 . w14 ."


@pytest.fixture(scope="module")
def result():
    _, model = copy_bridge()
    return lens_alti.context_attribution(model, CONTEXT, "where is it ?", "paris", units="sentence")


def test_figure_has_one_shaded_row_per_unit(result):
    fig = context_figure(result, width=30, max_lines=1)
    heat = fig.data[0]
    assert [row[0] for row in heat.z] == pytest.approx(result.scores.tolist())
    assert heat.zmid == 0 and heat.zmax == pytest.approx(float(result.scores.abs().max()))
    assert [row[0] for row in heat.text] == [" ".join(u.split()) for u in result.units]
    assert "rank 1" in heat.customdata[2][0] and "paris" in fig.layout.title.text


def test_html_shades_each_unit_and_keeps_the_text(result):
    page = context_html(result)
    assert page.count("<span") == result.n_units and "<br><br>" in page
    top = max(range(result.n_units), key=lambda u: float(result.scores[u]))
    assert f"rgba(43,108,176,0.850)\" title=\"unit {top}, rank 1" in page


def test_report_takes_html(result, tmp_path):
    out = write_report(tmp_path / "r.html", "t", [("Context", [Html(context_html(result)), context_figure(result)])])
    text = out.read_text()
    assert "<span style=\"background:rgba(43,108,176" in text and 'class="plotly-graph-div"' in text


def test_errors(result):
    raises_exactly(ArgumentTypeError, "result", context_figure, "x")
    raises_exactly(ArgumentTypeError, "result", context_html, None)
    raises_exactly(InvalidArgumentError, "width", context_figure, result, width=5)
    raises_exactly(InvalidArgumentError, "max_lines", context_figure, result, max_lines=0)
