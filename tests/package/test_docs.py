"""The documentation site's executed notebooks are copies of notebooks/ (not stale, not edited by hand).

`mkdocs build --strict` (in scripts/test.sh) checks the rest: pages, links and API references.
"""

from __future__ import annotations

import json
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
