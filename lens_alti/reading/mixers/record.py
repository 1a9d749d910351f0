"""The record of a linear-recurrent mixer layer, and the small readers every mixer module shares.

`mixer_record` builds the ordinary `AttentionBlock` from a channel operator (the mixers
package docstring and docs/spec-mixers.md say what its fields mean for a mixer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.spellings import spelled


def applied_mask(cache: Any, hook: str | None) -> Tensor | None:
    """`[b, n]` True where the layer kept the position, from its masked input (None: no padding seen).

    The Hugging Face mixers multiply their input by the attention mask before `in_proj`, so the
    positions the layer treated as padding are exactly the all-zero rows of that input.
    """
    if hook is None or hook not in cache.keys():
        return None
    mask = cache[hook].ne(0).any(-1)
    return None if bool(mask.all()) else mask


def out_projection(module: Any) -> Any:
    """The mixer's output projection (`out_proj`, or OLMo-hybrid's `o_proj`)."""
    return spelled(module, "out_proj")


def mixer_record(
    *,
    name: str,
    layer: int,
    arch: str,
    op: Tensor,
    beta: Tensor,
    values: Tensor,
    out_proj: Any,
    residual: Tensor,
    target: Tensor,
    out_scale: float = 1.0,
    source_mask: Tensor | None = None,
    channels_per_head: int | None = None,
) -> AttentionBlock:
    """The `AttentionBlock` of a mixer whose channel operator is `op` (see the module docstring).

    `out_scale` multiplies the mixer's output before the residual sum (a residual multiplier).
    `source_mask[b, k]` (False = padding): what padded positions still pass on (their value is
    `in_proj` of a zeroed input, i.e. its bias) belongs to no token, so it moves to the bias
    and the operator's padded columns become 0.
    `channels_per_head`: the mixer's channels are heads of this many contiguous channels
    (Mamba-2: head_dim, gated DeltaNet: head_v_dim), which makes per-head results available;
    None for mixers without heads (Mamba-1, short convolutions).
    """
    dtype = torch.promote_types(residual.dtype, torch.float32)
    if source_mask is not None:
        pad = (~source_mask).to(op.dtype)  # [b, k]
        beta = beta + torch.einsum("bctk,bkc->btc", op * pad[:, None, None, :], values.to(op.dtype))
        op = op * (1 - pad)[:, None, None, :]
    W = out_proj.weight.detach().double() * out_scale  # [d, C]
    b_O = beta @ W.T
    if getattr(out_proj, "bias", None) is not None:
        b_O = b_O + out_proj.bias.detach().double() * out_scale
    n_ch = W.shape[1]
    if op.shape[1] != n_ch or values.shape[-1] != n_ch:
        raise UnsupportedModelError(
            f"{name}: the operator has {op.shape[1]} channels and the values {values.shape[-1]}, "
            f"but out_proj reads {n_ch}"
        )
    return AttentionBlock(
        name=name,
        layer=layer,
        pattern=op.to(dtype),
        values=values.to(dtype)[..., None],
        W_O=W.T[:, None, :].to(dtype),
        b_O=b_O.to(dtype),
        residual=residual,
        target=target,
        architecture=arch,
        pattern_is_distribution=False,
        recurrent=True,
        channels_per_head=channels_per_head or 1,
        has_heads=channels_per_head is not None and n_ch % channels_per_head == 0,
    )
