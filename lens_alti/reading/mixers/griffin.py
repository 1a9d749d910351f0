"""RecurrentGemma (Griffin) layers: the RG-LRU recurrent block and local attention.

A RecurrentGemma decoder layer is `r = x + temporal(n₁(x))`, `y = r + mlp(n₂(r))`, with the
temporal block either the recurrent block (docs/spec-mixers.md §2, RG-LRU)

    out = linear_out( gelu(linear_y(h)) ⊙ RG-LRU(conv(linear_x(h))) ),   h = n₁(x)

or local (sliding-window) attention with partial rotary embeddings.

What the cache holds: TransformerLens 4.3's bridge records only the layer's input
(`hook_resid_pre`) and output (`hook_resid_post`) for these layers (its `hook_mlp_in` never
fires). So everything inside is recomputed here from the real `hook_resid_pre` with the Hugging
Face modules' own weights: the pre-norm `h`, the per-source values `linear_x(h)`, the receiver
gate `gelu(linear_y(h))`, the convolution's output, the RG-LRU gates (or the attention pattern).

What is checked against what: the residual between the temporal block and the MLP, `r`, is not
cached. The record's target is `hook_resid_post − mlp(n₂(r̂))`, with `r̂ = x + Σ_j T_i(x_j) +
bias_i` the decomposition's own reconstruction, computed independently of `decompose` here; so the
reconstruction check verifies `r̂ + mlp(n₂(r̂)) = hook_resid_post`, the real cached output, through
the layer's own (token-wise) MLP. An error `ε` in `r̂` shows as `(I + J)ε` (J the MLP's Jacobian),
which vanishes only in degenerate cases.

Padding: the recurrent block ignores the attention mask (padded positions before a real token
enter its convolution and recurrence in the model itself), so a left-padded batch is refused by
the generic check of recurrent mixers that read padded positions; right padding is exact.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.layer_kinds import original
from lens_alti.reading.mixers.operators import causal_conv, compose
from lens_alti.reading.mixers.record import mixer_record
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.types import BlockReader


def is_griffin_layer(hf_layer: Any) -> bool:
    """A RecurrentGemma decoder layer: `temporal_pre_norm`, `temporal_block`, `channel_pre_norm`, `mlp_block`."""
    return all(hasattr(hf_layer, a) for a in ("temporal_pre_norm", "temporal_block", "channel_pre_norm", "mlp_block"))


def _is_rglru_block(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("rg_lru", "linear_x", "linear_y", "linear_out", "conv_1d"))


def _is_local_attention(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb", "head_dim"))


def gated_decay(log_a: Float[Tensor, "b n C"], reset: Float[Tensor, "b n"]) -> Float[Tensor, "b C q n"]:
    """`Π_{r=s+1..t} a_r` for s ≤ t (0 above the diagonal), with `a_r = 0` where `reset[r]` (the
    recurrence restarts there: no source before r reaches t ≥ r)."""
    keep = ~reset.bool()
    cum = (log_a * keep[..., None]).cumsum(1).transpose(1, 2)  # [b, C, n]
    segment = reset.long().cumsum(1)  # [b, n]: sources and receivers in the same segment only
    n = cum.shape[-1]
    seg = cum[..., :, None] - cum[..., None, :]
    same = (segment[:, :, None] == segment[:, None, :])[:, None]  # [b, 1, q, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=cum.device).tril()
    return seg.masked_fill(~(same & causal), float("-inf")).exp()


def rglru_operator(module: Any, h: Tensor, name: str) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """`((M, β), values)` of a RecurrentGemma recurrent block from its input `h = n₁(x)` `[b, n, d]`.

    Per channel c (the `lru_width` channels): `p = conv(v) + b_conv` with `v = linear_x(h)` (the
    values), gates `i = σ(blockdiag(W_i) p + b_i)`, `ρ = σ(blockdiag(W_a) p + b_a)`,
    `log a = −8·ρ·softplus(Λ)`; the scan `s_t = a_t·s_{t−1} + √(1 − a_t²)·i_t·p_t` restarts at
    position 0 (there `a = 0` and the multiplier is 1); `out_t = gelu(linear_y(h_t)) ⊙ s_t`. With
    `a`, `i` and the gelu branch fixed at their real values: kernel `Π a` (a causal decay), source
    gate `√(1−a²)·i`, receiver gate `gelu(linear_y(h))`, the convolution composed on the sources.
    """
    lru = module.rg_lru
    H, bw = int(lru.num_attention_heads), int(lru.block_width)
    wdtype = module.linear_x.weight.dtype
    with torch.no_grad():
        hh = h.to(wdtype)
        receiver = module.act_fn(module.linear_y(hh)).double()
        values = module.linear_x(hh)
    bsz, n, ch = values.shape
    if ch != H * bw:
        raise UnsupportedModelError(f"{name}: linear_x gives {ch} channels, the RG-LRU reads {H}·{bw}")
    w = module.conv_1d.weight.detach()[:, 0, :].double()
    cb = None if module.conv_1d.bias is None else module.conv_1d.bias.detach().double()
    p = causal_conv(values.double(), w, cb)  # [b, n, C], the convolution's real output
    blocks = p.view(bsz, n, H, bw)
    gate_i = torch.sigmoid(
        torch.einsum("bnhi,hij->bnhj", blocks, lru.input_gate_weight.detach().double())
        + lru.input_gate_bias.detach().double()
    ).reshape(bsz, n, ch)
    rho = torch.sigmoid(
        torch.einsum("bnhi,hij->bnhj", blocks, lru.recurrent_gate_weight.detach().double())
        + lru.recurrent_gate_bias.detach().double()
    ).reshape(bsz, n, ch)
    log_a = -8.0 * rho * F.softplus(lru.recurrent_param.detach().double())
    # The model resets the recurrence where position_ids == 0: at the first position (arange).
    reset = torch.zeros(bsz, n, dtype=torch.bool, device=p.device)
    reset[:, 0] = True
    multiplier = torch.where(reset[..., None], torch.ones_like(log_a), torch.sqrt(1 - torch.exp(2 * log_a)))
    op = compose(
        gated_decay(log_a, reset),
        receiver_gate=receiver,
        source_gate=gate_i * multiplier,
        conv_weight=w,
        conv_bias=cb,
    )
    return op, values


def _rotary(module: Any, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """q, k `[b, H, n, e]` with the module's own rotary embedding (partial: the first `rotary_dim`)."""
    cos, sin = module.rotary_emb(q, positions)
    apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise UnsupportedModelError(f"{type(module).__name__}: its module has no apply_rotary_pos_emb")
    return apply(q, k, cos, sin)


def local_attention_pattern(module: Any, h: Tensor) -> tuple[Tensor, Tensor]:
    """(pattern `[b, H, q, k]`, values `[b, k, H, e]`) of RecurrentGemma's local attention from
    its input `h = n₁(x)`: rotary q, k at positions `0..n−1`, `softmax(q kᵀ·scaling)` where
    `0 ≤ i − j < sliding_window`; grouped key/value heads repeated."""
    bsz, n, _ = h.shape
    dh = int(module.head_dim)
    wdtype = module.q_proj.weight.dtype
    with torch.no_grad():
        hh = h.to(wdtype)
        q = module.q_proj(hh).view(bsz, n, -1, dh).transpose(1, 2)
        k = module.k_proj(hh).view(bsz, n, -1, dh).transpose(1, 2)
        v = module.v_proj(hh).view(bsz, n, -1, dh)
        positions = torch.arange(n, device=h.device)[None].expand(bsz, n)
        q, k = _rotary(module, q, k, positions)
    H = q.shape[1]
    k = k.double().repeat_interleave(H // k.shape[1], 1)
    v = v.double().repeat_interleave(H // v.shape[2], 2)
    scores = torch.einsum("bhqe,bhke->bhqk", q.double(), k) * float(module.scaling)
    i = torch.arange(n, device=h.device)
    lag = i[:, None] - i[None, :]
    window = getattr(module, "sliding_window", None)
    allowed = (lag >= 0) & (lag < (window if window is not None else n + 1))
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return pattern, v


def griffin_reader(model: Any, layer: int, arch: str) -> BlockReader:
    """Reader of RecurrentGemma decoder layer `layer` (see the module docstring)."""
    hf_layer = original(model.blocks[layer])
    temporal = hf_layer.temporal_block
    p = f"blocks.{layer}"
    name = f"{p}.temporal_block"
    hooks = (f"{p}.hook_resid_pre", f"{p}.hook_resid_post")
    if _is_rglru_block(temporal):
        kind = "RG-LRU"
    elif _is_local_attention(temporal):
        kind = "local attention"
    else:
        raise UnsupportedModelError(
            f"{arch}: layer {layer}'s temporal block is a {type(temporal).__name__}, neither the RG-LRU recurrent "
            "block nor the local attention lens_alti reads"
        )

    def target_of(x: Tensor, mixed: Tensor, post: Tensor) -> Tensor:
        """`hook_resid_post − mlp(n₂(r̂))`, r̂ = x + mixed (the reconstruction); see the module docstring."""
        r_hat = x.double() + mixed
        wdtype = hf_layer.mlp_block.down_proj.weight.dtype
        with torch.no_grad():
            mlp = hf_layer.mlp_block(hf_layer.channel_pre_norm(r_hat.to(wdtype))).double()
        return (post.double() - mlp).to(post.dtype)  # the cache's precision (half tolerance for a half cache)

    def build(cache: Any) -> AttentionBlock:
        x = cache[f"{p}.hook_resid_pre"]
        post = cache[f"{p}.hook_resid_post"]
        with torch.no_grad():
            h = hf_layer.temporal_pre_norm(x.to(hf_layer.temporal_pre_norm.weight.dtype))
        if kind == "RG-LRU":
            (op, beta), values = rglru_operator(temporal, h, f"{name} ({kind})")
            record = mixer_record(
                name=name, layer=layer, arch=arch, op=op, beta=beta, values=values,
                out_proj=temporal.linear_out, residual=x, target=post,
            )
            mixed = torch.einsum("bcts,bsc->btc", op, values.double()) @ temporal.linear_out.weight.detach().double().T
            mixed = mixed + beta @ temporal.linear_out.weight.detach().double().T
            if temporal.linear_out.bias is not None:
                mixed = mixed + temporal.linear_out.bias.detach().double()
            return replace(record, target=target_of(x, mixed, post))
        pattern, v = local_attention_pattern(temporal, h)
        H, dh = pattern.shape[1], v.shape[-1]
        W_O = temporal.o_proj.weight.detach().double().T.reshape(H, dh, -1)
        bias = temporal.o_proj.bias
        mixed = torch.einsum("bhqk,bkhe,hed->bqd", pattern, v, W_O)
        if bias is not None:
            mixed = mixed + bias.detach().double()
        dtype = torch.promote_types(x.dtype, torch.float32)
        return AttentionBlock(
            name=name,
            layer=layer,
            pattern=pattern.to(dtype),
            values=v.to(dtype),
            W_O=W_O.to(dtype),
            b_O=None if bias is None else bias.detach().to(dtype),
            residual=x,
            target=target_of(x, mixed, post),
            architecture=arch,
        )

    return BlockReader(name, hooks, build)

