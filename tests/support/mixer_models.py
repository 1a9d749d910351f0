"""Tiny random hybrid and attention-free models, built offline and booted as TransformerBridges."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import transformers as T

from tests.support.models import boot
from tests.support.reference import randomize_norms
from tests.support.tokenizer import VOCAB

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)

CONFIGS: dict[str, Callable[[], T.PreTrainedModel]] = {
    "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(**_COMMON, state_size=4, expand=2, conv_kernel=3)),
    "falcon_mamba": lambda: T.FalconMambaForCausalLM(
        T.FalconMambaConfig(**_COMMON, state_size=4, expand=2, conv_kernel=3)
    ),
    "mamba2": lambda: T.Mamba2ForCausalLM(
        T.Mamba2Config(**_COMMON, state_size=4, expand=2, conv_kernel=3, num_heads=8, head_dim=8, n_groups=2)
    ),
    "jamba": lambda: T.JambaForCausalLM(
        T.JambaConfig(
            **_COMMON, **_ATTN, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2, use_mamba_kernels=False,
        )
    ),
    "bamba": lambda: T.BambaForCausalLM(
        T.BambaConfig(
            **_COMMON, **_ATTN, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
            mamba_n_groups=2, attn_layer_indices=[1],
        )
    ),
    "lfm2": lambda: T.Lfm2ForCausalLM(
        T.Lfm2Config(**_COMMON, **_ATTN, conv_L_cache=3, conv_bias=True, layer_types=["conv", "full_attention"])
    ),
    "qwen3_next": lambda: T.Qwen3NextForCausalLM(
        T.Qwen3NextConfig(
            **_COMMON, **_ATTN, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=3, layer_types=["linear_attention", "full_attention"],
            num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        )
    ),
    "qwen3_5": lambda: T.Qwen3_5ForCausalLM(
        T.Qwen3_5TextConfig(
            **_COMMON, **_ATTN, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=3, layer_types=["linear_attention", "full_attention"],
        )
    ),
    "olmo_hybrid": lambda: T.OlmoHybridForCausalLM(
        T.OlmoHybridConfig(
            **_COMMON, **_ATTN, pad_token_id=0, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=3, linear_allow_neg_eigval=True,
            layer_types=["linear_attention", "full_attention"],
        )
    ),
    "granite_moe_hybrid": lambda: T.GraniteMoeHybridForCausalLM(
        T.GraniteMoeHybridConfig(
            **_COMMON, **_ATTN, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
            mamba_n_groups=2, layer_types=["mamba", "attention"], position_embedding_type="rope", num_local_experts=2,
            num_experts_per_tok=1, shared_intermediate_size=32, residual_multiplier=0.6, attention_multiplier=0.3,
            embedding_multiplier=2.0,
        )
    ),
    # Single-sublayer layers: Mamba-2 ("M"), attention with no cached pattern ("*"), MLP ("-").
    "nemotron_h": lambda: T.NemotronHForCausalLM(
        T.NemotronHConfig(
            **{**_COMMON, "num_hidden_layers": 3}, **_ATTN, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=4,
            conv_kernel=3, n_groups=2, expand=2, hybrid_override_pattern="M*-",
        )
    ),
    # Parallel attention and Mamba-2 branches, with non-default µP multipliers.
    "falcon_h1": lambda: T.FalconH1ForCausalLM(
        T.FalconH1Config(
            **_COMMON, **_ATTN, head_dim=8, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=4, mamba_d_conv=3,
            mamba_expand=2, mamba_n_groups=2, mamba_d_ssm=64, ssm_out_multiplier=0.7, attention_out_multiplier=1.3,
            attention_in_multiplier=0.8, ssm_in_multiplier=1.2, ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7],
            key_multiplier=0.9,
        )
    ),
    # Griffin: an RG-LRU recurrent layer, then local attention with a window (3) shorter than the input.
    "recurrent_gemma": lambda: T.RecurrentGemmaForCausalLM(
        T.RecurrentGemmaConfig(
            **{**_COMMON, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            lru_width=32, attention_window_size=3, conv1d_width=3,
            block_types=["recurrent", "attention", "recurrent"],
        )
    ),
}

# Mixers of these get a bias in the convolution and in_proj/out_proj where the config allows it.
MIXER_ARCHS = tuple(CONFIGS)


def hf_mixer_model(arch: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    model = CONFIGS[arch]()
    model.config.architectures = [type(model).__name__]
    randomize_norms(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random D, dt biases and conv biases so that no term is trivially zero.
            if name.endswith((".D", "conv1d.bias", "conv.bias", "dt_bias", "conv_1d.bias", "gate_bias", "linear_x.bias",
                              "linear_y.bias", "linear_out.bias")):
                param.copy_(param + 0.1 * torch.randn(param.shape, generator=gen))
            # Mixer outputs comparable to the residual stream, so that tokens really mix.
            if name.endswith(("out_proj.weight", "linear_attn.o_proj.weight", "linear_out.weight")) and (
                ".self_attn." not in name
            ):
                param.mul_(4.0)
    return model.eval()


def build_mixer_bridge(arch: str, seed: int = 0) -> tuple[T.PreTrainedModel, object]:
    hf = hf_mixer_model(arch, seed)
    return copy.deepcopy(hf), boot(hf)
