#!/usr/bin/env bash
# The whole test run, as CI does it: set up both environments, lint, run every test.
#   main environment (.venv): TransformerLens 4.3 bridges, notebooks, real weights;
#   second environment (.venv-tl3): TransformerLens 3.9 HookedTransformer-family caches.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
bash scripts/setup.sh
# A headless browser for tests/test_report_browser.py (Debian's chromium); that test skips, saying why, without one.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="$(command -v sudo || true)"
    if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
fi
.venv/bin/python -m ruff check lens_alti tests tests_tl3 benchmarks examples notebooks/make_notebooks.py docs/hooks docs/figures docs/execute_notebooks.py
.venv/bin/python -m mypy                          # static types of lens_alti/ (configured in pyproject.toml)
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --quiet --site-dir build/site   # the docs site
.venv/bin/python -m pytest -q "$@"
bash scripts/setup_tl3.sh
.venv-tl3/bin/python -m pytest -q tests_tl3
