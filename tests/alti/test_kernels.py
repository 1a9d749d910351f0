"""The compiled (torch.compile) kernels give the eager kernels' numbers; failure falls back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import lens_alti
from lens_alti.alti import kernels
from tests.support.reference import reference_decoder_only

TOKENS = torch.randint(4, 1000, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama_run():
    from tests.support.models import build_bridge

    hf, bridge = build_bridge("llama", seed=5)
    _, cache = bridge.run_with_cache(TOKENS)
    return cache, reference_decoder_only(hf, TOKENS)


@pytest.mark.skipif(not kernels.compile_available(), reason="torch.compile disabled")
@pytest.mark.parametrize("measure", ["l1", "l2", "koba"])
def test_compiled_backend_matches_reference(llama_run, measure):
    cache, ref = llama_run
    res = lens_alti.attribute(cache, measure=measure, heads=measure == "l1", backend="compiled")
    if not kernels.compile_available():
        pytest.skip("torch.compile failed on this machine; the fallback is tested below")
    torch.testing.assert_close(res.layers.double(), ref[measure], atol=1e-5, rtol=0)
    eager = lens_alti.attribute(cache, measure=measure, heads=measure == "l1", backend="eager")
    torch.testing.assert_close(res.layers, eager.layers, atol=1e-6, rtol=0)
    if measure == "l1":
        torch.testing.assert_close(res.heads.double(), ref["heads"], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.heads, eager.heads, atol=1e-6, rtol=0)


def test_compiled_kernel_does_not_recompile_for_new_lengths():
    if not kernels.compile_available():
        pytest.skip("torch.compile unavailable")
    from torch._dynamo.utils import counters

    fn = kernels.get_kernel("l1+heads", compiled=True)
    g = torch.Generator().manual_seed(0)
    fn(*(torch.rand(s, generator=g) for s in [(3, 16), (3, 16), (2, 3, 5), (2, 5, 16)]))  # warm-up
    before = counters["stats"]["unique_graphs"]
    for c, k in [(4, 9), (7, 13), (5, 21), (9, 30)]:
        fn(*(torch.rand(s, generator=g) for s in [(c, 16), (c, 16), (2, c, k), (2, k, 16)]))
    assert counters["stats"]["unique_graphs"] == before


def test_failed_compilation_falls_back_to_eager_with_same_numbers(llama_run, monkeypatch):
    cache, _ = llama_run
    eager = lens_alti.attribute(cache, heads=True, backend="eager")

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_compile_failed", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        res = lens_alti.attribute(cache, heads=True, backend="compiled")
    torch.testing.assert_close(res.layers, eager.layers)
    torch.testing.assert_close(res.heads, eager.heads)
    assert not kernels.compile_available()


def test_bad_backend(llama_run):
    with pytest.raises(ValueError, match="backend='fast' is not valid: expected one of"):
        lens_alti.attribute(llama_run[0], backend="fast")


# --------------------------------------------------------------------------- native (C) kernels

from lens_alti.alti import backend as backend_mod  # noqa: E402
from lens_alti.alti import native  # noqa: E402

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.failure()}")


def _dense_distances(y, s, a, vo):
    """Float64, written from docs/spec.md §2/§3 directly: every part `s_i⊙a_hij·vo_hj` materialised."""
    y, s, a, vo = (t.double() for t in (y, s, a, vo))
    parts = s[None, :, None, :] * (a[..., None] * vo[:, None])  # [h, c, k, d]
    total = parts.sum(0)  # [c, k, d]
    return {
        "heads": (y[None, :, None] - parts).abs().sum(-1),
        "l1": (y[:, None] - total).abs().sum(-1),
        "l2": (y[:, None] - total).square().sum(-1).sqrt(),
        "koba": total.square().sum(-1).sqrt(),
    }


def _tile(h, c, k, d, *, dtype=torch.float32, scaled=False, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(c, d, generator=g, dtype=torch.float64)
    s = torch.rand(c, d, generator=g, dtype=torch.float64) + 0.5 if scaled else torch.ones(c, d, dtype=torch.float64)
    a = torch.rand(h, c, k, generator=g, dtype=torch.float64)
    if causal:  # receiver r sees sources j <= r + (k - c): whole zero columns at the end of early rows
        a = a.masked_fill(torch.ones(c, k, dtype=torch.bool).triu(k - c + 1), 0)
    vo = torch.randn(h, k, d, generator=g, dtype=torch.float64) / d**0.5
    return tuple(t.to(dtype) for t in (y, s, a, vo))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("h", "c", "k", "d", "scaled", "causal"),
    [
        (12, 9, 37, 768, False, True),  # GPT-2 width, two head groups (6 + 6)
        (9, 5, 20, 576, True, False),  # SmolLM2 width, scaled rows (post-norm)
        (3, 7, 7, 19, False, True),  # d not a multiple of the vector width: scalar tails
        (17, 6, 11, 40, True, True),  # three head groups (6 + 6 + 5), scaled and causal
        (1, 1, 1, 5, False, False),
    ],
)
def test_native_tile_matches_dense_reference(dtype, h, c, k, d, scaled, causal):
    y, s, a, vo = _tile(h, c, k, d, dtype=dtype, scaled=scaled, causal=causal)
    ref = _dense_distances(y, s, a, vo)
    per_head, tokens = native.tile("l1+heads", y, s, a, vo)
    assert per_head.dtype == dtype and tokens.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(per_head.double(), ref["heads"], rtol=rtol, atol=0)
    torch.testing.assert_close(tokens.double(), ref["l1"], rtol=rtol, atol=0)
    for measure in ("l1", "l2", "koba"):
        got = native.tile(measure, y, None if not scaled else s, a, vo)
        torch.testing.assert_close(got.double(), ref[measure], rtol=rtol, atol=1e-12)


@needs_native
def test_native_threads_and_strided_views_give_the_same_numbers():
    y, s, a, vo = _tile(12, 40, 300, 96, scaled=True, causal=True, seed=1)
    big_a = torch.zeros(12, 50, 320)
    big_a[:, 5:45, 10:310] = a
    big_vo = torch.zeros(12, 320, 96)
    big_vo[:, 10:310] = vo
    views = (y, s, big_a[:, 5:45, 10:310], big_vo[:, 10:310])  # non-contiguous, last dim contiguous
    one = native.tile("l1+heads", *views, threads=1)
    two = native.tile("l1+heads", y, s, a, vo, threads=2)
    for p, q in zip(one, two, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    ref = _dense_distances(y, s, a, vo)
    torch.testing.assert_close(one[0].double(), ref["heads"], rtol=1e-5, atol=0)


@needs_native
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_native_backend_matches_reference(arch):
    from tests.support.models import build_bridge

    hf, bridge = build_bridge(arch, seed=5)
    _, cache = bridge.run_with_cache(TOKENS)
    ref = reference_decoder_only(hf, TOKENS)
    for measure in ("l1", "l2", "koba"):
        res = lens_alti.attribute(cache, measure=measure, heads=measure == "l1", backend="native")
        torch.testing.assert_close(res.layers.double(), ref[measure], atol=1e-6, rtol=1e-5)
        if measure == "l1":
            torch.testing.assert_close(res.heads.double(), ref["heads"], atol=1e-6, rtol=1e-5)


def test_native_unknown_kernel():
    with pytest.raises(KeyError, match="no native kernel 'l3'"):
        native.kernel("l3")


def test_native_build_failure_falls_back_to_torch_kernels(monkeypatch, tmp_path, llama_run):
    bad = tmp_path / "_native.c"
    bad.write_text("this is not C\n")
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    assert not native.available()
    assert "failed" in native.failure()
    with pytest.raises(RuntimeError, match="native kernels unavailable"):
        native.tile("l1", *_tile(2, 3, 4, 5)[:4])
    cache, ref = llama_run
    res = lens_alti.attribute(cache, heads=True, backend="native")  # same numbers through the torch kernels
    torch.testing.assert_close(res.layers.double(), ref["l1"], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.heads.double(), ref["heads"], atol=1e-5, rtol=0)


def test_native_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LENS_ALTI_NO_NATIVE", "1")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    assert not native.possible()
    assert not native.available()
    assert native.failure() == "LENS_ALTI_NO_NATIVE is set"


def test_native_library_cached_under_lens_alti_cache(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    path = native.library_path(native._compiler())
    assert path.parent == tmp_path / "kernels"
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    assert native.available() and path.is_file()


def test_native_fallback_build_without_openmp_gives_the_same_numbers(monkeypatch, tmp_path):
    """Where the OpenMP build fails, FALLBACK_FLAGS build the pthread variant: same distances."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-fno-such-flag-lens-alti"))  # the first build fails
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    assert native.available(), native.failure()  # built with FALLBACK_FLAGS: FLAGS cannot work
    y, s, a, vo = _tile(12, 40, 300, 96, scaled=False, causal=True, seed=2)
    ref = _dense_distances(y, s, a, vo)
    for threads in (1, 2):
        per_head, tokens = native.tile("l1+heads", y, s, a, vo, threads=threads)
        torch.testing.assert_close(per_head.double(), ref["heads"], rtol=1e-5, atol=0)
        torch.testing.assert_close(tokens.double(), ref["l1"], rtol=1e-5, atol=0)


def test_native_build_reports_both_failures(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-fno-such-flag-lens-alti"))
    monkeypatch.setattr(native, "FALLBACK_FLAGS", (*native.FALLBACK_FLAGS, "-fno-such-flag-lens-alti"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    assert not native.available()
    assert "failed" in native.failure() and "no-such-flag" in native.failure()


# --------------------------------------------------------------------------- the auto cost model


def _work(elements, heads=True, blocks=30):
    return backend_mod.Work(elements, blocks, heads, torch.device("cpu"), torch.float32)


@needs_native
def test_auto_picks_native_on_cpu_when_built():
    assert backend_mod.decide(_work(10**6)).backend == "native"
    assert backend_mod.decide(_work(10**13)).backend == "native"


@needs_native
def test_auto_prefers_warm_compiled_kernels_only_where_the_model_says_they_are_faster(monkeypatch):
    monkeypatch.setattr(kernels, "compile_available", lambda: True)
    monkeypatch.setattr(kernels, "is_warm", lambda *a: True)
    big = _work(2 * 10**10)
    # the measured constants: native's rate and overhead beat compiled's, so native everywhere
    for work in (_work(10**6), big, _work(2 * 10**10, heads=False)):
        decision = backend_mod.decide(work)
        assert decision.backend == "native" and decision.estimates["compiled"] > decision.estimates["native"]
    # constants under which compiled is faster: auto follows them once compiled kernels are warm
    rates = dict(backend_mod.CPU_RATES)
    rates[("compiled", True)] = 2 * rates[("native", True)]
    monkeypatch.setattr(backend_mod, "CPU_RATES", rates)
    assert backend_mod.decide(big).backend == "compiled"
    assert backend_mod.decide(_work(10**3)).backend == "native"  # overheads decide small calls
    monkeypatch.setattr(kernels, "is_warm", lambda *a: False)  # not compiled yet: no compile cost paid for it
    assert backend_mod.decide(big).backend == "native"


@pytest.fixture
def compile_not_native(monkeypatch):
    """No native kernels; torch.compile available, nothing compiled and nothing saved yet in this process."""
    monkeypatch.setattr(native, "possible", lambda: False)
    monkeypatch.setattr(kernels, "compile_available", lambda: True)
    monkeypatch.setattr(kernels, "is_warm", lambda *a: False)
    monkeypatch.setattr(backend_mod, "_saved_s", 0.0)


def test_auto_without_native_compiles_only_when_it_pays(monkeypatch, compile_not_native):
    small, large = _work(10**8), _work(10**13)
    assert backend_mod.decide(small).backend == "eager"
    assert backend_mod.decide(large).backend == "compiled"
    # once compiled in this process there is no start-up cost left: compiled wins far earlier
    monkeypatch.setattr(kernels, "is_warm", lambda *a: True)
    mid = _work(2 * 10**10)
    assert backend_mod.estimate("compiled", mid) < backend_mod.estimate("eager", mid)
    assert backend_mod.decide(mid).backend == "compiled"


def test_auto_ski_rental_compiles_after_enough_eager_calls(monkeypatch, compile_not_native):
    work = _work(10**9)
    lost = backend_mod.estimate("eager", work) - backend_mod.estimate("compiled", work, include_start=False)
    start = backend_mod.estimate("compiled", work) - backend_mod.estimate("compiled", work, include_start=False)
    assert lost > 0
    choices = [backend_mod.decide(work).backend for _ in range(int(start / lost) + 2)]
    # eager while the lost time is below the compile cost, then compiled once (is_warm is patched
    # False here, so the counter restarts after it: in real use the kernels are warm from then on)
    assert choices[0] == "eager" and "compiled" in choices
    assert start / lost - 1 <= choices.index("compiled") <= start / lost


def test_auto_without_compiler_or_compile_is_eager(monkeypatch):
    monkeypatch.setattr(native, "possible", lambda: False)
    monkeypatch.setattr(kernels, "compile_available", lambda: False)
    assert backend_mod.decide(_work(10**13)).backend == "eager"


def test_auto_resolved_once_per_call(llama_run, monkeypatch):
    cache, ref = llama_run
    seen = []
    real = backend_mod.decide
    monkeypatch.setattr(backend_mod, "decide", lambda w: seen.append(w) or real(w))
    res = lens_alti.attribute(cache, heads=True)
    assert len(seen) == 1  # the whole call, not once per block
    assert seen[0].elements == 2 * 2 * 4 * (11 * 12 // 2) * 64  # batch x layers x heads x causal pairs x d
    torch.testing.assert_close(res.heads.double(), ref["heads"], atol=1e-5, rtol=0)


def test_compile_cache_is_persistent_under_lens_alti_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    assert kernels.compile_cache_dir() == str(tmp_path / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert kernels.compile_cache_dir() == str(tmp_path / "mine")  # the user's choice wins


def test_compiled_kernel_marks_dtype_warm():
    if not kernels.compile_available():
        pytest.skip("torch.compile unavailable")
    fn = kernels.get_kernel("l1+heads", "compiled")
    g = torch.Generator().manual_seed(0)
    fn(*(torch.rand(s, generator=g) for s in [(3, 16), (3, 16), (2, 3, 5), (2, 5, 16)]))
    if kernels.compile_available():
        assert kernels.is_warm("l1+heads", torch.float32, "cpu")


def test_native_backend_passes_unsupported_tensors_to_eager():
    y, s, a, vo = (t.half() for t in _tile(3, 4, 5, 8))
    assert not native.supports(y, s, a, vo)
    got = kernels.get_kernel("l1+heads", "native")(y.float(), s.float(), a.float(), vo.float())
    want = kernels.get_kernel("l1+heads", "native")(y, s, a, vo)  # half: eager kernels, half precision
    assert want[0].dtype == torch.float16
    torch.testing.assert_close(want[0].float(), got[0], rtol=1e-2, atol=1e-2)


def test_compile_cache_dir_reads_the_environment_without_writing_it(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    before = dict(os.environ)
    assert kernels.compile_cache_dir() == str(tmp_path / "torchinductor")
    assert dict(os.environ) == before
    # torch writes its default there itself on first use (importing dynamo): not the user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    assert kernels.compile_cache_dir() == str(tmp_path / "torchinductor")


def _fake_compiled(seen, *, fail=False):
    """Stands in for a torch.compile'd kernel: records the cache folder it sees and, like torch while
    compiling, sets environment variables of its own."""

    def run(*args):
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = "1234"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = "/somewhere/else"
        if fail:
            raise RuntimeError("no C++ compiler found")
        return kernels.EAGER["l1"](*args)

    return run


@pytest.mark.parametrize("user_dir", [None, "torch's default", "mine"])
def test_compiled_kernel_uses_lens_alti_cache_only_while_it_runs(monkeypatch, tmp_path, user_dir):
    """lens_alti's cache folder while its compiled kernel runs (unless the user set one); afterwards the
    environment is exactly as before, the variables torch sets while compiling included."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    if user_dir is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    elif user_dir == "torch's default":
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / user_dir))
    monkeypatch.delenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", raising=False)
    monkeypatch.setattr(kernels, "_compile_failed", None)
    seen: list[str | None] = []
    fn = kernels._with_fallback("l1", _fake_compiled(seen))
    before = dict(os.environ)
    args = _tile(2, 3, 4, 5)
    torch.testing.assert_close(fn(*args), kernels.EAGER["l1"](*args))
    assert seen == [str(tmp_path / (user_dir if user_dir == "mine" else "torchinductor"))]
    assert dict(os.environ) == before


def test_failed_compiled_kernel_also_restores_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", raising=False)
    monkeypatch.setattr(kernels, "_compile_failed", None)
    seen: list[str | None] = []
    fn = kernels._with_fallback("l1", _fake_compiled(seen, fail=True))
    before = dict(os.environ)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        fn(*_tile(2, 3, 4, 5))
    assert dict(os.environ) == before and not kernels.compile_available()


_COMPILED_ENV = """
import json, os
import torch
import lens_alti
from lens_alti.alti import kernels
from tests.support.models import build_bridge

hf, bridge = build_bridge("llama", seed=5)  # importing transformers' models sets TORCHINDUCTOR_CACHE_DIR (torch)
_, cache = bridge.run_with_cache(torch.randint(4, 1000, (1, 9), generator=torch.Generator().manual_seed(0)))
env = dict(os.environ)
lens_alti.attribute(cache, backend="compiled")
from torch._inductor.codecache import CacheBase
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
print(json.dumps({
    "compiled": kernels.compile_available() and kernels.is_warm("l1", torch.float32, "cpu"),
    "changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "ours": sorted(os.listdir(os.path.join(os.environ["LENS_ALTI_CACHE"], "torchinductor"))),
    "local_cache_is_default": str(CacheBase.get_local_cache_path()).startswith(default_cache_dir()),
}))
"""


def test_compiled_backend_leaves_the_environment_unchanged(tmp_path):
    """A real torch.compile in a fresh process (empty caches, no TORCHINDUCTOR_CACHE_DIR): artefacts go to
    lens_alti's cache, os.environ is identical afterwards, and the user's later compiles get torch's default."""
    if not kernels.compile_available():
        pytest.skip("torch.compile disabled")
    from tests.support import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(LENS_ALTI_CACHE=str(tmp_path), LENS_ALTI_NO_NATIVE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILED_ENV], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if not got["compiled"]:
        pytest.skip("torch.compile failed on this machine")
    assert got["changed"] == []
    assert got["ours"], "torch.compile's artefacts went to lens_alti's cache folder"
    assert got["local_cache_is_default"]


# --------------------------------------------------------------------------- native build on first use


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """An empty lens_alti cache folder and a process that has not loaded, failed or announced a build."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path))
    monkeypatch.delenv("LENS_ALTI_NO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_announced", False)
    return tmp_path


def test_first_use_build_says_so_once_per_process(unbuilt, monkeypatch, tmp_path_factory, caplog):
    caplog.set_level(logging.WARNING, logger="lens_alti.alti.native")
    assert not native.ready_on_disk()
    assert native.available() and native.ready_on_disk()
    path = native.library_path(native._compiler())
    assert [r.getMessage() for r in caplog.records] == [native.BUILD_MESSAGE % path]
    assert "building the native CPU kernels" in caplog.text
    # built again elsewhere in the same process (another empty cache): the line is not repeated
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path_factory.mktemp("other")))
    monkeypatch.setattr(native, "_lib", None)
    assert native.available() and native.ready_on_disk()
    assert len(caplog.records) == 1
    # loading a library built before says nothing
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_announced", False)
    assert native.available() and len(caplog.records) == 1


def test_build_reports_an_existing_build(unbuilt):
    path, built = native.build()
    assert built and path.is_file() and path.parent == unbuilt / "kernels" and native.loaded()
    assert native.build() == (path, False)


def test_build_errors(unbuilt, monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_ALTI_NO_NATIVE", "1")
    with pytest.raises(RuntimeError, match="LENS_ALTI_NO_NATIVE is set"):
        native.build()
    monkeypatch.delenv("LENS_ALTI_NO_NATIVE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build()
    monkeypatch.undo()
    bad = tmp_path / "_native.c"
    bad.write_text("this is not C\n")
    monkeypatch.setenv("LENS_ALTI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    with pytest.raises(RuntimeError, match="could not be built: RuntimeError: .* failed"):
        native.build()
    monkeypatch.setattr(native, "SOURCE", native.SOURCE.__class__(native.__file__).with_name("_native.c"))
    monkeypatch.setattr(native, "library", lambda: None)  # built, but it does not load
    monkeypatch.setattr(native, "_failed", "OSError: cannot open shared object file")
    with pytest.raises(RuntimeError, match="could not be loaded: OSError"):
        native.build()


# --------------------------------------------------------------------------- auto while native is not built


@pytest.fixture
def native_unbuilt(monkeypatch):
    """A C compiler, nothing built yet, no compiled kernels; `available()` records the builds it would do."""
    builds = []
    monkeypatch.setattr(native, "possible", lambda: True)
    monkeypatch.setattr(native, "loaded", lambda: False)
    monkeypatch.setattr(native, "ready_on_disk", lambda: False)
    monkeypatch.setattr(native, "available", lambda: builds.append(1) or True)
    monkeypatch.setattr(kernels, "compile_available", lambda: False)
    monkeypatch.setattr(backend_mod, "_native_saved_s", 0.0)
    return builds


def test_auto_counts_the_native_build_as_start_up(native_unbuilt, monkeypatch):
    work = _work(10**9)
    steady = backend_mod.estimate("native", work, include_start=False)
    assert backend_mod.estimate("native", work) == pytest.approx(steady + backend_mod.NATIVE_BUILD_S)
    monkeypatch.setattr(native, "ready_on_disk", lambda: True)  # built by an earlier process: loads in ms
    assert backend_mod.estimate("native", work) == steady


def test_auto_builds_native_when_the_call_pays_for_it(native_unbuilt):
    small = backend_mod.decide(_work(10**6))
    assert small.backend == "eager" and small.estimates["native"] > small.estimates["eager"]
    assert native_unbuilt == []  # nothing built for a call that eager finishes sooner
    large = backend_mod.decide(_work(10**12))
    assert large.backend == "native" and "built now" in large.reason
    assert native_unbuilt == [1]


def test_auto_builds_native_after_enough_eager_calls(native_unbuilt):
    work = _work(10**8)
    lost = backend_mod.estimate("eager", work) - backend_mod.estimate("native", work, include_start=False)
    assert lost > 0 and backend_mod.estimate("eager", work) < backend_mod.estimate("native", work)
    choices = [backend_mod.decide(work).backend for _ in range(int(backend_mod.NATIVE_BUILD_S / lost) + 2)]
    assert choices[0] == "eager" and "native" in choices and native_unbuilt == [1]
    assert backend_mod.NATIVE_BUILD_S / lost - 1 <= choices.index("native") <= backend_mod.NATIVE_BUILD_S / lost


def test_auto_falls_back_when_the_native_build_fails(native_unbuilt, monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    assert backend_mod.decide(_work(10**12)).backend == "eager"  # no compile either (fixture)
    monkeypatch.setattr(kernels, "compile_available", lambda: True)
    monkeypatch.setattr(kernels, "is_warm", lambda *a: False)
    assert backend_mod.decide(_work(10**13)).backend == "compiled"
