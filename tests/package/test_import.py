"""`import lens_alti`: every public name resolves, and importing loads none of the optional heavy libraries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lens_alti
from tests.support import ROOT


def test_every_public_name_resolves():
    for name in lens_alti.__all__:
        assert getattr(lens_alti, name) is not None, name
    assert set(lens_alti.__all__) <= set(dir(lens_alti))
    from lens_alti.api import logit_attribution, routes

    assert routes is lens_alti.routes and logit_attribution is lens_alti.logit_attribution
    assert lens_alti.api.attribute is lens_alti.attribute  # the function, not its module


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lens_alti.not_a_name  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lens_alti.api.not_a_name  # noqa: B018


def test_import_does_not_load_optional_heavy_libraries():
    """pandas, networkx, plotly, safetensors and tqdm's notebook machinery load on first use only."""
    code = (
        "import sys, lens_alti\n"
        "heavy = ['pandas', 'networkx', 'plotly', 'safetensors', 'matplotlib', 'datasets']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
