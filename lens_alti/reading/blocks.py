"""Building the neutral record of one attention module from its hooks and weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.gated_output import gated_output
from lens_alti.reading.geometry import ValueLayout, check_same_shape, check_sub_distribution, checked_values
from lens_alti.reading.head_norm import fold_head_norm
from lens_alti.reading.norms import post_norm
from lens_alti.reading.records import AttentionBlock, NormAfterAttention, PatternRows, pattern_placeholder


def detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


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
    out_norm: tuple[Any, str] | None = None,
) -> AttentionBlock:
    """Record of one (self- or cross-) attention sublayer of an encoder or seq2seq block.

    `out_norm` = (norm component, its hook prefix) for a norm on the attention output only
    (T5Gemma's post_self_attn_layernorm / post_cross_attn_layernorm, docs/spec.md §1d).
    """
    norm = None
    if out_norm is not None:
        if post:
            raise UnsupportedModelError(f"{names['attn']}: a post-LN block with a norm on the attention output")
        component, hook = out_norm
        kind = str(getattr(model.cfg, "normalization_type", "RMS"))
        norm = post_norm(component, cache[f"{hook}.hook_in"], hook, kind, "attn_out")
        target = cache[names["output"]]
    elif post:
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
    *,
    value_layout: ValueLayout = "pos_major",
    values_map: Callable[[Tensor], Tensor] | None = None,
    W_O: Tensor | None = None,
    b_O: Tensor | None = None,
    head_norm: Any = None,
    gate_input: Tensor | None = None,
    gate_pre: Tensor | None = None,
    sinks: bool = False,
) -> AttentionBlock:
    """The record of attention module `attn` (hooks under `name`), weights read from the module.

    `value_layout` is how `hook_v` lays out its axes (see `geometry`); `values_map`, if given,
    maps the cached values to what the pattern really averages (a value norm after `hook_v`);
    `W_O`/`b_O` override the module's (per-layer weights, receiver-independent rescalings);
    `head_norm` is a norm on the concatenated heads before W_O (see `head_norm`);
    `gate_input` is o_proj's real input when the output is gated per receiver, `gate_pre` the
    cached gate pre-activation if any (see `gated_output`: a per-channel gate turns the
    record's heads into head·d_head channels);
    `sinks`: attention sinks take part of each row's mass, so rows sum to at most 1 (GPT-OSS).
    Every shape is validated before any arithmetic.
    """
    W_O = attn.W_O.detach() if W_O is None else W_O  # a TransformerLens attention always has W_O
    b_O = detach(attn.b_O) if b_O is None else b_O
    pattern, rows = read_pattern(cache[f"{name}.hook_pattern"])
    if rows is not None and (sinks or gate_input is not None or head_norm is not None):
        raise UnsupportedModelError(f"{name}: recomputed attention rows with sinks, an output gate or a head norm")
    values = cache[f"{name}.hook_v"]
    if values_map is not None:
        values = values_map(values)
    values = checked_values(pattern, values, W_O, name, value_layout)
    if column == "diagonal":
        check_same_shape(residual, target, f"{name}: the residual stream", "the block output")
    if target.shape[:2] != pattern.shape[:1] + pattern.shape[2:3] or target.shape[-1] != W_O.shape[-1]:
        raise_shape(name, target, pattern, W_O)
    distribution = True
    if sinks:
        check_sub_distribution(pattern, name)
        distribution = False  # checked here: rows sum to at most 1
    channels_per_head = 1
    if gate_input is not None:
        pattern, values, W_O, channels_per_head = gated_output(pattern, values, W_O, gate_input, name, gate_pre)
        distribution = False  # rows now sum to the receiver's gate (checked as attention in gated_output)
    if head_norm is not None:
        if norm is not None:
            raise UnsupportedModelError(f"{name}: a norm before W_O and one after attention together are not supported")
        W_O, norm = fold_head_norm(head_norm, name, W_O, b_O, pattern, values)
        b_O = None
    return AttentionBlock(
        name=name,
        layer=layer,
        pattern=pattern,
        values=values,
        W_O=W_O,
        b_O=b_O,
        residual=residual,
        target=target,
        residual_column=column,
        norm=norm,
        architecture=arch,
        pattern_is_distribution=distribution,
        channels_per_head=channels_per_head,
        output_gated=gate_input is not None,
        pattern_rows=rows,
    )


def read_pattern(value: Any) -> tuple[Tensor, PatternRows | None]:
    """(the pattern, None) for a dense `hook_pattern`; for rows recomputed on demand (`reading/efficient.py`),
    (a placeholder of the pattern's shape, the rows)."""
    if isinstance(value, Tensor):
        return value, None
    shape, dtype, device = value.shape, value.dtype, value.device
    return pattern_placeholder(tuple(shape), dtype, device), value


def raise_shape(name: str, target: Tensor, pattern: Tensor, W_O: Tensor) -> None:
    raise UnsupportedModelError(
        f"{name}: the block output has shape {list(target.shape)} but hook_pattern {list(pattern.shape)} and "
        f"W_O {list(W_O.shape)} need [batch, query, d_model] = [{pattern.shape[0]}, {pattern.shape[2]}, "
        f"{W_O.shape[-1]}]"
    )
