"""T5-style attention whose pattern is recomputed from the cached queries and keys.

Switch Transformers (the bridge caches the position bias as `hook_pattern`) and LongT5's local
encoder attention (the bridge caches no pattern at all; see `local_pattern`).

Hugging Face's T5-family attention returns `(output, position_bias, weights)`; TransformerLens
4.3 reroutes that for T5 and mT5 but not for Switch Transformers, whose `hook_pattern` (and
`hook_attn_scores`) then hold the relative position bias `[1, head, query, key]`, not the
attention. The bridge does cache the real queries and keys, so the pattern is recomputed
here exactly as the module computes it:

    A = softmax(scaling · q kᵀ + bias + causal mask)

with `bias` from the stack's first self-attention module (`compute_bias`, which owns the
relative-position embedding shared by every layer of the stack), no bias in cross-attention,
and the causal mask in decoder self-attention. The padding mask is not cached; padded keys
get probability exactly 0 in the real softmax (an additive `finfo.min`), which is the same
as renormalising the unmasked row over the valid keys, so the record says so
(`AttentionBlock.padding_unmasked`) and `attribute` renormalises with the mask it is given.
The reconstruction check compares the result with the real block output, so a wrong mask
is reported, never silently used.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.layer_kinds import original
from lens_alti.reading.types import CacheView


def caches_bias_as_pattern(bridge_attn: Any) -> bool:
    """True for a T5-style attention module whose bridge does not reroute its position bias."""
    hf = original(bridge_attn)
    return callable(getattr(hf, "compute_bias", None)) and not getattr(
        bridge_attn, "requires_relative_position_bias", False
    )


def recompute_pattern(
    q: Float[Tensor, "b q h e"], k: Float[Tensor, "b k h e"], hf_attn: Any, bias_module: Any | None, causal: bool,
    name: str,
) -> Float[Tensor, "b h q k"]:
    """The attention probabilities from cached queries and keys (see the module docstring)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise UnsupportedModelError(
            f"{name}: hook_q {list(q.shape)} and hook_k {list(k.shape)} must be [batch, pos, head, d_head] with the "
            "same batch, heads and head size"
        )
    scaling = float(getattr(hf_attn, "scaling", 1.0) or 1.0)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * scaling
    n_q, n_k = q.shape[1], k.shape[1]
    if bias_module is not None:
        with torch.no_grad():
            bias = bias_module.compute_bias(n_q, n_k, device=q.device)
        scores = scores + bias.to(scores.dtype)
    if causal:
        upper = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    return scores.softmax(dim=-1)


def local_block_len(hf_attn: Any, name: str) -> int | None:
    """LongT5's local attention: the block length (local_radius + 1), or None for other modules.

    Raises UnsupportedModelError for LongT5's transient-global attention.
    """
    if type(hf_attn).__name__ == "LongT5TransientGlobalAttention":
        raise UnsupportedModelError(
            f"{name}: LongT5's transient-global attention adds keys that are normalised sums of blocks of tokens "
            "(computed inside the module and not cached), which lens_alti does not decompose; use "
            "encoder_attention_type='local'"
        )
    if type(hf_attn).__name__ == "LongT5LocalAttention":
        return int(hf_attn.block_len)
    return None


def local_pattern(
    q: Float[Tensor, "b n h e"], k: Float[Tensor, "b n h e"], bias_module: Any, block_len: int, name: str
) -> Float[Tensor, "b h n n"]:
    """LongT5's local attention written densely: softmax over the keys with |i − j| < block_len.

    The module splits the sequence into blocks of `block_len` and lets each block attend to
    itself and its two neighbours, masking |i − j| ≥ block_len and the blocks' zero padding;
    the relative bias of a (query, key) pair depends on j − i only, so the dense form is
    `q_i·k_j + bias(j − i)` over that band (no 1/√d scaling, as in T5).
    """
    if q.ndim != 4 or q.shape != k.shape:
        raise UnsupportedModelError(
            f"{name}: hook_q {list(q.shape)} and hook_k {list(k.shape)} must both be [batch, pos, head, d_head]"
        )
    n = q.shape[1]
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k)
    pos = torch.arange(n, device=q.device)
    rel = pos[None, :] - pos[:, None]  # j − i
    with torch.no_grad():
        buckets = bias_module._relative_position_bucket(
            rel, bidirectional=not bias_module.is_decoder, num_buckets=bias_module.relative_attention_num_buckets,
            max_distance=bias_module.relative_attention_max_distance,
        )
        bias = bias_module.relative_attention_bias(buckets).permute(2, 0, 1)  # [h, n, n]
    scores = (scores + bias.to(scores.dtype)).masked_fill(rel.abs() >= block_len, float("-inf"))
    return scores.softmax(dim=-1)


class RecomputedPatternCache(CacheView):
    """A read-only view of a cache whose `{name}.hook_pattern` is the recomputed attention.

    `local_len`: LongT5's local attention with this block length (`local_pattern`); otherwise the
    T5-style full attention of `recompute_pattern`.
    """

    def __init__(
        self, cache: Any, name: str, hf_attn: Any, bias_module: Any | None, causal: bool, local_len: int | None = None
    ) -> None:
        super().__init__(cache)
        self._name = name
        self._args = (hf_attn, bias_module, causal)
        self._local = local_len

    def __getitem__(self, key: str) -> Tensor:
        if key == f"{self._name}.hook_pattern":
            q, k = self._cache[f"{self._name}.hook_q"], self._cache[f"{self._name}.hook_k"]
            if self._local is not None:
                return local_pattern(q, k, self._args[1], self._local, self._name)
            return recompute_pattern(q, k, *self._args, name=self._name)
        return self._cache[key]


def pattern_shape(cache: Any, name: str) -> tuple[int, ...]:
    """`[batch, head, query, key]` of the recomputed pattern, from the cached queries and keys."""
    q, k = cache[f"{name}.hook_q"], cache[f"{name}.hook_k"]
    return (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
