"""Block layouts of issue 10 against the independent dense float64 reference (tests/support/reference_layouts.py).

Each model is tiny and random, with randomised norm weights and non-default multipliers, so a
layout feature that is read wrongly changes the numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lens_alti
from tests.support.architecture_sweep import build_tiny
from tests.support.reference_layouts import reference_layout

TOL = 1e-5

LAYOUTS = {
    # residual_multiplier scales the attention branch; attention_multiplier replaces 1/√d_head.
    "granite": ("GraniteForCausalLM", {"residual_multiplier": 0.37, "attention_multiplier": 0.21,
                                        "embedding_multiplier": 3.0}),
    "bitnet": ("BitNetForCausalLM", {}),  # RMSNorm on the concatenated heads before o_proj
    "openai-gpt": ("OpenAIGPTLMHeadModel", {}),  # post-LN causal decoder
    # 4 heads in layer 0, 8 in layer 1; a per-head softplus gate on each head's output before o_proj.
    "laguna": ("LagunaForCausalLM", {"num_attention_heads_per_layer": [4, 8], "gating": "per-head",
                                     "mlp_layer_types": ["dense", "dense"]}),
    # Multi-head latent attention: values decompressed from a normed per-token latent (head-major hook_v).
    # (num_key_value_heads = heads: HF's eager MLA expands the latent to every head and cannot repeat it again)
    "deepseek_v2": ("DeepseekV2ForCausalLM", {"num_key_value_heads": 4}),
    # A gain-free RMSNorm on each value, plain-w RMSNorms, a norm on the attention output.
    "gemma4": ("Gemma4ForCausalLM", {}),
    # Attention sinks: rows sum to less than 1.
    "gpt_oss": ("GptOssForCausalLM", {}),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_run(request):
    name, overrides = LAYOUTS[request.param]
    reference_model, bridge = build_tiny(name, **overrides)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 1000, (2, 7), generator=g)
    _, cache = bridge.run_with_cache(tokens)
    return request.param, cache, reference_layout(reference_model, tokens)


def test_layout_matches_reference(layout_run):
    kind, cache, ref = layout_run
    res = lens_alti.attribute(cache, dtype=torch.float64)
    assert float(res.reconstruction_error.max()) < 1e-6, kind
    torch.testing.assert_close(res.layers, ref["l1"], atol=TOL, rtol=0)
    torch.testing.assert_close(res.rollout, ref["rollout"], atol=TOL, rtol=0)


def test_layout_float32_matches_reference(layout_run):
    _, cache, ref = layout_run
    res = lens_alti.attribute(cache)
    torch.testing.assert_close(res.layers.double(), ref["l1"], atol=TOL, rtol=0)


def test_granite_multiplier_is_not_the_default():
    name, overrides = LAYOUTS["granite"]
    assert overrides["residual_multiplier"] != 1.0  # the default 1.0 would hide a missing multiplier


def test_laguna_layers_have_their_own_head_counts(layout_run):
    kind, cache, _ = layout_run
    if kind != "laguna":
        pytest.skip("Laguna only")
    assert cache["blocks.0.attn.hook_pattern"].shape[1] == 4 and cache["blocks.1.attn.hook_pattern"].shape[1] == 8
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="one head count for every layer"):
        lens_alti.attribute(cache, heads=True)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)


def _seq2seq_run(architecture: str, seed: int, reference: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(cache, float64 reference) of a tiny encoder-decoder on a batch of 2 sources (7) and targets (5)."""
    reference_model, bridge = build_tiny(architecture)
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(4, 1000, (2, 7), generator=g), torch.randint(4, 1000, (2, 5), generator=g)
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    return cache, reference(reference_model, src, tgt)


@pytest.fixture(scope="module")
def t5gemma_run():
    from tests.support.reference_seq2seq import reference_seq2seq

    return _seq2seq_run("T5GemmaForConditionalGeneration", 4, reference_seq2seq)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t5gemma_norms_before_and_after_attention_match_reference(t5gemma_run, dtype):
    """T5Gemma: pre- and post-attention RMSNorms (gain 1 + w) in encoder, decoder self- and cross-attention."""
    cache, ref = t5gemma_run
    res = lens_alti.attribute(cache, dtype=dtype, heads=True)
    for kind, errs in res.reconstruction_error.items():
        assert float(errs.max()) < 1e-5, kind
    _close(res.encoder.layers, ref["encoder_l1"])
    _close(res.encoder.rollout, ref["encoder_rollout"])
    _close(res.decoder_self, ref["decoder_self"])
    _close(res.cross, ref["cross"])
    _close(res.cross_heads, ref["cross_heads"])
    _close(res.total, ref["total"])


@pytest.fixture(scope="module")
def t5gemma2_run():
    from tests.support.reference_seq2seq import reference_merged_seq2seq

    return _seq2seq_run("T5Gemma2ForConditionalGeneration", 5, reference_merged_seq2seq)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t5gemma2_merged_self_and_cross_attention_matches_reference(t5gemma2_run, dtype):
    """T5Gemma2's decoder: one block over [target prefix ; source], split exactly into decoder_self and cross."""
    cache, ref = t5gemma2_run
    res = lens_alti.attribute(cache, dtype=dtype)
    for kind, errs in res.reconstruction_error.items():
        assert float(errs.max()) < 1e-5, kind
    _close(res.encoder.layers, ref["encoder_l1"])
    _close(res.encoder.rollout, ref["encoder_rollout"])
    t = ref["merged"].shape[2]
    # The merged block's own matrix: cross's source columns; the self rows scaled by cross's residual column.
    _close(res.cross[..., :-1], ref["merged"][..., t:])
    _close(res.decoder_self * res.cross[..., -1:], ref["merged"][..., :t])
    _close(res.total, ref["total"])
    assert float(res.source_contribution.mean()) > 0.05  # the source matters: not a residual-only picture


def test_t5gemma2_heads_split_like_the_tokens(t5gemma2_run):
    """Per head: cross heads are the merged block's source parts; self heads × cross residual its target parts."""
    cache, ref = t5gemma2_run
    res = lens_alti.attribute(cache, dtype=torch.float64, heads=True)
    t = ref["merged"].shape[2]
    _close(res.cross_heads, ref["merged_heads"][..., t:])
    share = res.cross_heads_residual
    _close(res.decoder_self_heads * share[:, :, None, :, None], ref["merged_heads"][..., :t])
    _close(res.decoder_self_heads_residual * share, ref["merged_heads_residual"])
    rows = res.cross_heads.sum((2, 4)) + res.cross_heads_residual
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_t5gemma2_refuses_streaming(t5gemma2_run):
    cache, _ = t5gemma2_run
    src, tgt = torch.randint(4, 1000, (1, 4)), torch.randint(4, 1000, (1, 3))
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="run_with_cache"):
        lens_alti.attribute(cache.model, tokens=src, decoder_tokens=tgt)


def test_t5gemma2_refuses_logit_attribution(t5gemma2_run):
    cache, _ = t5gemma2_run
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="merges self- and cross-attention"):
        lens_alti.logit_attribution(cache, target=7)


@pytest.fixture(scope="module")
def switch_model():
    return build_tiny("SwitchTransformersForConditionalGeneration")


def test_switch_transformers_bridge_pattern_is_the_position_bias(switch_model):
    """Why the pattern is recomputed: TransformerLens 4.3 caches Switch's position bias as hook_pattern."""
    _, bridge = switch_model
    src, tgt = torch.randint(4, 1000, (2, 7)), torch.randint(4, 1000, (2, 5))
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    assert cache["encoder_blocks.0.attn.hook_pattern"].shape[0] == 1  # [1, head, q, k]: not per batch item
    assert float(cache["encoder_blocks.0.attn.hook_pattern"].amin()) < 0


def _padded_seq2seq(reference_model: Any, bridge: Any, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """(float64 result, float64 reference) on 2 items, the second with padded source and target;
    every block's reconstruction is checked to 1e-5."""
    from tests.support.reference_seq2seq import reference_seq2seq

    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(4, 1000, (2, 7), generator=g), torch.randint(4, 1000, (2, 5), generator=g)
    smask, tmask = torch.ones(2, 7, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    smask[1, 5:] = 0
    tmask[1, 4:] = 0
    _, cache = bridge.run_with_cache(src, decoder_input=tgt, attention_mask=smask, decoder_attention_mask=tmask)
    ref = reference_seq2seq(reference_model, src, tgt, smask, tmask)
    res = lens_alti.attribute(cache, attention_mask=smask, decoder_attention_mask=tmask, dtype=torch.float64)
    for kind, errs in res.reconstruction_error.items():
        assert float(errs.max()) < 1e-5, kind
    return res, ref


def test_switch_transformers_recomputed_pattern_matches_reference_with_padding(switch_model):
    """Switch: the pattern recomputed from hook_q/hook_k and the relative bias, padding renormalised."""
    res, ref = _padded_seq2seq(*switch_model, seed=6)
    _close(res.encoder.layers, ref["encoder_l1"])
    _close(res.decoder_self, ref["decoder_self"])
    _close(res.cross, ref["cross"])
    _close(res.total, ref["total"])


def test_switch_transformers_wrong_mask_is_caught(switch_model):
    _, bridge = switch_model
    src, tgt = torch.randint(4, 1000, (2, 7)), torch.randint(4, 1000, (2, 5))
    smask = torch.ones(2, 7, dtype=torch.long)
    smask[1, 5:] = 0
    _, cache = bridge.run_with_cache(src, decoder_input=tgt, attention_mask=smask)
    with pytest.raises(lens_alti.errors.ReconstructionError):
        lens_alti.attribute(cache)  # the cache was run with a mask that attribute was not given


def test_longt5_local_attention_matches_reference_with_padding():
    """LongT5: a local radius of 2 (blocks of 3) on 7 tokens, so the band matters; padded batch."""
    reference_model, bridge = build_tiny("LongT5ForConditionalGeneration", local_radius=2)
    assert bridge.encoder_blocks[0].attn.original_component.block_len == 3
    res, ref = _padded_seq2seq(reference_model, bridge, seed=7)
    _close(res.encoder.layers, ref["encoder_l1"])
    assert float(res.encoder.layers[0, 0].triu(3).abs().max()) < 1e-9  # nothing beyond the radius
    _close(res.decoder_self, ref["decoder_self"])
    _close(res.cross, ref["cross"])
    _close(res.total, ref["total"])


def test_longt5_transient_global_is_refused():
    _, bridge = build_tiny("LongT5ForConditionalGeneration", encoder_attention_type="transient-global")
    _, cache = bridge.run_with_cache(torch.randint(4, 1000, (1, 6)), decoder_input=torch.randint(4, 1000, (1, 4)))
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="transient-global"):
        lens_alti.attribute(cache)
