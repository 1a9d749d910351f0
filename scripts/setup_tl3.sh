#!/usr/bin/env bash
# Create .venv-tl3 (once): lens_alti next to TransformerLens 3.x (HookedTransformer, HookedEncoder,
# HookedEncoderDecoder), for tests_tl3. Idempotent: a second run only checks the stamp.
#   bash scripts/setup_tl3.sh && .venv-tl3/bin/python -m pytest -q tests_tl3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-tl3
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.lens_alti_setup"
want="$(cat pyproject.toml scripts/setup_tl3.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }
pip install --upgrade pip
# torch first and pinned: here 2.13.0 is a local CPU wheel; an unpinned torch pulls a CUDA build.
pip install "torch==2.13.0"
# 3.9.0 is the last 3.x; it needs transformers>=5.9 (resolves to the same 5.x as .venv).
pip install "transformer-lens==3.9.0" "pytest>=7" "hypothesis>=6"
# lens_alti itself without its dependency list (which asks for transformer-lens>=4.3), then its light deps.
pip install --no-deps -e .
pip install "einops>=0.7" "jaxtyping>=0.2.25" "tqdm>=4.60"
"$VENV/bin/python" -c "import transformer_lens, lens_alti; assert hasattr(transformer_lens, 'HookedTransformer')"
echo "$want" > "$stamp"
