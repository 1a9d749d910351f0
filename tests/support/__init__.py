"""Test support, never imported by the library: tiny models, float64 references, the architecture sweep.

- `models`, `mixer_models`, `tokenizer`: tiny random models built from configs (no download);
- `reference*`: independent dense float64 implementations written from docs/spec*.md;
- `architecture_sweep`: every bridge architecture through `attribute` (`python -m tests.support.architecture_sweep`).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
