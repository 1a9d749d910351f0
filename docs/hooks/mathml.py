"""MkDocs hook: render the pages' TeX (pymdownx.arithmatex, generic mode) to MathML at build time.

Browsers draw MathML natively, so the site needs no MathJax download and works offline.
A formula latex2mathml cannot convert fails the build (strict), naming the page.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_SPAN = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.S)
_DIV = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.S)


def _mathml(tex: str, display: str, page: Any) -> str:
    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as err:  # latex2mathml raises several exception types
        raise ValueError(f"{page.file.src_path}: cannot convert the formula {tex!r} to MathML: {err}") from err


def on_page_content(content: str, page: Any, **_: Any) -> str:
    content = _DIV.sub(lambda m: _mathml(m.group(1), "block", page), content)
    return _SPAN.sub(lambda m: _mathml(m.group(1), "inline", page), content)
