"""RWKV-4: time mixing and channel mixing, two token-mixing steps per layer, against the float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import lens_alti
from lens_alti.alti.decompose import check_reconstruction, decompose
from lens_alti.reading import model_layout
from tests.support.models import boot
from tests.support.reference import randomize_norms
from tests.support.reference_mixers import reference_rwkv_steps
from tests.support.tokenizer import VOCAB

TOL = 1e-5


def _tokens(batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1000, (batch, pos), generator=g)


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    # attention_hidden_size ≠ hidden_size; rescale_every=1 halves the residual stream after every layer.
    cfg = T.RwkvConfig(
        vocab_size=VOCAB, hidden_size=32, attention_hidden_size=24, intermediate_size=64, num_hidden_layers=3,
        rescale_every=1,
    )
    cfg.architectures = ["RwkvForCausalLM"]
    hf = randomize_norms(T.RwkvForCausalLM(cfg).eval(), 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # token-shift mixes away from their init, so both taps matter
        for name, param in hf.named_parameters():
            if "time_mix" in name:
                param.copy_(torch.rand(param.shape, generator=gen))
    untouched = copy.deepcopy(hf)
    bridge = boot(hf)
    tokens = _tokens()
    _, cache = bridge.run_with_cache(tokens)
    return untouched, bridge, tokens, cache, reference_rwkv_steps(untouched, tokens)


def test_two_steps_per_layer_reconstruct_the_real_activations(run):
    _, bridge, _, cache, ref = run
    readers = model_layout(bridge).blocks["self"]
    assert [r.name for r in readers[:2]] == ["blocks.0.time_mix", "blocks.0.channel_mix"]
    assert len(readers) == 2 * len(bridge.blocks) == len(ref)
    for reader in readers:
        block = reader.build(cache)
        assert check_reconstruction(decompose(block, dtype=torch.float64), block, tolerance=1e-5) < 1e-5


@pytest.mark.parametrize("measure", ["l1", "l2", "koba"])
def test_matches_reference(run, measure):
    *_, cache, ref = run
    res = lens_alti.attribute(cache, measure=measure, dtype=torch.float64)
    assert res.layers.shape[1] == len(ref)
    for step, want in enumerate(ref):
        torch.testing.assert_close(res.layers[:, step], want[measure], atol=TOL, rtol=0)
    # The channel mixing reads the previous token: its matrix is not the identity (not token-wise).
    assert float(res.layers[:, 1].diagonal(dim1=-2, dim2=-1).sub(1).abs().max()) > 1e-2
    expect = ref[0][measure]
    for step in range(1, len(ref)):
        expect = ref[step][measure] @ expect
    torch.testing.assert_close(res.rollout[:, -1], expect, atol=TOL, rtol=0)


def test_float32_rows_sum_to_one(run):
    *_, cache, _ = run
    res = lens_alti.attribute(cache)
    sums = res.layers.sum(-1)
    assert bool(((sums - 1).abs() < 1e-5).all())
    assert torch.equal(res.layers, res.layers.tril())


def test_right_padding_equals_single_runs_and_left_padding_is_refused(run):
    _, bridge, tokens, _, _ = run
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    padded = lens_alti.attribute(bridge.run_with_cache(tokens, attention_mask=mask)[1], attention_mask=mask)
    single = lens_alti.attribute(bridge.run_with_cache(tokens[1:, :5])[1])
    torch.testing.assert_close(padded.layers[1:, :, :5, :5], single.layers, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.rollout[1:, :, :5, :5], single.rollout, atol=1e-5, rtol=0)
    # RWKV ignores the attention mask: left padding enters the real tokens' token shift and WKV state.
    left = torch.ones_like(tokens)
    left[1, :2] = 0
    _, cache = bridge.run_with_cache(tokens, attention_mask=left)
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="one at a time"):
        lens_alti.attribute(cache, attention_mask=left)


@pytest.mark.parametrize("hook", ["blocks.1.time_mix.key.hook_out", "blocks.1.ln2.hook_out"])
def test_corrupted_cache_fails_the_check(run, hook):
    *_, cache, _ = run
    original = cache.cache_dict[hook]
    try:
        bad = original.clone()
        bad[:, 3] += 0.5
        cache.cache_dict[hook] = bad
        with pytest.raises(lens_alti.errors.ReconstructionError, match="blocks.1"):
            lens_alti.attribute(cache)
    finally:
        cache.cache_dict[hook] = original


def test_hook_names_suffice_and_heads_are_refused(run):
    _, bridge, tokens, cache, _ = run
    names = set(lens_alti.hook_names(bridge))
    _, small = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    torch.testing.assert_close(lens_alti.attribute(small).layers, lens_alti.attribute(cache).layers)
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="per channel, not per head"):
        lens_alti.attribute(cache, heads=True)


def test_logit_attribution_and_routes_are_refused(run):
    """They read one token mixer and one MLP per layer; RWKV's channel mixing is a second token mixer."""
    *_, cache, _ = run
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="2 token-mixing steps"):
        lens_alti.logit_attribution(cache, target=5)
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="2 token-mixing steps"):
        lens_alti.routes(cache)


def test_half_precision_cache(run):
    hf = copy.deepcopy(run[0]).to(torch.bfloat16)
    _, cache = boot(hf).run_with_cache(_tokens())
    res = lens_alti.attribute(cache)
    assert float(res.reconstruction_error.max()) < 5e-2
    assert bool(((res.layers.sum(-1) - 1).abs() < 1e-4).all())
