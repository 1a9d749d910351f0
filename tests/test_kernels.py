"""The compiled (torch.compile) kernels give the eager kernels' numbers; failure falls back."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.alti import kernels
from tests.reference import reference_decoder_only

TOKENS = torch.randint(4, 1000, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama_run():
    from tests.models import build_bridge

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
