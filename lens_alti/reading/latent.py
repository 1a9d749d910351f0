"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4-MoE-Lite, GLM-MoE-DSA, Youtu).

The values are decompressed from a shared low-rank latent per token (`kv_b_proj`), so each
head's value is still a function of its source token alone and the block is attention as
usual. The TransformerBridge stores `hook_v` of these modules head-major,
`[batch, head, pos, d_head]`, unlike TransformerLens's `[batch, pos, head, d_head]`.
"""

from __future__ import annotations

from typing import Any

from lens_alti.reading.geometry import ValueLayout


def is_latent_attention(hf_attn: Any) -> bool:
    """Multi-head latent attention: the module decompresses keys and values from a latent."""
    return hasattr(hf_attn, "kv_b_proj") or hasattr(hf_attn, "kv_a_proj_with_mqa")


def value_layout(hf_attn: Any) -> ValueLayout:
    """How the bridge lays out `hook_v` for this attention module."""
    return "head_major" if is_latent_attention(hf_attn) else "pos_major"
