#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (main environment) and requirements/tl3.in
# (TransformerLens 3.x environment) with pip-tools, at the newest versions the registries serve today.
#   bash scripts/lock.sh            then: bash scripts/test.sh, and commit requirements/*.lock
# The locks are resolved for CPython 3.11 on Linux x86_64 (the CI machines), with torch's CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-lock/bin/pip-compile ]; then
    "$PY" -m venv .venv-lock
    .venv-lock/bin/python -m pip install --quiet --disable-pip-version-check "pip-tools==7.7.0"
fi
compile() { .venv-lock/bin/pip-compile --quiet --upgrade --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links "$@"; }
compile --all-extras --output-file requirements/main.lock pyproject.toml requirements/main.in
compile --output-file requirements/tl3.lock requirements/tl3.in
echo "wrote requirements/main.lock and requirements/tl3.lock"
