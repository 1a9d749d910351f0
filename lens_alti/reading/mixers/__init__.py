"""Linear-recurrent mixers (Mamba, Mamba-2/SSD, short convolutions, gated DeltaNet, RG-LRU: griffin.py).

Such a layer is linear in its per-source values once its data-dependent quantities (Δ, B,
C, gates, decays; SiLU written as the fixed gate sigmoid(p) times p) are fixed at their real
values, so its output is `y_i = x_i + Σ_j T_i(x_j) + bias_i` exactly like a pre-norm
attention block (docs/spec-mixers.md). The reader fills the ordinary `AttentionBlock` record:

- `pattern[b, C, q, k]`: one token-to-token operator per mixer channel (C = the mixer's inner
  width), receiver gates and linearised output norms folded into its rows, the convolution
  window and the recurrence's decay composed into it; `pattern_is_distribution=False`;
- `values[b, k, C, 1]`: each source's value after its pre-norm and `in_proj` (from the cache);
- `W_O[C, 1, d]`: the rows of `out_proj`; `b_O[b, q, d]`: `out_proj`'s bias plus the terms
  of no token the recurrence carries (a convolution bias), per receiver.

Cost: the operator holds `C·n²` numbers per batch item (Mamba-130m, n = 1024: 1536 channels,
6.4 GB in float32), and the decomposition's `VO` another `C·n·d`; read long inputs of real
models one sequence at a time, on a machine that has that memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.layer_kinds import MIXER_ATTRIBUTES, original
from lens_alti.reading.mixers.recomputed_attention import is_plain_attention, recomputed_attention_reader
from lens_alti.reading.mixers.record import applied_mask, mixer_record, out_projection
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.types import BlockReader


def _kind(module: Any) -> tuple[str, Callable[..., Any], str, str | None] | None:
    """(label, operator builder, the hook under the mixer whose activation the builder reads,
    the hook whose input is the layer's input after the layer zeroed padded positions, or None
    where the bridge records none)."""
    from lens_alti.reading.mixers import mamba, recurrent

    if mamba.is_mamba1(module):
        return "Mamba selective scan", mamba.mamba1_operator, "hook_in_proj", "in_proj.hook_in"
    if mamba.is_mamba2(module):
        return "Mamba-2 SSD", mamba.mamba2_operator, "hook_in_proj", "in_proj.hook_in"
    if recurrent.is_short_conv(module):
        return "short convolution", recurrent.short_conv_operator, "hook_in_proj", "in.hook_in"
    if recurrent.is_gated_deltanet(module):
        return "gated DeltaNet", recurrent.gated_deltanet_operator, "hook_in", None
    return None


def find_mixer(block: Any) -> tuple[str, Any] | None:
    """(child name, bridge component) of a block's linear-recurrent mixer, if it has a known one."""
    for child in MIXER_ATTRIBUTES:
        comp = getattr(block, child, None)
        if comp is not None and _kind(original(comp)) is not None:
            return child, comp
    return None


def channels_per_head(module: Any) -> int | None:
    """Channels per head of a mixer with heads (Mamba-2: head_dim; gated DeltaNet: head_v_dim), else None.

    Both lay their inner channels out head-major (`h·P + p`), which is the grouping
    `AttentionBlock.channels_per_head` means.
    """
    from lens_alti.reading.mixers import mamba, recurrent

    if mamba.is_mamba2(module):
        return int(module.head_dim)
    if recurrent.is_gated_deltanet(module):
        return int(module.head_v_dim)
    return None


def _mixer_parts(
    layer: int, found: tuple[str, Any]
) -> tuple[Any, tuple[str, Callable[..., Any], str], str, str, str | None]:
    """(HF mixer module, (label, operator builder, source hook), block prefix, mixer prefix,
    the hook showing which positions the layer zeroed or None) of a found mixer."""
    child, comp = found
    module = original(comp)
    kind, operator, source_hook, mask_hook = _kind(module)  # type: ignore[misc]
    p = f"blocks.{layer}"
    mix = f"{p}.{child}"
    return module, (kind, operator, source_hook), p, mix, None if mask_hook is None else f"{mix}.{mask_hook}"


def mixer_reader(model: Any, layer: int, arch: str, with_attention: bool = False) -> BlockReader | None:
    """The reader of decoder layer `layer` when its token mixer is a known linear-recurrent one.

    The block must be pre-norm, `y = x + m·mixer(norm(x))` (m: the decoder layer's
    `residual_multiplier`, Granite; 1 elsewhere): the target is `hook_resid_mid`
    where the bridge records it, else `hook_resid_pre + <mixer>.hook_out`. With
    `with_attention` (the block also has cached attention), the block is read as parallel
    attention and mixer branches (Falcon-H1), or None is returned when it has no mixer.
    """
    block = model.blocks[layer]
    hf_block = original(block)
    from lens_alti.reading.mixers.griffin import griffin_reader, is_griffin_layer

    if not with_attention and is_griffin_layer(hf_block):  # RecurrentGemma: RG-LRU or local attention
        return griffin_reader(model, layer, arch)
    if not with_attention and getattr(hf_block, "block_type", None) in ("mlp", "moe"):
        return _token_wise_reader(model, layer, arch)  # NemotronH: a layer that is only an MLP
    found = find_mixer(block)
    if found is None:
        inner = original(getattr(block, "mixer", None)) if hasattr(block, "mixer") else None
        if not with_attention and inner is not None and is_plain_attention(inner):
            return recomputed_attention_reader(model, layer, arch, inner, _mask_hooks(model))
        _refuse_unreadable(model, layer, arch, hf_block, with_attention)
        return None
    if with_attention:
        return _parallel_reader(model, layer, arch, found)
    module, (kind, operator, source_hook), p, mix, masked = _mixer_parts(layer, found)
    # Granite's residual multiplier scales the mixer's output before the residual sum.
    out_scale = float(getattr(hf_block, "residual_multiplier", 1.0))
    has_mid = f"{p}.hook_resid_mid" in getattr(model, "hook_dict", {})
    hooks = [f"{p}.hook_resid_pre", f"{mix}.{source_hook}"]
    hooks.append(f"{p}.hook_resid_mid" if has_mid else f"{mix}.hook_out")
    if masked is not None:
        hooks.append(masked)  # shows which positions the layer zeroed (padding)

    def build(cache: Any) -> AttentionBlock:
        mask = applied_mask(cache, masked)
        (op, beta), values = operator(module, cache[f"{mix}.{source_hook}"], f"{mix} ({kind})", mask)
        x = cache[f"{p}.hook_resid_pre"]
        target = cache[f"{p}.hook_resid_mid"] if has_mid else x + cache[f"{mix}.hook_out"]
        return mixer_record(
            name=mix, layer=layer, arch=arch, op=op, beta=beta, values=values,
            out_proj=out_projection(module), residual=x, target=target, source_mask=mask, out_scale=out_scale,
            channels_per_head=channels_per_head(module),
        )

    return BlockReader(mix, tuple(hooks), build)



def _parallel_reader(model: Any, layer: int, arch: str, found: tuple[str, Any]) -> BlockReader:
    """Falcon-H1: `y = x + m_a·attn(norm(x)) + m_s·mixer(norm(x))` in one block.

    Both branches are sums over sources, so one record holds both: the attention heads
    (their values, `e = d_head`) followed by the mixer's channels (values zero-padded from
    1 to `d_head`, with zero `W_O` rows for the padding). `m_a`, `m_s` are the decoder
    layer's `attn_out_multiplier` and `ssm_out_multiplier` (1 where absent).
    """
    from lens_alti.reading.blocks import attention_record

    module, (kind, operator, source_hook), p, mix, masked = _mixer_parts(layer, found)
    child = found[0]
    hf_layer = original(model.blocks[layer])
    m_attn = float(getattr(hf_layer, "attn_out_multiplier", 1.0))
    m_mix = float(getattr(hf_layer, "ssm_out_multiplier", 1.0))
    hooks = (
        f"{p}.hook_resid_pre", f"{mix}.{source_hook}", f"{p}.attn.hook_pattern", f"{p}.attn.hook_v",
        f"{p}.hook_resid_mid",
    ) + (() if masked is None else (masked,))

    def build(cache: Any) -> AttentionBlock:
        x, target = cache[f"{p}.hook_resid_pre"], cache[f"{p}.hook_resid_mid"]
        attn = attention_record(cache, model.blocks[layer].attn, f"{p}.attn", layer, arch, x, target, None)
        mask = applied_mask(cache, masked)
        (op, beta), values = operator(module, cache[f"{mix}.{source_hook}"], f"{mix} ({kind})", mask)
        mixed = mixer_record(
            name=mix, layer=layer, arch=arch, op=op, beta=beta, values=values,
            out_proj=out_projection(module), residual=x, target=target, out_scale=m_mix, source_mask=mask,
        )
        e = attn.values.shape[-1]
        dtype = mixed.pattern.dtype
        mixed_b = mixed.b_O
        assert mixed_b is not None  # internal: mixer_record always sets the bias (beta @ W.T)
        b_O = mixed_b if attn.b_O is None else mixed_b + attn.b_O.to(dtype) * m_attn
        return AttentionBlock(
            name=f"{p}.attn+{child}",
            layer=layer,
            pattern=torch.cat((attn.pattern.to(dtype), mixed.pattern), dim=1),
            values=torch.cat((attn.values.to(dtype), F.pad(mixed.values, (0, e - 1))), dim=2),
            W_O=torch.cat((attn.W_O.to(dtype) * m_attn, F.pad(mixed.W_O, (0, 0, 0, e - 1))), dim=0),
            b_O=b_O,
            residual=x,
            target=target,
            architecture=arch,
            pattern_is_distribution=False,
            recurrent=True,
            # Attention heads (one pattern each, d_head values) and SSM heads (head_dim channels of one
            # value each) share no channel grouping: per-head results are refused for this block.
            has_heads=False,
        )

    return BlockReader(f"{p}.attn+{child}", hooks, build)


def _mask_hooks(model: Any) -> list[str]:
    """The zeroed inputs of the model's Mamba / Mamba-2 / LFM2 layers (they show the padding mask)."""
    out = []
    for layer, block in enumerate(model.blocks):
        found = find_mixer(block)
        kind = None if found is None else _kind(original(found[1]))
        if found is not None and kind is not None and kind[3] is not None:
            out.append(f"blocks.{layer}.{found[0]}.{kind[3]}")
    return out


def _refuse_unreadable(model: Any, layer: int, arch: str, hf_block: Any, with_attention: bool) -> None:
    """Raise for known hybrid layers whose cache lacks what any decomposition needs."""
    p = f"blocks.{layer}"
    cached_full = [h for h in getattr(model, "hook_dict", {}) if h.startswith(f"{p}.")]
    cached = sorted(h[len(p) + 1 :] for h in cached_full)
    have = f"TransformerLens 4.3's bridge exposes only {', '.join(cached) or 'nothing'} for it"
    if hasattr(hf_block, "shared_transformer"):
        raise UnsupportedModelError(
            f"{arch}: layer {layer} is a Zamba2 hybrid layer (a shared attention block whose output feeds a Mamba "
            f"mixer); {have}, not the attention pattern, its values or the mixer's in_proj, so it cannot be "
            "decomposed. Its pure Mamba layers can be read; this model as a whole cannot."
        )
    if not with_attention and getattr(hf_block, "block_type", None) in ("attention", "full_attention"):
        raise UnsupportedModelError(
            f"{arch}: layer {layer} is an attention layer, but {have}: no attention pattern or values "
            "(hook_pattern, hook_v), so it cannot be decomposed."
        )


def _token_wise_reader(model: Any, layer: int, arch: str) -> BlockReader:
    """A layer whose only sublayer is an MLP (NemotronH's "-" and "E" layers): it mixes no tokens.

    `y_i = x_i + mlp(norm(x_i))` is a function of x_i alone, so it is all the receiver's own
    term (as a parallel MLP in docs/spec.md §1e's "residual" mode): T_i(x_i) = y_i, T_i(x_j) = 0 for
    j ≠ i, and the layer's contribution matrix is the identity. The check still compares
    `x + <mixer>.hook_out` with the cached `hook_resid_post`.
    """
    p = f"blocks.{layer}"
    hooks = (f"{p}.hook_resid_pre", f"{p}.mixer.hook_out", f"{p}.hook_resid_post")

    def build(cache: Any) -> AttentionBlock:
        x = cache[f"{p}.hook_resid_pre"]
        b, n, d = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        return AttentionBlock(
            name=f"{p}.mixer",
            layer=layer,
            pattern=x.new_zeros(b, 1, n, n, dtype=dtype),
            values=x.new_zeros(b, n, 1, 1, dtype=dtype),
            W_O=x.new_zeros(1, 1, d, dtype=dtype),
            b_O=None,
            residual=x + cache[f"{p}.mixer.hook_out"],
            target=cache[f"{p}.hook_resid_post"],
            architecture=arch,
            pattern_is_distribution=False,
            recurrent=True,
            has_heads=False,  # an MLP-only layer: no heads
        )

    return BlockReader(f"{p}.mixer", hooks, build)
