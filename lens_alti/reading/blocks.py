"""Building the neutral record of one attention module from its hooks and weights."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.norms import post_norm
from lens_alti.reading.records import AttentionBlock, NormAfterAttention


def detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def expand_kv(values: Tensor, n_heads: int, name: str) -> Tensor:
    """Grouped-query attention: query head h reads kv head h // (n_heads // n_kv)."""
    n_kv = values.shape[2]
    if n_kv == n_heads:
        return values
    if n_heads % n_kv:
        raise UnsupportedModelError(f"{name}: {n_heads} query heads cannot share {n_kv} key/value heads evenly")
    return values.repeat_interleave(n_heads // n_kv, dim=2)


def sublayer_block(
    cache: Any,
    model: Any,
    attn: Any,
    names: dict[str, str],
    *,
    layer: int,
    arch: str,
    residual: Tensor,
    post: bool,
    norm_component: Any,
    column: Literal["diagonal", "last"],
) -> AttentionBlock:
    """Record of one (self- or cross-) attention sublayer of an encoder or seq2seq block."""
    norm = None
    if post:
        target = cache[f"{names['norm']}.hook_out"]
        kind = str(getattr(model.cfg, "normalization_type", "LN"))
        norm = post_norm(norm_component, cache[f"{names['norm']}.hook_in"], names["norm"], kind)
    else:
        target = cache[names["output"]]
    return attention_record(cache, attn, names["attn"], layer, arch, residual, target, norm, column)


def attention_record(
    cache: Any,
    attn: Any,
    name: str,
    layer: int,
    arch: str,
    residual: Tensor,
    target: Tensor,
    norm: NormAfterAttention | None,
    column: Literal["diagonal", "last"] = "diagonal",
) -> AttentionBlock:
    """The record of attention module `attn` (hooks under `name`), weights read from the module."""
    W_O: Tensor = attn.W_O.detach()
    return AttentionBlock(
        name=name,
        layer=layer,
        pattern=cache[f"{name}.hook_pattern"],
        values=expand_kv(cache[f"{name}.hook_v"], W_O.shape[0], name),
        W_O=W_O,
        b_O=detach(attn.b_O),
        residual=residual,
        target=target,
        residual_column=column,
        norm=norm,
        architecture=arch,
    )
