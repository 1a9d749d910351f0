"""Short causal convolutions (LFM2) and gated DeltaNet (Qwen3-Next, Qwen3.5) as channel operators.

Both recompute their data-dependent quantities from a cached activation with the module's
own weights (TransformerLens 4.3 caches some of them, not the convolution's pre-activation
that the SiLU gate needs): the short convolution from its `in_proj` output, gated DeltaNet
from the mixer's input (the layer's pre-norm output), through the module's own projections.
The reconstruction check compares the result with the real layer output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.mixers.operators import causal_conv, compose
from lens_alti.reading.spellings import norm_eps, spelled

Operator = tuple[Tensor, Tensor]


def is_short_conv(module: Any) -> bool:
    """LFM2's gated short convolution: `in_proj` to [B | C | x], depthwise `conv`, `out_proj`."""
    conv = getattr(getattr(module, "conv", None), "weight", None)
    proj = getattr(getattr(module, "in_proj", None), "weight", None)
    return (
        isinstance(conv, Tensor)
        and conv.dim() == 3
        and isinstance(proj, Tensor)
        and hasattr(module, "out_proj")
        and not hasattr(module, "A_log")
        and proj.shape[0] == 3 * conv.shape[0]
    )


def short_conv_operator(
    module: Any, projected: Tensor, name: str, mask: Tensor | None = None
) -> tuple[Operator, Tensor]:
    """`y_t = C_t ⊙ Σ_k w_k ⊙ (B ⊙ x)_{t−K+1+k} (+ conv bias)`: the value of source s is
    `B_s ⊙ x_s` (a function of token s alone), the receiver gate is `C_t`, fixed."""
    ch = module.conv.weight.shape[0]
    if projected.shape[-1] != 3 * ch:
        raise UnsupportedModelError(f"{name}: in_proj output has {projected.shape[-1]} features, expected {3 * ch}")
    B, C, x = projected.double().split(ch, dim=-1)
    w = module.conv.weight.detach()[:, 0, :].double()
    cb = None if module.conv.bias is None else module.conv.bias.detach().double()
    op = compose(None, receiver_gate=C, conv_weight=w, conv_bias=cb, n=projected.shape[1])
    return op, B * x


def is_gated_deltanet(module: Any) -> bool:
    """Gated DeltaNet: conv over [q | k | v], `A_log`/`dt_bias` decay, β, a per-head gated RMSNorm."""
    return (
        hasattr(module, "A_log")
        and hasattr(module, "conv1d")
        and hasattr(module, "head_k_dim")
        and hasattr(module, "head_v_dim")
        and any(hasattr(module, a) for a in ("in_proj_qkvz", "in_proj_qkv", "q_proj"))
    )


def deltanet_parts(module: Any) -> tuple[Any, Any, float]:
    """(output norm, output projection, β multiplier) of a gated DeltaNet module.

    Qwen3-Next / Qwen3.5 name them `norm`, `out_proj`; OLMo-hybrid `o_norm`, `o_proj`, and
    doubles β where `allow_neg_eigval` is set.
    """
    norm = spelled(module, "out_norm")
    out = spelled(module, "out_proj")
    return norm, out, 2.0 if getattr(module, "allow_neg_eigval", False) else 1.0


def _deltanet_projections(module: Any, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v before the convolution, z, b, a), flattened per position, by the module's own projections."""
    bsz, n, _ = h.shape
    if hasattr(module, "in_proj_qkvz"):  # Qwen3-Next: interleaved per key-head group
        q, k, v, z, b, a = module.fix_query_key_value_ordering(module.in_proj_qkvz(h), module.in_proj_ba(h))
    elif hasattr(module, "in_proj_qkv"):  # Qwen3.5
        q, k, v = torch.split(module.in_proj_qkv(h), [module.key_dim, module.key_dim, module.value_dim], -1)
        z, b, a = module.in_proj_z(h), module.in_proj_b(h), module.in_proj_a(h)
    else:  # OLMo-hybrid: separate projections, the output gate from g_proj
        q, k, v = module.q_proj(h), module.k_proj(h), module.v_proj(h)
        z, b, a = module.g_proj(h), module.b_proj(h), module.a_proj(h)
    flat = (t.reshape(bsz, n, -1) for t in (q, k, v, z, b, a))
    return tuple(flat)


def delta_rule_kernel(q: Tensor, k: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    """`W[b, h, t, s]`: the gated delta rule's output at t per unit value at s.

    The recurrence `S_t = exp(g_t)·S_{t−1} + k_t (β_t (v_t − k_tᵀ exp(g_t) S_{t−1}))ᵀ`, `o_t = S_tᵀ q_t`
    is linear in the values, so running it with value "channels" the n one-hot source
    vectors gives every `W[t, s]` at once. `q, k`: `[b, n, H, d_k]`; `beta, g`: `[b, n, H]`.
    """
    bsz, n, H, dk = k.shape
    state = q.new_zeros(bsz, H, dk, n)
    out = q.new_zeros(bsz, H, n, n)
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    for t in range(n):
        state = state * g[:, t].exp()[..., None, None]
        mem = torch.einsum("bhk,bhks->bhs", k[:, t], state)
        delta = beta[:, t, :, None] * (eye[t] - mem)
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, :, t] = torch.einsum("bhk,bhks->bhs", q[:, t], state)
    return out


def gated_deltanet_operator(
    module: Any, h: Tensor, name: str, mask: Tensor | None = None
) -> tuple[Operator, Tensor]:
    """Operator of a gated DeltaNet layer and its per-source values (v before the convolution).

    `u = silu(p)`, `p = conv([q|k|v])`; q, k are L2-normalised (q also by 1/√d_k), `β = σ(b)`,
    `g = −exp(A_log)·softplus(a + dt_bias)`, all fixed at their real values. Per value head
    the delta-rule kernel `W[t, s]` (shared by the head's channels) mixes `u_v`; the output
    norm `w ⊙ o / rms_head(o) ⊙ silu(z)` is linearised at its real scale.
    """
    if str(getattr(module, "activation", "silu")) not in ("silu", "swish"):
        raise UnsupportedModelError(f"{name}: the convolution's activation is not SiLU")
    if mask is not None:
        h = h * mask[..., None].to(h.dtype)  # the layer zeroes padded inputs first
    Hv, Hk, dk, dv = module.num_v_heads, module.num_k_heads, module.head_k_dim, module.head_v_dim
    bsz, n, _ = h.shape
    with torch.no_grad():
        q0, k0, v0, z, b, a = _deltanet_projections(module, h.to(module.conv1d.weight.dtype))
    mixed = torch.cat((q0, k0, v0), -1).double()
    w = module.conv1d.weight.detach()[:, 0, :].double()
    cb = None if module.conv1d.bias is None else module.conv1d.bias.detach().double()
    p = causal_conv(mixed, w, cb)
    u = F.silu(p)
    kd = Hk * dk
    q = u[..., :kd].reshape(bsz, n, Hk, dk)
    k = u[..., kd : 2 * kd].reshape(bsz, n, Hk, dk)
    q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6) / dk**0.5
    k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    q, k = q.repeat_interleave(Hv // Hk, 2), k.repeat_interleave(Hv // Hk, 2)
    norm, _, beta_scale = deltanet_parts(module)
    beta = torch.sigmoid(b.double()) * beta_scale
    g = -module.A_log.detach().double().exp() * F.softplus(a.double() + module.dt_bias.detach().double())
    kernel = delta_rule_kernel(q, k, beta, g).repeat_interleave(dv, dim=1)  # [b, Hv·dv, q, n]

    uv = u[..., 2 * kd :]
    o = torch.einsum("bcts,bsc->btc", kernel, uv)  # the real recurrence output, for the norm's scale
    var = o.view(bsz, n, Hv, dv).square().mean(-1, keepdim=True)
    inv = torch.rsqrt(var + norm_eps(norm)).expand(-1, -1, -1, dv).reshape(bsz, n, Hv * dv)
    gate = inv * norm.weight.detach().double().repeat(Hv) * F.silu(z.double())
    op = compose(
        kernel,
        receiver_gate=gate,
        source_gate=torch.sigmoid(p[..., 2 * kd :]),
        conv_weight=w[2 * kd :],
        conv_bias=None if cb is None else cb[2 * kd :],
    )
    return op, v0
