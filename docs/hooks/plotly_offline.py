"""MkDocs hook: the notebooks' plotly figures load plotly.js from the site, not from a CDN.

The executed notebooks store each figure as HTML that loads plotly.js (and MathJax) from
cdn.plot.ly / cdnjs. This hook points those pages at a copy of the plotly.min.js that ships in
the installed plotly package, written to `assets/javascripts/plotly.min.js` after the build, so
the figures draw offline (and with the plotly.js version the figures were made with).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.utils import get_relative_url

TARGET = "assets/javascripts/plotly.min.js"
_PLOTLY_CDN = re.compile(
    r'src="https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js"( integrity="[^"]*")?( crossorigin="[^"]*")?'
)
_PLOTLY_MODULE = re.compile(r'<script type="module">import "https://cdn\.plot\.ly/plotly-[\d.]+\.min"</script>')
_MATHJAX_CDN = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]*"></script>')


def on_page_content(content: str, page: Any, **_: Any) -> str:
    if "cdn.plot.ly" not in content:
        return content
    local = get_relative_url(TARGET, page.url)
    content = _PLOTLY_CDN.sub(f'src="{local}"', content)
    content = _PLOTLY_MODULE.sub("", content)
    return _MATHJAX_CDN.sub("", content)


def on_post_build(config: Any, **_: Any) -> None:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = Path(config["site_dir"]) / TARGET
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
