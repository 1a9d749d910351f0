"""Execute notebooks/*.ipynb and store the executed copies (with outputs) in docs/notebooks/.

The documentation site renders these stored outputs; `mkdocs build` never runs a notebook.
Rerun after changing a notebook (about five minutes on two CPU cores; needs the offline weights
that scripts/setup.sh installs):

    HF_HUB_OFFLINE=1 .venv/bin/python docs/execute_notebooks.py

Plotly figures are stored as plotly JSON plus HTML that loads plotly.js from its CDN, so the
notebooks stay small; the rendered pages need network access to draw them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks"
TARGET = ROOT / "docs" / "notebooks"


def main(names: list[str]) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype+notebook_connected"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    TARGET.mkdir(parents=True, exist_ok=True)
    paths = [SOURCE / n for n in names] if names else sorted(SOURCE.glob("*.ipynb"))
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as work:  # reports the notebooks write go here
            client = nbclient.NotebookClient(
                nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": work}}
            )
            client.execute()
        for cell in nb.cells:  # stderr (warnings, progress bars) is noise on a web page
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        nbformat.write(nb, TARGET / path.name)
        print(f"{path.name}: executed -> {TARGET / path.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
