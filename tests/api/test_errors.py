"""Bad input gets a clear error, never a silent wrong number."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import ActivationCache

import lens_alti
from tests.support.models import boot, build_bridge, hf_model

TOKENS = torch.randint(4, 1000, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gpt2():
    return build_bridge("gpt2")[1]


def test_names_filter_reports_missing_hooks(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS, names_filter=lambda n: "hook_pattern" not in n)
    with pytest.raises(lens_alti.MissingHooksError) as err:
        lens_alti.attribute(cache)
    assert "blocks.0.attn.hook_pattern" in str(err.value) and "blocks.1.attn.hook_pattern" in str(err.value)
    assert "eager" in str(err.value)
    assert set(err.value.missing) == {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"}


def test_hook_names_is_a_working_names_filter(gpt2):
    names = lens_alti.hook_names(gpt2)
    _, small = gpt2.run_with_cache(TOKENS, names_filter=names)
    _, full = gpt2.run_with_cache(TOKENS)
    assert len(small.keys()) < len(full.keys())
    torch.testing.assert_close(lens_alti.attribute(small).layers, lens_alti.attribute(full).layers)


def test_sdpa_cache_without_patterns(gpt2):
    """SDPA/flash attention records no pattern: same error, with the fix in it."""
    _, cache = gpt2.run_with_cache(TOKENS)
    for name in [k for k in cache.keys() if k.endswith("hook_pattern")]:
        del cache.cache_dict[name]
    with pytest.raises(lens_alti.MissingHooksError, match="attn_implementation='eager'"):
        lens_alti.attribute(cache)


@pytest.mark.parametrize("thing", [{}, None, torch.zeros(3), "cache"])
def test_not_a_cache(thing):
    with pytest.raises(lens_alti.NotACacheError, match="run_with_cache"):
        lens_alti.attribute(thing)


def test_cache_without_model(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    with pytest.raises(lens_alti.NotACacheError, match="no model"):
        lens_alti.attribute(ActivationCache(cache.cache_dict, None))


def test_cache_of_something_not_a_bridge(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    with pytest.raises(lens_alti.NotACacheError, match="TransformerBridge"):
        lens_alti.attribute(ActivationCache(cache.cache_dict, torch.nn.Linear(2, 2)))


def test_cache_without_batch_dim(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    with pytest.raises(lens_alti.NotACacheError, match="batch"):
        lens_alti.attribute(cache)


def test_nan_in_cache(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    cache.cache_dict["blocks.1.hook_resid_pre"][0, 2, 5] = float("nan")
    with pytest.raises(lens_alti.NonFiniteError, match=r"blocks\.1\.attn.*NaN or Inf"):
        lens_alti.attribute(cache)


def test_reconstruction_failure_names_layer_and_size(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    cache.cache_dict["blocks.1.hook_resid_mid"] += 0.5
    with pytest.raises(lens_alti.ReconstructionError) as err:
        lens_alti.attribute(cache)
    msg = str(err.value)
    assert "blocks.1.attn" in msg and "layer 1" in msg and "GPT2LMHeadModel" in msg
    assert err.value.max_abs_error == pytest.approx(0.5, rel=1e-3)
    # check=False skips the check and records that it was skipped.
    res = lens_alti.attribute(cache, check=False)
    assert torch.isnan(res.reconstruction_error).all()


def test_mask_that_the_cache_was_not_made_with(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 2] = 0
    with pytest.raises(lens_alti.LensAltiError, match="same attention_mask"):
        lens_alti.attribute(cache, attention_mask=mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"measure": "l3"}, "unknown measure 'l3'"),
        ({"attention_mask": torch.ones(2, 6)}, r"shape \(2, 6\)"),
        ({"attention_mask": torch.full((2, 7), 2)}, "only 0"),
        ({"parallel_mlp": "sometimes"}, "parallel_mlp"),
        ({"dtype": torch.float16}, "dtype"),
        ({"tokens": [["a"]]}, "batch size 2"),
    ],
)
def test_bad_arguments(gpt2, kwargs, match):
    _, cache = gpt2.run_with_cache(TOKENS)
    with pytest.raises(ValueError, match=match):
        lens_alti.attribute(cache, **kwargs)


def test_processed_weights_warn_and_are_recorded():
    _, bridge = build_bridge("gpt2", seed=4)
    bridge.enable_compatibility_mode(disable_warnings=True)
    _, cache = bridge.run_with_cache(TOKENS)
    with pytest.warns(lens_alti.WeightProcessingWarning, match="differ from the raw model"):
        res = lens_alti.attribute(cache)
    assert res.weight_processing.startswith("processed")
    assert float(res.reconstruction_error.max()) < 1e-5
    torch.testing.assert_close(res.layers.sum(-1), torch.ones(2, 2, 7))


def test_raw_weights_do_not_warn(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lens_alti.WeightProcessingWarning)
        assert lens_alti.attribute(cache).weight_processing == "raw"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cache_is_computed_in_fp32(dtype):
    hf = hf_model("llama", seed=2).to(dtype)
    bridge = boot(hf)
    _, cache = bridge.run_with_cache(TOKENS)
    assert cache["blocks.0.attn.hook_pattern"].dtype == dtype
    res = lens_alti.attribute(cache, heads=True)
    assert res.layers.dtype == torch.float32 and res.heads.dtype == torch.float32
    torch.testing.assert_close(res.layers.sum(-1), torch.ones(2, 2, 7))
    full = lens_alti.attribute(boot(hf_model("llama", seed=2)).run_with_cache(TOKENS)[1])
    torch.testing.assert_close(res.layers, full.layers, atol=0.05, rtol=0)
