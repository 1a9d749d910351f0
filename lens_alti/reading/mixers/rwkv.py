"""RWKV (RWKV-4, `RwkvForCausalLM`): time mixing and channel mixing, two token-mixing steps per layer.

An RWKV layer is `m = x + time_mix(ln1(x))`, `y = m + channel_mix(ln2(m))` (at layer 0, `x` is
`pre_ln` of the block's input). Both sublayers read the previous position through a token shift
`μ ⊙ h_t + (1 − μ) ⊙ h_{t−1}`, so the channel mixing (RWKV's "feed-forward") is NOT token-wise: it is a
second token-mixing step. Each layer therefore gives two records, read one after the other, and
`attribute` gives two rows of `layers` per RWKV layer — `2l` the time mixing of layer l, `2l + 1` its
channel mixing — which the rollout composes in that order (docs/spec-mixers.md, RWKV).

Read from the cache (TransformerLens 4.3 records all of it): `ln1.hook_out`, the key and
receptance projections `time_mix.{key,receptance}.hook_out`, `hook_resid_mid`; `ln2.hook_out`,
`channel_mix.{in,receptance}.hook_out`, `hook_resid_post`. Recomputed with the module's weights:
the per-source values (the value projection of each tap). Checked: the time mixing against the
real `hook_resid_mid`, the channel mixing against the real `hook_resid_post`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.layer_kinds import original
from lens_alti.reading.mixers.record import mixer_record
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.types import BlockReader


def is_rwkv_block(block: Any) -> bool:
    """A bridge block with RWKV's `time_mix` (WKV) and `channel_mix` (token-shifted squared-ReLU FFN)."""
    tm, cm = getattr(block, "time_mix", None), getattr(block, "channel_mix", None)
    return (
        tm is not None
        and cm is not None
        and all(hasattr(original(tm), a) for a in ("time_decay", "time_first", "time_mix_value", "output"))
        and all(hasattr(original(cm), a) for a in ("time_mix_key", "time_mix_receptance", "value"))
    )


def _weight(linear: Any) -> Tensor:
    return original(linear).weight.detach().double()


def wkv_weights(
    key: Float[Tensor, "b n C"], time_decay: Float[Tensor, " C"], time_first: Float[Tensor, " C"]
) -> Float[Tensor, "b C q n"]:
    """`α[c, t, i]`: the WKV average's weight of the value at i in the output at t, per channel.

    `wkv_t = Σ_{i≤t} α[t, i]·v_i` with `α[t, i] ∝ exp(k_i − (t − 1 − i)·w)` for i < t and
    `exp(u + k_t)` for i = t, normalised over i ≤ t (`w = exp(time_decay)`, `u = time_first`): a
    softmax per channel, so each row is a distribution.
    """
    b, n, C = key.shape
    t = torch.arange(n, device=key.device)
    lag = (t[:, None] - 1 - t[None, :]).to(key.dtype)  # t − 1 − i
    kT = key.transpose(1, 2)[:, :, None, :]  # [b, C, 1, n]
    logits = kT - lag[None, None] * time_decay.exp()[None, :, None, None]
    own = (time_first[None, :, None] + key.transpose(1, 2))  # [b, C, n]
    eye = torch.eye(n, dtype=torch.bool, device=key.device)
    logits = torch.where(eye, own[..., None], logits)
    upper = torch.ones(n, n, dtype=torch.bool, device=key.device).triu(1)
    return logits.masked_fill(upper, float("-inf")).softmax(-1)


def _shift_left(op: Tensor) -> Tensor:
    """`out[..., t, j] = op[..., t, j + 1]` (0 for the last j): the operator of the shifted tap."""
    return F.pad(op[..., 1:], (0, 1))


def rwkv_readers(model: Any, layer: int, arch: str) -> list[BlockReader]:
    """The two readers (time mixing, channel mixing) of RWKV layer `layer`; see the module docstring."""
    block = model.blocks[layer]
    att, ffn = original(block.time_mix), original(block.channel_mix)
    p = f"blocks.{layer}"
    x_hook = f"{p}.pre_ln.hook_out" if hasattr(block, "pre_ln") else f"{p}.hook_resid_pre"
    tm, cm = f"{p}.time_mix", f"{p}.channel_mix"
    time_hooks = (
        x_hook, f"{p}.ln1.hook_out", f"{tm}.key.hook_out", f"{tm}.receptance.hook_out", f"{p}.hook_resid_mid",
    )
    chan_hooks = (
        f"{p}.hook_resid_mid", f"{p}.ln2.hook_out", f"{cm}.in.hook_out", f"{cm}.receptance.hook_out",
        f"{p}.hook_resid_post",
    )
    return [
        BlockReader(tm, time_hooks, lambda cache: _time_mix_record(cache, att, layer, arch, x_hook)),
        BlockReader(cm, chan_hooks, lambda cache: _channel_mix_record(cache, ffn, layer, arch)),
    ]


def _time_mix_record(cache: Any, att: Any, layer: int, arch: str, x_hook: str) -> AttentionBlock:
    """`out_t = W_o(σ(r_t) ⊙ Σ_{i≤t} α[t,i] ⊙ v_i)`, `v_i = W_v(μ ⊙ h_i) + W_v((1 − μ) ⊙ h_{i−1})`.

    With k and r fixed, source j reaches t through two taps: as v_j's own input (weight
    `α[t, j]`, value `W_v(μ ⊙ h_j)`) and as v_{j+1}'s shifted input (weight `α[t, j+1]`, value
    `W_v((1 − μ) ⊙ h_j)`): 2C channels, the second half with the shifted operator.

    `att`: the Hugging Face time-mixing module; `x_hook`: the hook of the layer's input `x[b, n, d]`.
    Operator `op[b, 2C, n, n]` (own taps, then shifted taps), values `[b, n, 2C]`.
    """
    p = f"blocks.{layer}"
    tm = f"{p}.time_mix"
    h = cache[f"{p}.ln1.hook_out"].double()
    k = cache[f"{tm}.key.hook_out"].double()
    r = torch.sigmoid(cache[f"{tm}.receptance.hook_out"].double())
    C = k.shape[-1]
    alpha = wkv_weights(k, att.time_decay.detach().double(), att.time_first.detach().double())
    own = alpha * r.transpose(1, 2)[..., None]  # receiver gate σ(r_t)
    op = torch.cat((own, _shift_left(own)), dim=1)
    mu = att.time_mix_value.detach().double().reshape(-1)
    W_v = _weight(att.value)
    values = torch.cat(((h * mu) @ W_v.T, (h * (1 - mu)) @ W_v.T), dim=-1)
    W_o = _weight(att.output)
    if W_o.shape[1] != C or W_v.shape[0] != C:
        raise UnsupportedModelError(
            f"{tm}: key has {C} channels, value {W_v.shape[0]}, output reads {W_o.shape[1]}"
        )
    out = SimpleNamespace(weight=torch.cat((W_o, W_o), dim=1), bias=None)
    b, n = h.shape[:2]
    return mixer_record(
        name=tm, layer=layer, arch=arch, op=op, beta=h.new_zeros(b, n, 2 * C), values=values, out_proj=out,
        residual=cache[x_hook], target=cache[f"{p}.hook_resid_mid"],
    )


def _channel_mix_record(cache: Any, ffn: Any, layer: int, arch: str) -> AttentionBlock:
    """`out_t = σ(r_t) ⊙ W_v(relu(z_t)² )`, `z_t = W_k(μ ⊙ g_t) + W_k((1 − μ) ⊙ g_{t−1})`, g = ln2(m).

    `relu(z)² = relu(z)·z` with `relu(z_t)` and `σ(r_t)` fixed at their real values: source j
    reaches t = j through the own tap and t = j + 1 through the shifted tap. Two "heads" whose
    operators are the identity and the sub-diagonal; their values are the whole transformed
    vectors `σ(r_t) ⊙ W_v(relu(z_t) ⊙ W_k(μ' ⊙ g_j))` for that one receiver (`μ' = μ` or `1 − μ`),
    with `W_O = I`. `ffn`: the Hugging Face channel-mixing module. Record: pattern `[b, 2, n, n]`,
    values `[b, n, 2, d]`.
    """
    p = f"blocks.{layer}"
    cm = f"{p}.channel_mix"
    g = cache[f"{p}.ln2.hook_out"].double()
    gate = F.relu(cache[f"{cm}.in.hook_out"].double())  # [b, n, F]
    r = torch.sigmoid(cache[f"{cm}.receptance.hook_out"].double())  # [b, n, d]
    mu = ffn.time_mix_key.detach().double().reshape(-1)
    W_k, W_v = _weight(ffn.key), _weight(ffn.value)
    own = r * (((g * mu) @ W_k.T * gate) @ W_v.T)  # receiver t = j
    nxt = (g * (1 - mu)) @ W_k.T  # [b, n, F], read by receiver j + 1
    shifted = F.pad(r[:, 1:] * ((nxt[:, :-1] * gate[:, 1:]) @ W_v.T), (0, 0, 0, 1))
    b, n, d = g.shape
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    pattern = torch.stack((eye, _shift_left(eye)), 0)[None].expand(b, 2, n, n)
    x = cache[f"{p}.hook_resid_mid"]
    dtype = torch.promote_types(x.dtype, torch.float32)
    return AttentionBlock(
        name=cm,
        layer=layer,
        pattern=pattern.to(dtype),
        values=torch.stack((own, shifted), 2).to(dtype),
        W_O=torch.eye(d, dtype=dtype, device=g.device)[None].expand(2, d, d),
        b_O=None,
        residual=x,
        target=cache[f"{p}.hook_resid_post"],
        architecture=arch,
        pattern_is_distribution=False,
        recurrent=True,
        has_heads=False,  # the two "heads" are the token shift's taps
    )
