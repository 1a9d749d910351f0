"""lens_alti on tiny random decoder-only bridges vs the independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from tests.support.reference import reference_decoder_only

TOL = 1e-5


def _tokens(batch: int = 2, pos: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1000, (batch, pos), generator=g)


@pytest.fixture(scope="module")
def run(decoder):
    arch, hf, bridge = decoder
    tokens = _tokens()
    _, cache = bridge.run_with_cache(tokens)
    return arch, hf, bridge, tokens, cache, reference_decoder_only(hf, tokens)


@pytest.mark.parametrize("measure", ["l1", "l2", "koba", "attention"])
def test_layers_match_reference(run, measure):
    arch, _, _, _, cache, ref = run
    res = lens_alti.attribute(cache, measure=measure)
    assert res.layers.shape == ref[measure].shape
    torch.testing.assert_close(res.layers.double(), ref[measure], atol=TOL, rtol=0)
    assert float(res.reconstruction_error.max()) < 1e-5


def test_rollout_matches_reference(run):
    *_, cache, ref = run
    res = lens_alti.attribute(cache)
    torch.testing.assert_close(res.rollout.double(), ref["rollout"], atol=TOL, rtol=0)


def test_heads_match_reference(run):
    *_, cache, ref = run
    res = lens_alti.attribute(cache, heads=True)
    torch.testing.assert_close(res.heads.double(), ref["heads"], atol=TOL, rtol=0)
    torch.testing.assert_close(res.heads_residual.double(), ref["heads_residual"], atol=TOL, rtol=0)
    # Σ_h of token-through-head is not the token-level contribution (docs/spec.md §3).
    assert not torch.allclose(res.heads.sum(2), res.layers, atol=1e-3)


def test_float64_computation_is_tighter(run):
    *_, cache, ref = run
    res = lens_alti.attribute(cache, dtype=torch.float64, heads=True)
    assert res.layers.dtype == torch.float64
    torch.testing.assert_close(res.layers, ref["l1"], atol=2e-6, rtol=0)
    torch.testing.assert_close(res.heads, ref["heads"], atol=2e-6, rtol=0)


def test_head_outputs_sum_to_one(run):
    *_, cache, _ = run
    res = lens_alti.attribute(cache, heads=True)
    total = res.head_outputs.sum(2) + res.head_outputs_residual
    torch.testing.assert_close(total, torch.ones_like(total))


def test_small_chunks_give_same_numbers(run):
    *_, cache, _ = run
    full = lens_alti.attribute(cache, heads=True)
    tiny = lens_alti.attribute(cache, heads=True, max_chunk_bytes=1)  # one receiver per chunk
    torch.testing.assert_close(full.layers, tiny.layers, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.heads, tiny.heads, atol=1e-6, rtol=0)


def test_labels_and_top_sources(run):
    _, _, bridge, tokens, cache, _ = run
    res = lens_alti.attribute(cache, tokens=tokens)
    assert res.str_tokens[0] == list(bridge.to_str_tokens(tokens[0]))
    top = res.top_sources(-1, k=3, batch=1)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    assert top[0][2] == pytest.approx(float(res.rollout[1, -1, -1].max()))
    frame = res.to_dataframe("rollout")
    n = tokens.shape[1]
    assert len(frame) == 2 * res.n_layers * n * n
    assert {"query_token", "key_token", "value"} <= set(frame.columns)


def test_parallel_mlp_residual_mode():
    from tests.support.models import build_bridge

    _, bridge = build_bridge("neox", seed=3)
    _, cache = bridge.run_with_cache(_tokens())
    default = lens_alti.attribute(cache)
    mode = lens_alti.attribute(cache, parallel_mlp="residual")
    assert float(mode.reconstruction_error.max()) < 1e-5
    # The MLP joins each token's own term, so the diagonal changes and rows still sum to 1.
    assert not torch.allclose(default.layers, mode.layers, atol=1e-4)
    torch.testing.assert_close(mode.layers.sum(-1), torch.ones(2, 2, 9))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_each_item_equals_running_alone(decoder, side):
    arch, hf, bridge = decoder
    lengths = [9, 6, 4]
    pad = 3
    tokens = torch.full((3, 9), pad)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(9 - n, 9)
        tokens[b, sl] = _tokens(1, n, seed=10 + b)[0]
        mask[b, sl] = 1
    _, cache = bridge.run_with_cache(tokens, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask, heads=True)
    assert torch.isfinite(res.layers).all() and torch.isfinite(res.heads).all()
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(9 - n, 9)
        _, alone_cache = bridge.run_with_cache(tokens[b : b + 1, sl])
        alone = lens_alti.attribute(alone_cache, heads=True)
        torch.testing.assert_close(res.layers[b][:, sl, sl], alone.layers[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.rollout[b][:, sl, sl], alone.rollout[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.heads[b][:, :, sl, sl], alone.heads[0], atol=1e-5, rtol=0)
        pad_rows = ~mask[b].bool()
        assert (res.layers[b][:, pad_rows] == 0).all(), "padded query rows must be exactly 0"
        assert (res.layers[b][:, :, pad_rows] == 0).all(), "padded keys must contribute exactly 0"
        assert (res.heads_residual[b][:, pad_rows] == 0).all()


def test_padding_matches_reference(decoder):
    arch, hf, bridge = decoder
    tokens = _tokens(2, 8, seed=5)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    _, cache = bridge.run_with_cache(tokens, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask, heads=True)
    ref = reference_decoder_only(hf, tokens, mask)
    torch.testing.assert_close(res.layers.double(), ref["l1"], atol=TOL, rtol=0)
    torch.testing.assert_close(res.heads.double(), ref["heads"], atol=TOL, rtol=0)
