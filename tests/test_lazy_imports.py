"""`import lens_alti` loads only what `attribute` needs; the rest of the public API on first use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lens_alti


def test_every_public_name_resolves():
    for name in lens_alti.__all__:
        assert getattr(lens_alti, name) is not None, name
    assert set(lens_alti.__all__) <= set(dir(lens_alti))
    from lens_alti import Routes, load, logit_attribution  # noqa: F401  (from-imports go through __getattr__)

    assert lens_alti.api.routes is lens_alti.routes


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lens_alti.not_a_name  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lens_alti.api.not_a_name  # noqa: B018


def test_import_does_not_load_the_logit_modules():
    code = (
        "import sys, lens_alti\n"
        "lazy = ['lens_alti.prediction', 'lens_alti.prediction_routes',\n"
        "        'lens_alti.results_logit', 'lens_alti.saving']\n"
        "print([m for m in lazy if m in sys.modules])\n"
        "lens_alti.logit_attribution\n"
        "print('lens_alti.prediction' in sys.modules)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
