"""Tiny random TransformerLens 3.x models, built offline.

Two ways, as the issue asks:
- `from_config`: a `HookedTransformerConfig` and random weights for every parameter (norm
  weights and all biases too; `HookedEncoder` and `HookedEncoderDecoder` start uninitialised);
- `from_hf`: the weights of a tiny random Hugging Face model, converted by TransformerLens'
  own weight converters and loaded the way `HookedTransformer.from_pretrained_no_processing`
  (or, with `processed=True`, `from_pretrained`) loads them. `from_pretrained` itself needs
  the hub for the config, so the config is written here from the HF config, and the logits
  are checked against the HF model.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformer_lens import HookedEncoder, HookedEncoderDecoder, HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained import weight_conversions as wc
from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

from tests.support.tokenizer import VOCAB, tokenizer  # noqa: F401  (re-exported for the tests)

DECODER_ARCHS = ("gpt2", "neox", "llama")

_COMMON = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=64, d_vocab=VOCAB)
_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN", original_architecture="GPT2LMHeadModel"),
    "neox": dict(
        act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True, positional_embedding_type="rotary",
        rotary_dim=8, original_architecture="GPTNeoXForCausalLM",
    ),
    "llama": dict(
        act_fn="silu", normalization_type="RMS", n_key_value_heads=2, positional_embedding_type="rotary",
        rotary_dim=16, gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM",
    ),
    "attn_only": dict(act_fn="gelu", normalization_type="LN", attn_only=True),
    "bert": dict(act_fn="gelu", normalization_type="LN", attention_dir="bidirectional"),
    "t5": dict(
        act_fn="relu", normalization_type="RMS", attention_dir="bidirectional",
        positional_embedding_type="relative_positional_bias", relative_attention_max_distance=128,
        relative_attention_num_buckets=32, use_attn_scale=False, original_architecture="T5ForConditionalGeneration",
    ),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: matrices N(0, 0.2²)·, norm weights 1 + 0.3·N, vectors 0.1·N."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.dim() > 1:
                p.copy_(0.2 * noise)
            elif name.endswith(".w"):  # LayerNorm / RMSNorm weight
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def from_config(arch: str, seed: int = 0) -> Any:
    """A HookedTransformer / HookedEncoder / HookedEncoderDecoder with random weights."""
    cfg = HookedTransformerConfig(**{**_COMMON, **_CONFIGS[arch], "seed": seed})
    cls = {"bert": HookedEncoder, "t5": HookedEncoderDecoder}.get(arch, HookedTransformer)
    return randomize(cls(cfg, tokenizer=tokenizer()), seed).eval()


def hf_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random HF model (norms and biases randomised so every term matters)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
        )
    elif arch == "neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=64,
        ))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
        ))
    elif arch == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, initializer_range=0.1, max_position_embeddings=64,
        ))
    elif arch == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0,
        ))
    else:
        raise ValueError(arch)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                is_norm_weight = name.endswith("weight") and ("norm" in name or "ln" in name.lower())
                p.copy_(1.0 + 0.3 * noise if is_norm_weight else 0.1 * noise)
    return model.eval()


def _hf_config(hf: transformers.PreTrainedModel) -> dict[str, Any]:
    """TransformerLens' own mapping (loading_from_pretrained.convert_hf_model_config) for these five."""
    c = hf.config
    kind = c.model_type
    if kind == "gpt2":
        return dict(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd, n_layers=c.n_layer,
            n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size, act_fn=c.activation_function,
            normalization_type="LN", original_architecture="GPT2LMHeadModel",
        )
    if kind == "gpt_neox":
        d_head = c.hidden_size // c.num_attention_heads
        rotary_pct = get_rotary_pct_from_config(c)
        return dict(
            d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
            act_fn=c.hidden_act, parallel_attn_mlp=True, positional_embedding_type="rotary",
            rotary_adjacent_pairs=False, rotary_dim=round(rotary_pct * d_head), normalization_type="LN",
            original_architecture="GPTNeoXForCausalLM",
        )
    if kind == "llama":
        return dict(
            d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
            eps=c.rms_norm_eps, d_vocab=c.vocab_size, act_fn=c.hidden_act, n_key_value_heads=c.num_key_value_heads,
            normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
            rotary_dim=c.hidden_size // c.num_attention_heads, final_rms=True, gated_mlp=True,
            original_architecture="LlamaForCausalLM",
        )
    if kind == "bert":
        return dict(
            d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
            d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
            eps=c.layer_norm_eps, d_vocab=c.vocab_size, act_fn="gelu", attention_dir="bidirectional",
            original_architecture="BertForMaskedLM",
        )
    if kind == "t5":
        return dict(
            d_model=c.d_model, d_head=c.d_kv, n_heads=c.num_heads, d_mlp=c.d_ff, d_vocab=c.vocab_size,
            n_layers=c.num_layers, n_ctx=512, eps=c.layer_norm_epsilon, act_fn=c.feed_forward_proj,
            positional_embedding_type="relative_positional_bias",
            relative_attention_max_distance=c.relative_attention_max_distance,
            relative_attention_num_buckets=c.relative_attention_num_buckets,
            decoder_start_token_id=c.decoder_start_token_id, attention_dir="bidirectional", use_attn_scale=False,
            tie_word_embeddings=c.tie_word_embeddings, normalization_type="RMS",
            original_architecture="T5ForConditionalGeneration",
        )
    raise ValueError(kind)


def from_hf(hf: transformers.PreTrainedModel, processed: bool = False) -> Any:
    """The HF model's weights in a HookedTransformer/HookedEncoder/HookedEncoderDecoder.

    `processed=False` is `from_pretrained_no_processing`; `processed=True` is `from_pretrained`'s
    default processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases).
    """
    kind = hf.config.model_type
    cfg = HookedTransformerConfig(**_hf_config(hf))
    convert = {
        "gpt2": wc.convert_gpt2_weights, "gpt_neox": wc.convert_neox_weights, "llama": wc.convert_llama_weights,
        "bert": wc.convert_bert_weights, "t5": wc.convert_t5_weights,
    }[kind]
    if kind == "bert" and not isinstance(hf, transformers.BertForPreTraining):
        # TransformerLens converts a BertForPreTraining (it also copies the pooler and the NSP
        # head, which play no part here): give one the MLM model's weights.
        pretraining = transformers.BertForPreTraining(hf.config)
        pretraining.load_state_dict(hf.state_dict(), strict=False)
        hf = pretraining
    state_dict = convert(hf, cfg)
    if kind in ("bert", "t5"):
        cls = HookedEncoder if kind == "bert" else HookedEncoderDecoder
        model = cls(cfg, tokenizer(), move_to_device=False)
        model.load_state_dict(state_dict, strict=False)  # as their from_pretrained does
        return model.eval()
    model = HookedTransformer(cfg, tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=processed, center_writing_weights=processed, center_unembed=processed,
        fold_value_biases=processed,
    )
    return model.eval()
