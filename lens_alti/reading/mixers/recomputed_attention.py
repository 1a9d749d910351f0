"""Attention layers of hybrid models whose bridge caches no pattern (NemotronH's "*" layers).

TransformerLens 4.3 wraps NemotronH's attention as an opaque mixer: only its input
(`mixer.hook_in`, the pre-norm output) and output are cached. The pattern is recomputed
here from that input with the module's own q/k/v projections (no positional encoding in
NemotronH): `softmax(q kᵀ · scaling)` under the causal mask, and under the padding mask the
model applied, which is read from a Mamba layer's zeroed input in the same cache. The
reconstruction check compares the decomposition with the cached `hook_resid_post`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.types import BlockReader


def is_plain_attention(module: Any) -> bool:
    """q/k/v/o projections and a head size, with no rotary or norm on q and k."""
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) and not any(
        hasattr(module, a) for a in ("q_norm", "k_norm", "rotary_emb")
    )


def _linear(x: Tensor, mod: Any) -> Tensor:
    bias = getattr(mod, "bias", None)
    return F.linear(x, mod.weight.detach().to(x.dtype), None if bias is None else bias.detach().to(x.dtype))


def recomputed_attention_reader(
    model: Any, layer: int, arch: str, module: Any, mask_hooks: list[str]
) -> BlockReader:
    """Reader of an attention layer inside `blocks.{layer}.mixer`; `mask_hooks` are the zeroed
    inputs of the model's Mamba layers, from which the padding mask is read."""
    p = f"blocks.{layer}"
    hooks = (f"{p}.hook_resid_pre", f"{p}.mixer.hook_in", f"{p}.hook_resid_post", *mask_hooks[:1])

    def build(cache: Any) -> AttentionBlock:
        h = cache[f"{p}.mixer.hook_in"]
        dtype = torch.promote_types(h.dtype, torch.float32)
        b, n, _ = h.shape
        dh = int(module.head_dim)
        q = _linear(h.to(dtype), module.q_proj).view(b, n, -1, dh)
        k = _linear(h.to(dtype), module.k_proj).view(b, n, -1, dh)
        v = _linear(h.to(dtype), module.v_proj).view(b, n, -1, dh)
        H = q.shape[2]
        k, v = k.repeat_interleave(H // k.shape[2], 2), v.repeat_interleave(H // v.shape[2], 2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * float(module.scaling)
        allowed = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()[None, None]
        if mask_hooks and mask_hooks[0] in cache.keys():
            keep = cache[mask_hooks[0]].ne(0).any(-1)
            allowed = allowed & keep[:, None, None, :]
        pattern = scores.masked_fill(~allowed, torch.finfo(dtype).min).softmax(-1) * allowed
        W_O = module.o_proj.weight.detach().to(dtype).T.reshape(H, dh, -1)
        bias = getattr(module.o_proj, "bias", None)
        return AttentionBlock(
            name=f"{p}.mixer",
            layer=layer,
            pattern=pattern,
            values=v,
            W_O=W_O,
            b_O=None if bias is None else bias.detach().to(dtype),
            residual=cache[f"{p}.hook_resid_pre"],
            target=cache[f"{p}.hook_resid_post"],
            architecture=arch,
        )

    return BlockReader(f"{p}.mixer", hooks, build)
