"""`lens-alti build-kernels`: builds the native CPU kernels ahead of time, or reports the existing build."""

from __future__ import annotations

import pytest

from lens_alti.alti import native
from lens_alti.cli import main


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """An empty lens_alti cache folder; nothing loaded or tried in this process."""
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    monkeypatch.delenv("LENS_ALTI_NO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    return tmp_path


def test_build_kernels_builds_then_reports_the_build(empty_cache, capsys):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    path = native.library_path(native._compiler())
    assert path.is_file() and path.parent == empty_cache / "kernels"
    assert out.startswith("native CPU kernels built in ") and out.strip().endswith(str(path))
    assert main(["build-kernels"]) == 0
    assert capsys.readouterr().out.strip() == f"native CPU kernels already built: {path}"


def test_build_kernels_without_a_compiler(empty_cache, monkeypatch, capsys):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert main(["build-kernels"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens-alti: error: ") and "no C compiler (gcc, cc or clang) on PATH" in err
    assert not (empty_cache / "kernels").exists()


def test_build_kernels_when_disabled(empty_cache, monkeypatch, capsys):
    monkeypatch.setenv("LENS_ALTI_NO_NATIVE", "1")
    assert main(["build-kernels"]) == 2
    assert "LENS_ALTI_NO_NATIVE is set" in capsys.readouterr().err


def test_build_kernels_when_the_compiler_fails(empty_cache, monkeypatch, tmp_path, capsys):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    bad = tmp_path / "_native.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    assert main(["build-kernels"]) == 2
    err = capsys.readouterr().err
    assert err.count("lens-alti: error: ") == 1
    assert "the native kernels could not be built" in err and "failed" in err
