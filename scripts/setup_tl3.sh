#!/usr/bin/env bash
# Create .venv-tl3 (once): lens_alti next to TransformerLens 3.x (HookedTransformer, HookedEncoder,
# HookedEncoderDecoder), for tests_tl3, at the versions of requirements/tl3.lock.
# Idempotent: a second run only checks the stamp.
#   bash scripts/setup_tl3.sh && .venv-tl3/bin/python -m pytest -q tests_tl3
#   --latest   build .venv-tl3-latest from requirements/tl3.in's ranges instead (no lock).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
latest=0
if [ "${1:-}" = "--latest" ]; then latest=1; fi
VENV=.venv-tl3
if [ $latest = 1 ]; then VENV=.venv-tl3-latest; fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.lens_alti_setup"
want="$(cat pyproject.toml scripts/setup_tl3.sh requirements/tl3.lock | sha256sum | cut -c1-16)"
if [ $latest = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }
if [ $latest = 1 ]; then
    pip install --upgrade pip
    pip install "torch==2.13.0"   # the local CPU wheel; an unpinned torch pulls a CUDA build
    pip install --upgrade --upgrade-strategy eager -r requirements/tl3.in
else
    pip install --no-deps -r requirements/tl3.lock
fi
# lens_alti itself without its dependency list (which asks for transformer-lens>=4.3); its light
# dependencies are in requirements/tl3.in.
pip install --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import transformer_lens, lens_alti; assert hasattr(transformer_lens, 'HookedTransformer')"
echo "$want" > "$stamp"
