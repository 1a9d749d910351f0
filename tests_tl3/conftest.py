"""Tests of lens_alti on TransformerLens 3.x models, run in the second environment (.venv-tl3).

`bash scripts/setup_tl3.sh && .venv-tl3/bin/python -m pytest -q tests_tl3`
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import transformer_lens  # noqa: E402

if not hasattr(transformer_lens, "HookedTransformer"):  # pragma: no cover - wrong environment
    pytest.exit(
        "tests_tl3 needs TransformerLens 3.x (HookedTransformer); run them with .venv-tl3/bin/python "
        "after `bash scripts/setup_tl3.sh`",
        returncode=4,
    )
