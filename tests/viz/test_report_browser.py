"""The HTML report drawn by a real headless browser (Debian's chromium), offline.

Skips (with the reason) when no chromium is installed; scripts/test.sh installs it in CI.
The browser loads the file with every network request refused, runs plotly.js from the file
itself, and dumps the DOM after the scripts ran: the test then counts what plotly drew.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

import lens_alti
from lens_alti.viz import explain, plotting
from lens_alti.viz.report import write_report
from tests.support.models import build_bridge

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None,
    reason="no headless browser: install Debian's chromium (apt-get install -y chromium; scripts/test.sh does it)",
)


def rendered_dom(path, tmp_path) -> str:
    """The DOM of `path` after chromium ran its scripts (network disabled: the file must be self-contained)."""
    cmd = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=20000", "--dump-dom", path.resolve().as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def count(dom: str, cls: str) -> int:
    return len(re.findall(rf'class="{re.escape(cls)}"', dom))


TOKENS = torch.randint(4, 1000, (1, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def cache():
    model = build_bridge("gpt2", seed=7)[1]
    return model.run_with_cache(TOKENS)[1]


@pytest.fixture(scope="module")
def result(cache):
    return lens_alti.attribute(cache, heads=True, tokens=TOKENS)


@needs_browser
def test_report_draws_every_plot_offline(result, tmp_path):
    figs = [
        plotting.saliency_bar(result, -1),
        plotting.rollout_heatmap(result),
        plotting.head_heatmap(result, -1),
        explain.rollout_position_picker(result),
    ]
    out = write_report(tmp_path / "report.html", "browser check", [("plots", figs), ("text", ["hello"])])
    html = out.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html), "plotly.js must be inline, not loaded from a URL"
    dom = rendered_dom(out, tmp_path)
    assert count(dom, "plot-container plotly") == 4, "every figure got a plotly container"
    assert count(dom, "main-svg") >= 8, "plotly drew its SVG layers for each figure"
    assert count(dom, "trace bars") >= 2, "the bar charts drew their bars"
    assert count(dom, "hm") == 2, "both heatmaps drew their image"
    assert count(dom, "slider-container") == 1 and count(dom, "updatemenu-container") == 1
    # The bar chart's bars are real SVG paths with a non-zero height.
    heights = [abs(float(h)) for h in re.findall(r'class="point"><path d="M[\d.]+,[\d.]+V([\d.]+)', dom)]
    assert heights, "no bar was drawn"


@needs_browser
def test_a_broken_figure_would_be_seen(tmp_path):
    """The check can fail: a page whose plotly.js is missing draws nothing."""
    out = tmp_path / "broken.html"
    out.write_text("<html><body><div class='plotly-graph-div' id='x'></div><script>Plotly.newPlot('x', [])</script>")
    dom = rendered_dom(out, tmp_path)
    assert count(dom, "main-svg") == 0


@needs_browser
def test_prediction_figures_draw(cache, tmp_path):
    attr = lens_alti.logit_attribution(cache, 7, 9, tokens=TOKENS)
    graph = lens_alti.routes(cache, -1, target=7, contrast=9, tokens=TOKENS, threshold=0.02)
    assert len(graph.edges) > 0
    figs = [
        explain.logit_token_bar(attr),
        explain.head_totals_heatmap(attr),
        explain.routes_figure(graph),
    ]
    out = write_report(tmp_path / "prediction.html", "prediction", [("plots", figs)])
    dom = rendered_dom(out, tmp_path)
    assert count(dom, "plot-container plotly") == 3
    assert count(dom, "trace bars") >= 1 and count(dom, "hm") == 1
    assert count(dom, "slider-container") == 1, "the layer slider of the token bar"
    assert len(re.findall(r'class="trace scatter ', dom)) >= 3, "routes: edges, edge midpoints and nodes"
    # plotly draws each edge of the routes graph as its own line path.
    assert count(dom, "js-line") == len(graph.edges)


@needs_browser
def test_position_menu_and_layer_slider_work_in_the_browser(result, tmp_path):
    """Pick position 1 in the menu, then layer 0 on the slider, by running the commands the
    menu entry and the slider step hold (Plotly.update, what their clicks run): exactly that
    bar chart shows, and the menu re-targeted the slider at position 1."""
    fig = explain.rollout_position_picker(result)
    out = write_report(tmp_path / "picker.html", "picker", [("plots", [fig])])
    script = """<script>window.addEventListener('load', function () {
      var gd = document.querySelector('.plotly-graph-div');
      var button = gd.layout.updatemenus[0].buttons[1];
      Plotly.update(gd, button.args[0], button.args[1]).then(function () {
        var step = gd.layout.sliders[0].steps[0];
        return Plotly.update(gd, step.args[0], step.args[1]);
      }).then(function () {
        var shown = [];
        gd.data.forEach(function (t, i) { if (t.visible === true) shown.push(i); });
        document.body.setAttribute('data-shown', shown.join(','));
        document.body.setAttribute('data-title', gd.layout.title.text);
      });
    });</script>"""
    out.write_text(out.read_text().replace("</body>", script + "</body>"))
    dom = rendered_dom(out, tmp_path)
    n_layers = result.n_layers
    shown = re.search(r'data-shown="([\d,]*)"', dom)
    assert shown, "the clicks did not run"
    assert shown.group(1) == str(1 * n_layers + 0), "position 1 after layer 0 is the only bar chart shown"
    assert "ALTI rollout of position 1:" in re.search(r'data-title="([^"]*)"', dom).group(1)
    assert count(dom, "trace bars") == 1
