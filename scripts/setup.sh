#!/usr/bin/env bash
# Create .venv (once) with lens_alti, its test tools and the offline pretrained weights, at the exact
# versions of requirements/main.lock (regenerate it with scripts/lock.sh).
# Idempotent: a second run only checks that everything is installed.
#   --latest   build .venv-latest instead, from pyproject.toml's ranges at the newest versions the
#              registries serve today (no lock): the drift check of `scripts/test.sh --latest`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
latest=0
if [ "${1:-}" = "--latest" ]; then latest=1; fi
VENV=.venv
if [ $latest = 1 ]; then VENV=.venv-latest; fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.lens_alti_setup"
want="$(cat pyproject.toml scripts/setup.sh requirements/main.lock requirements/no-deps.txt | sha256sum | cut -c1-16)"
if [ $latest = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }
if [ $latest = 1 ]; then
    pip install --upgrade pip
    # torch first and pinned: here 2.13.0 is a local CPU wheel; an unpinned torch pulls a CUDA build.
    pip install "torch==2.13.0"
    pip install --upgrade --upgrade-strategy eager -e ".[test,pretrained,plot,inseq,docs,dev]"
else
    # Every package at the lock's version and nothing resolved here (--no-deps): the lock is complete.
    # Its torch is the CPU build (2.13.0+cpu); off this workplace's machines, which carry that wheel,
    # set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
    pip install --no-deps -r requirements/main.lock
    pip install --no-deps --no-build-isolation -e .
fi
# Installed without their metadata's dependencies, at fixed versions (see requirements/no-deps.txt).
pip install --no-deps -r requirements/no-deps.txt
echo "$want" > "$stamp"
