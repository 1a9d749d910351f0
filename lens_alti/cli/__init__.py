"""The `lens-alti` command line: `main.py` (the parser and dispatch, `main`), `explain.py` (`explain`),
`demo.py` (`demo`), `cite.py` (`cite`, context attribution) and `corpus.py` (`run`, the corpus runner)."""

from lens_alti.cli.main import main

__all__ = ["main"]
