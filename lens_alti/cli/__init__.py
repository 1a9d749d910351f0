"""The `lens-alti` command line: `explain`, `demo` and `run` (the corpus runner, `corpus.py`)."""

from lens_alti.cli.main import main

__all__ = ["main"]
