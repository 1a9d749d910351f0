"""T5-style attention whose bridge caches the position bias as `hook_pattern` (Switch Transformers).

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


class RecomputedPatternCache:
    """A read-only view of a cache whose `{name}.hook_pattern` is the recomputed attention."""

    def __init__(self, cache: Any, name: str, hf_attn: Any, bias_module: Any | None, causal: bool) -> None:
        self._cache, self._name = cache, name
        self._args = (hf_attn, bias_module, causal)

    def keys(self) -> Any:
        return self._cache.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._cache.keys()

    def __getitem__(self, key: str) -> Tensor:
        if key == f"{self._name}.hook_pattern":
            q, k = self._cache[f"{self._name}.hook_q"], self._cache[f"{self._name}.hook_k"]
            return recompute_pattern(q, k, *self._args, name=self._name)
        return self._cache[key]


def pattern_shape(cache: Any, name: str) -> tuple[int, ...]:
    """`[batch, head, query, key]` of the recomputed pattern, from the cached queries and keys."""
    q, k = cache[f"{name}.hook_q"], cache[f"{name}.hook_k"]
    return (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
