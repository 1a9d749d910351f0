"""Fast checks of the release metadata (the slow tests/package/test_wheel.py builds and installs the wheel)."""

from __future__ import annotations

import re

import pytest

import lens_alti
from tests.support import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+



def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_has_one_source() -> None:
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lens_alti.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lens_alti.__version__)


def test_changelog_starts_with_this_release() -> None:
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert releases and releases[0] == lens_alti.__version__, releases


def test_license_matches_the_metadata() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "lens_alti developers" in text


def test_package_data_globs_match_the_shipped_files() -> None:
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["lens_alti"] and (ROOT / "lens_alti" / "py.typed").is_file()
    model_dir = ROOT / "lens_alti" / "models" / "toy_translation"
    shipped = {p.name for pattern in package_data["lens_alti.models.toy_translation"] for p in model_dir.glob(pattern)}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= shipped, shipped
