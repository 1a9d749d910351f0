"""`lens_alti.paths`: the cache locations, read from the environment and never written to it."""

from __future__ import annotations

import os
import pathlib

from lens_alti import paths
from lens_alti.models import pretrained


def test_cache_root_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "explicit"
    monkeypatch.setenv("LENS_ALTI_CACHE", "")  # empty counts as unset
    assert paths.cache_root() == tmp_path / "xdg" / "lens_alti"
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert paths.cache_root() == tmp_path / "home" / "xdg" / "lens_alti"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("LENS_ALTI_CACHE", "~/mine")
    assert paths.cache_root() == tmp_path / "home" / "mine"
    monkeypatch.delenv("LENS_ALTI_CACHE")
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "lens_alti"
    assert pretrained._cache_root() == paths.cache_root()  # the model loader's folder is the same one


def test_subfolders_read_but_never_write(monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path / "cache"))
    before = dict(os.environ)
    assert paths.kernels_dir() == tmp_path / "cache" / "kernels"
    assert paths.torchinductor_dir() == tmp_path / "cache" / "torchinductor"
    assert dict(os.environ) == before
    assert not (tmp_path / "cache").exists()  # nothing created
    assert isinstance(paths.cache_root(), pathlib.Path)
