"""Architecture layouts and their regressions (issue 10): shapes, norms, multipliers, refusals.

Each model is a tiny random Hugging Face model built offline (`tests.support.architecture_sweep.build_tiny`),
norm weights randomised, booted as a TransformerBridge.
"""

from __future__ import annotations

import functools

import pytest
import torch

import lens_alti
from lens_alti.alti.decompose import check_pattern_distribution
from lens_alti.errors import LensAltiError, PatternNotDistributionError, UnsupportedModelError
from lens_alti.reading.norms import norm_params
from lens_alti.reading.records import AttentionBlock
from tests.support.architecture_sweep import build_tiny
from tests.support.models import boot, build_bridge, hf_model


def _tokens(batch: int, pos: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1000, (batch, pos), generator=g)


@functools.cache
def _tiny(name: str) -> tuple:
    return build_tiny(name)


# --- bug 1: multi-head latent attention stores hook_v head-major; every shape is validated ---


@pytest.mark.parametrize("pos", [4, 10])  # 4 == n_heads: the ambiguous length of the old bug
def test_latent_attention_values_head_major(pos):
    _, bridge = _tiny("DeepseekV2ForCausalLM")
    _, cache = bridge.run_with_cache(_tokens(2, pos))
    assert cache["blocks.0.attn.hook_v"].shape[1] == bridge.cfg.n_heads  # [batch, head, pos, d_head]
    res = lens_alti.attribute(cache)
    assert float(res.reconstruction_error.max()) < 1e-5
    torch.testing.assert_close(res.layers.sum(-1), torch.ones_like(res.layers.sum(-1)), atol=1e-5, rtol=0)


def test_wrong_value_shape_names_hook_and_shape():
    _, bridge = build_bridge("gpt2")
    _, cache = bridge.run_with_cache(_tokens(2, 6))
    cache.cache_dict["blocks.1.attn.hook_v"] = cache["blocks.1.attn.hook_v"][:, :5]
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn: hook_v has shape \[2, 5, 4, 16\]"):
        lens_alti.attribute(cache)


def test_wrong_pattern_shape_names_hook_and_shape():
    _, bridge = build_bridge("gpt2")
    _, cache = bridge.run_with_cache(_tokens(2, 6))
    cache.cache_dict["blocks.0.attn.hook_pattern"] = cache["blocks.0.attn.hook_pattern"][:, :3]
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn\.hook_pattern has shape \[2, 3, 6, 6\]"):
        lens_alti.attribute(cache)


# --- bug 2: the norm gain is read from the module's behaviour, not its class name ---


def _norm(cls_name: str, d: int = 8) -> torch.nn.Module:
    import importlib

    family, name = cls_name.split(".")
    module = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)(d, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-0.5, 0.7, d))
    return module


@pytest.mark.parametrize(
    "cls_name, offset",
    [
        ("gemma4.Gemma4RMSNorm", False),  # named "Gemma", but scales by w
        ("t5gemma.T5GemmaRMSNorm", True),  # not named "Gemma..." at the start, scales by 1 + w
        ("gemma2.Gemma2RMSNorm", True),
        ("llama.LlamaRMSNorm", False),
    ],
)
def test_norm_gain_from_behaviour(cls_name, offset):
    norm = _norm(cls_name)
    kind, weight, bias, eps = norm_params(norm, "probe", "LN")
    assert kind == "rmsnorm" and bias is None and eps == pytest.approx(1e-6)
    want = 1.0 + norm.weight.detach() if offset else norm.weight.detach()
    torch.testing.assert_close(weight.float(), want.float())
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight)


def test_layernorm_recognised_by_behaviour():
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
        norm.bias.copy_(torch.linspace(-0.1, 0.1, 8))
    kind, weight, bias, _ = norm_params(norm, "probe", "RMS")  # the default kind is overruled
    assert kind == "layernorm"
    torch.testing.assert_close(weight, norm.weight.detach())


def test_norm_that_is_not_a_norm_is_refused():
    class Tanh(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x) * self.weight

    with pytest.raises(UnsupportedModelError, match="probe.*not x/σ·w"):
        norm_params(Tanh(), "blocks.0.ln1_post", "RMS")


# --- bug 4: layers with no attention hooks say they are mixers, not attention ---


def test_unknown_mixer_layer_is_a_mixer_not_attention(monkeypatch):
    """Mamba and RWKV are decomposed now (tests/reading/test_mixers.py, tests/reading/test_rwkv.py); a mixer
    lens_alti does not know (here RWKV's, with its reader switched off) is named as a mixer, not as missing
    attention."""
    import lens_alti.reading.bridge as bridge_layout

    monkeypatch.setattr(bridge_layout, "is_rwkv_block", lambda block: False)
    _, bridge = _tiny("RwkvForCausalLM")
    _, cache = bridge.run_with_cache(_tokens(1, 5))
    with pytest.raises(UnsupportedModelError, match="layer 0 is a RwkvSelfAttention mixer, not attention"):
        lens_alti.attribute(cache)
    with pytest.raises(UnsupportedModelError, match="not attention"):
        lens_alti.hook_names(bridge)


# --- bug 5: weight_processing records what was actually done ---


def _gpt2_with_biases():
    """A tiny GPT-2 whose attention biases are non-zero (fresh ones are 0: folding them changes nothing)."""
    hf = hf_model("gpt2")
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.bias.normal_(0, 0.1)
            block.attn.c_proj.bias.normal_(0, 0.1)
    return boot(hf)


def test_weight_processing_records_only_value_bias_folding():
    bridge = _gpt2_with_biases()
    bridge.enable_compatibility_mode(
        fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=True
    )
    _, cache = bridge.run_with_cache(_tokens(1, 5))
    with pytest.warns(lens_alti.errors.WeightProcessingWarning):
        res = lens_alti.attribute(cache)
    assert "folded value biases" in res.weight_processing
    assert "centred" not in res.weight_processing and "folded norms" not in res.weight_processing


def test_weight_processing_records_the_default_steps():
    bridge = _gpt2_with_biases()
    bridge.enable_compatibility_mode()
    _, cache = bridge.run_with_cache(_tokens(1, 5))
    with pytest.warns(lens_alti.errors.WeightProcessingWarning):
        res = lens_alti.attribute(cache)
    for step in ("folded norms", "centred writing weights", "folded value biases"):
        assert step in res.weight_processing


def test_raw_weights_are_raw():
    _, bridge = build_bridge("gpt2")
    _, cache = bridge.run_with_cache(_tokens(1, 5))
    assert lens_alti.attribute(cache).weight_processing == "raw"


# --- step 3: the cached pattern must be a distribution over the valid keys ---


def _record(pattern: torch.Tensor, **kw) -> AttentionBlock:
    b, h, q, k = pattern.shape
    return AttentionBlock(
        name="blocks.0.attn", layer=0, pattern=pattern, values=torch.zeros(b, k, h, 2), W_O=torch.zeros(h, 2, 3),
        b_O=None, residual=torch.zeros(b, q, 3), target=torch.zeros(b, q, 3), architecture="test", **kw,
    )


def test_negative_pattern_is_not_a_distribution():
    pattern = torch.full((1, 2, 3, 3), 1 / 3)
    pattern[0, 1, 2] = torch.tensor([0.9, 0.5, -0.4])  # sums to 1 but has a negative entry
    with pytest.raises(PatternNotDistributionError, match="not a probability distribution.*smallest entry -0.4"):
        check_pattern_distribution(_record(pattern))


def test_rows_must_sum_to_one_over_valid_keys():
    pattern = torch.full((1, 1, 2, 4), 0.25)
    check_pattern_distribution(_record(pattern))
    valid_keys = torch.tensor([[True, True, True, False]])
    with pytest.raises(PatternNotDistributionError, match="row sum"):
        check_pattern_distribution(_record(pattern), valid_keys=valid_keys)
    # A head switched off (an all-zero row, as head ablation leaves it) is allowed.
    zero_row = torch.full((1, 1, 2, 4), 0.25)
    zero_row[0, 0, 0] = 0.0
    check_pattern_distribution(_record(zero_row))
    # Padded receivers are not checked.
    pattern[0, 0, 1] = 0.1
    check_pattern_distribution(_record(pattern), valid_rows=torch.tensor([[True, False]]))


def test_linear_operator_records_skip_the_distribution_check():
    pattern = torch.tensor([[[[1.5, -0.5], [0.2, 0.3]]]])
    check_pattern_distribution(_record(pattern, pattern_is_distribution=False))
    with pytest.raises(PatternNotDistributionError):
        check_pattern_distribution(_record(pattern))


def test_distribution_error_is_a_lens_alti_error():
    assert issubclass(PatternNotDistributionError, LensAltiError)


# --- bug 3: banded Longformer / LED patterns: LED's encoder is expanded (tests/reading/test_banded.py); a band
# reaching any other reader is refused by name, before any arithmetic ---


def test_led_band_reaching_a_dense_reader_is_refused_by_layout():
    from lens_alti.reading.geometry import checked_values

    _, bridge = _tiny("LEDForConditionalGeneration")
    _, cache = bridge.run_with_cache(_tokens(2, 6, 1), decoder_input=_tokens(2, 4, 2))
    band, attn = cache["encoder_blocks.0.attn.hook_pattern"], bridge.encoder_blocks[0].attn
    with pytest.raises(UnsupportedModelError, match=r"banded local-attention layout \[batch, query, head, 2w\+1\]"):
        checked_values(band, cache["encoder_blocks.0.attn.hook_v"], attn.W_O.detach(), "encoder_blocks.0.attn")
    assert lens_alti.attribute(cache).encoder.layers.shape == (2, 2, 6, 6)  # attribute expands the band


# --- bug 2 (continued): Gemma-4 reads the normalised values (its v_norm comes after hook_v) ---


def test_gemma4_value_norm_after_hook_v():
    hf, bridge = _tiny("Gemma4ForCausalLM")
    _, cache = bridge.run_with_cache(_tokens(2, 6))
    v = cache["blocks.0.attn.hook_v"]
    v_norm = hf.model.layers[0].self_attn.v_norm
    assert float((v_norm(v) - v).abs().max()) > 1e-2  # the cached values are not yet normalised
    res = lens_alti.attribute(cache)
    assert float(res.reconstruction_error.max()) < 1e-5


# --- layouts refused precisely ---


def test_parallel_mamba_branch_is_decomposed():
    """Falcon-H1's Mamba-2 branch beside attention is read by reading.mixers (no longer refused)."""
    _, bridge = _tiny("FalconH1ForCausalLM")
    _, cache = bridge.run_with_cache(_tokens(1, 5))
    assert float(lens_alti.attribute(cache).reconstruction_error.max()) < 1e-5


def test_attention_sinks_rows_sum_below_one():
    _, bridge = _tiny("GptOssForCausalLM")
    _, cache = bridge.run_with_cache(_tokens(2, 6))
    assert float(cache["blocks.0.attn.hook_pattern"].sum(-1).min()) < 0.999  # the sinks take some mass
    res = lens_alti.attribute(cache)
    assert float(res.reconstruction_error.max()) < 1e-5
