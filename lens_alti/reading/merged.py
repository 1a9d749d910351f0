"""Merged self- and cross-attention (T5Gemma2's decoder): one softmax over [target prefix ; source].

T5Gemma2's decoder layer has one attention module whose queries (the decoder tokens) attend,
in a single softmax, to the decoder prefix's keys and the encoder output's keys, with the same
`v_proj` / `o_proj` for both, and then a norm on the attention output:

    y_i = x_i + PostNorm( Σ_h [ Σ_{j≤i} A[h,i,j] v(xn_j) + Σ_s A[h,i,T+s] v(e_s) ] W_O[h] )

It is one attention block whose sources are the T target-prefix tokens (with the residual on
the diagonal) followed by the S source tokens. The record's keys are `[target ; source]`:
pattern `[b, h, T, T+S]` = `hook_pattern` (the self slice) next to `hook_cross_pattern`.
The bridge's `hook_v` fires twice per forward pass (decoder tokens, then encoder tokens) and
keeps the second, so both value sets are recomputed here from `v_proj`'s weights on the real
inputs (`ln1.hook_out`, the pre-norm decoder stream, and `encoder_ln_final.hook_out`, the
encoder output); the reconstruction check compares the sum with the real block output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.geometry import check_same_shape, checked_values, output_weights
from lens_alti.reading.layer_kinds import original
from lens_alti.reading.norms import post_norm
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.types import BlockReader

ENCODER_OUTPUT = "encoder_ln_final.hook_out"


def is_merged(model: Any) -> bool:
    """True when the decoder's attention also attends to the encoder (T5Gemma2's merged attention)."""
    return "decoder_blocks.0.self_attn.hook_cross_pattern" in getattr(model, "hook_dict", {})


def _linear(module: Any, name: str) -> tuple[Tensor, Tensor | None]:
    lin = original(module)  # the bridge wraps it in place
    if not isinstance(lin, torch.nn.Linear):
        raise UnsupportedModelError(f"{name}: cannot read v_proj's weights to recompute the values")
    return lin.weight.detach(), (None if lin.bias is None else lin.bias.detach())


def _values(x: Tensor, weight: Tensor, bias: Tensor | None, d_head: int, name: str) -> Tensor:
    """`v_proj(x)` as `[batch, pos, kv_heads, d_head]`."""
    if x.shape[-1] != weight.shape[1] or weight.shape[0] % d_head:
        raise UnsupportedModelError(
            f"{name}: v_proj {list(weight.shape)} cannot read inputs of width {x.shape[-1]} into heads of {d_head}"
        )
    v = x @ weight.T.to(x.dtype)
    if bias is not None:
        v = v + bias.to(x.dtype)
    return v.view(*x.shape[:2], weight.shape[0] // d_head, d_head)


def merged_readers(model: Any, arch: str) -> list[BlockReader]:
    """One reader per decoder layer; each record's keys are the T target tokens then the S source tokens."""
    readers = []
    for layer in range(len(model.decoder_blocks)):
        p = f"decoder_blocks.{layer}"
        name = f"{p}.self_attn"
        block = model.decoder_blocks[layer]
        if not hasattr(block, "ln1_post"):
            raise UnsupportedModelError(f"{arch}: {name} is merged attention without a post-attention norm")
        hooks = (
            f"{name}.hook_pattern", f"{name}.hook_cross_pattern", f"{p}.hook_resid_pre", f"{p}.ln1.hook_out",
            f"{p}.ln1_post.hook_in", f"{p}.ln2.hook_in", ENCODER_OUTPUT,
        )

        def build(cache: Any, layer: int = layer, p: str = p, name: str = name) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            W_O, b_O = output_weights(block.self_attn, name)
            self_pattern, cross_pattern = cache[f"{name}.hook_pattern"], cache[f"{name}.hook_cross_pattern"]
            if self_pattern.shape[:3] != cross_pattern.shape[:3]:
                raise UnsupportedModelError(
                    f"{name}: hook_pattern {list(self_pattern.shape)} and hook_cross_pattern "
                    f"{list(cross_pattern.shape)} must share [batch, head, query]"
                )
            pattern = torch.cat([self_pattern, cross_pattern], dim=-1)
            weight, bias = _linear(original(block.self_attn).v_proj, name)
            d_head = W_O.shape[1]
            values = torch.cat(
                [_values(cache[f"{p}.ln1.hook_out"], weight, bias, d_head, name),
                 _values(cache[ENCODER_OUTPUT], weight, bias, d_head, name)], dim=1,
            )
            values = checked_values(pattern, values, W_O, name)
            residual, target = cache[f"{p}.hook_resid_pre"], cache[f"{p}.ln2.hook_in"]
            check_same_shape(residual, target, f"{name}: the residual stream", "the block output")
            norm = post_norm(block.ln1_post, cache[f"{p}.ln1_post.hook_in"], f"{p}.ln1_post", "RMS", "attn_out")
            return AttentionBlock(
                name=name, layer=layer, pattern=pattern, values=values, W_O=W_O, b_O=b_O, residual=residual,
                target=target, residual_column="diagonal", norm=norm, architecture=arch,
            )

        def shape(cache: Any, name: str = name) -> tuple[int, ...]:
            b, h, t, _ = cache[f"{name}.hook_pattern"].shape
            return (b, h, t, t + cache[f"{name}.hook_cross_pattern"].shape[-1])

        readers.append(BlockReader(name, hooks, build, shape=shape))
    return readers
