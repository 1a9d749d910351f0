#!/usr/bin/env bash
# The whole test run, as CI does it: set up both environments, lint, type-check, build the docs, run every test.
#   main environment (.venv): TransformerLens 4.x bridges, notebooks, real weights (requirements/main.lock);
#   second environment (.venv-tl3): TransformerLens 3.9 HookedTransformer-family caches (requirements/tl3.lock).
#   bash scripts/test.sh [pytest args]            the pinned environments (what CI runs)
#   bash scripts/test.sh --latest [pytest args]   the drift check: the same run in .venv-latest and
#       .venv-tl3-latest, built unpinned from the newest versions the registries serve today
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
mode=""
if [ "${1:-}" = "--latest" ]; then mode="--latest"; shift; fi
VENV=.venv; VENV3=.venv-tl3
if [ -n "$mode" ]; then VENV=.venv-latest; VENV3=.venv-tl3-latest; export LENS_ALTI_UNPINNED=1; fi
bash scripts/setup.sh $mode
if [ -n "$mode" ]; then
    echo "== newest versions in $VENV:"
    "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE "^(torch|transformers|transformer-lens|einops|jaxtyping|tqdm|safetensors|networkx|pandas|plotly|mkdocs|mkdocs-material|mkdocstrings|ruff|mypy)==" || true
fi
# A headless browser for tests/viz/test_report_browser.py (Debian's chromium); that test skips, saying why, without one.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="$(command -v sudo || true)"
    if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
fi
"$VENV/bin/python" -m ruff check lens_alti tests tests_tl3 benchmarks examples notebooks/make_notebooks.py docs/hooks docs/figures docs/execute_notebooks.py
"$VENV/bin/python" -m mypy                          # static types of lens_alti/ (configured in pyproject.toml)
NO_MKDOCS_2_WARNING=1 "$VENV/bin/python" -m mkdocs build --strict --quiet --site-dir build/site   # the docs site
LENS_ALTI_VENV="$VENV" "$VENV/bin/python" -m pytest -q "$@"
bash scripts/setup_tl3.sh $mode
LENS_ALTI_VENV="$VENV" "$VENV3/bin/python" -m pytest -q tests_tl3
