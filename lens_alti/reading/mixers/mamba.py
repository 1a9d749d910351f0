"""Mamba (selective scan) and Mamba-2 (SSD) mixers as per-channel token-to-token operators.

Both read the cached output of the mixer's `in_proj` (the per-source values, which contain
the pre-norm of their own token and the projection's bias) and recompute every
data-dependent quantity from it with the module's own weights: the convolution's
pre-activation `p`, Δ (dt), B and C. None of these is cached by TransformerLens 4.3's
bridge; the reconstruction check compares the result with the real layer output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.mixers.operators import (
    add_diagonal,
    causal_conv,
    compose,
    decay_matrix,
    selective_scan_kernel,
)
from lens_alti.reading.spellings import norm_eps

Operator = tuple[Tensor, Tensor]  # (M [b, C, q, n], β [b, q, C])


def _silu_only(module: Any, name: str) -> None:
    act = str(getattr(module, "activation", "silu"))
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(
            f"{name}: the convolution's activation is {act!r}; lens_alti writes only SiLU as a fixed gate "
            "(silu(p) = sigmoid(p)·p)"
        )


def _conv_params(module: Any, channels: slice) -> tuple[Tensor, Tensor | None]:
    w = module.conv1d.weight.detach()[channels, 0, :]
    b = module.conv1d.bias
    return w, (None if b is None else b.detach()[channels])


def is_mamba1(module: Any) -> bool:
    """Selective scan with per-channel A `[C, N]` and an `x_proj` giving Δ, B, C."""
    a_log = getattr(module, "A_log", None)
    return a_log is not None and a_log.dim() == 2 and hasattr(module, "x_proj") and hasattr(module, "dt_proj")


def is_mamba2(module: Any) -> bool:
    """SSD: one scalar A per head, `dt_bias`, a gated RMSNorm before `out_proj`."""
    a_log = getattr(module, "A_log", None)
    return (
        a_log is not None
        and a_log.dim() == 1
        and hasattr(module, "dt_bias")
        and hasattr(module, "conv1d")
        and hasattr(module, "head_dim")
    )


def mamba1_operator(module: Any, projected: Tensor, name: str, mask: Tensor | None = None) -> tuple[Operator, Tensor]:
    """Operator of a Mamba (selective scan) mixer and its per-source values.

    `projected[b, n, 2C]` is the cached `in_proj` output: values `x` then gate `z`.
    `y_t = silu(z_t) ⊙ (Σ_s α[t,s] ⊙ u_s + D ⊙ u_t)` with `u = silu(p)`, `p = conv(x) + b_conv`,
    α the hidden attention of `selective_scan_kernel`. Δ, B, C are computed from `u` by the
    module's `x_proj`, `dt_proj` (and `dt_layernorm`, `b_layernorm`, `c_layernorm` where the
    model has them: Falcon-Mamba, Jamba). `mask[b, n]` (False = padding) zeroes `u` at padded
    positions, as the Hugging Face layer does.
    """
    _silu_only(module, name)
    ch = int(module.intermediate_size)
    if projected.shape[-1] != 2 * ch:
        raise UnsupportedModelError(
            f"{name}: in_proj output has {projected.shape[-1]} features, expected 2·intermediate_size = {2 * ch}"
        )
    wdtype = module.x_proj.weight.dtype
    x, z = projected[..., :ch], projected[..., ch:]
    w, cb = _conv_params(module, slice(0, ch))
    with torch.no_grad():
        p = causal_conv(x.to(wdtype), w, cb)  # the real conv's pre-activation
        keep = torch.ones_like(p[..., :1]) if mask is None else mask[..., None].to(p.dtype)
        u = F.silu(p) * keep
        ts, B, C = torch.split(
            module.x_proj(u), [int(module.time_step_rank), int(module.ssm_state_size), int(module.ssm_state_size)], -1
        )
        if hasattr(module, "dt_layernorm"):  # Falcon-Mamba, Jamba: norms on Δ, B, C
            ts, B, C = module.dt_layernorm(ts), module.b_layernorm(B), module.c_layernorm(C)
        dt = F.softplus(module.dt_proj(ts).double())  # [b, n, C]
    A = -torch.exp(module.A_log.detach().double())
    kernel = add_diagonal(selective_scan_kernel(dt, A, B.double(), C.double()), module.D.detach().double())
    op = compose(
        kernel,
        receiver_gate=F.silu(z.double()),
        source_gate=torch.sigmoid(p.double()) * keep.double(),
        conv_weight=w.double(),
        conv_bias=None if cb is None else cb.double(),
    )
    return op, x


def mamba2_operator(module: Any, projected: Tensor, name: str, mask: Tensor | None = None) -> tuple[Operator, Tensor]:
    """Operator of a Mamba-2 (SSD) mixer and its per-source values.

    `projected` is the cached `in_proj` output `[gate z | xBC | dt]` (times Falcon-H1's
    `mup_vector` where the module has one; that product is recomputed here when the cache
    holds the raw projection). Per head h (channels of a head share it):
    `L[h,t,s] = (C_t·B_s)·exp(A_h·Σ_{r=s+1..t} dt_r,h)·dt_s,h + D_h·δ_ts` (the SSD masked
    matrix), applied to `u = silu(p)` of the x channels of the convolution. B and C are
    the convolution's other channels, fixed at their real values. The gated RMSNorm
    `w ⊙ (y⊙silu(z)) / rms_group(y⊙silu(z))` is linearised at its real scale per receiver.
    `mask[b, n]` (False = padding) zeroes the convolution's output at padded positions, as the
    Hugging Face layer does.
    """
    _silu_only(module, name)
    ch, groups, N = int(module.intermediate_size), int(module.n_groups), int(module.ssm_state_size)
    H, P = int(module.num_heads), int(module.head_dim)
    conv_dim = ch + 2 * groups * N
    extra = projected.shape[-1] - (ch + conv_dim + H)
    if extra != 0 or H * P != ch:
        raise UnsupportedModelError(
            f"{name}: in_proj output has {projected.shape[-1]} features; lens_alti reads Mamba-2 mixers laid "
            f"out as [gate {ch} | xBC {conv_dim} | dt {H}] with num_heads·head_dim = intermediate_size"
        )
    wdtype = module.conv1d.weight.dtype
    mup = getattr(module, "mup_vector", None)  # Falcon-H1 scales the projection after in_proj
    if mup is not None:
        projected = projected * mup.detach().reshape(-1).to(projected.dtype)
    z, xbc, dt_raw = torch.split(projected, [ch, conv_dim, H], -1)
    w, cb = _conv_params(module, slice(0, conv_dim))
    with torch.no_grad():
        p = causal_conv(xbc.to(wdtype), w, cb)
        keep = torch.ones_like(p[..., :1]) if mask is None else mask[..., None].to(p.dtype)
        u = F.silu(p) * keep
    n, b = p.shape[1], p.shape[0]
    B = u[..., ch : ch + groups * N].double().view(b, n, groups, N)
    C = u[..., ch + groups * N :].double().view(b, n, groups, N)
    dt = F.softplus(dt_raw.double() + module.dt_bias.detach().double())
    lo, hi = getattr(module, "time_step_limit", (0.0, float("inf")))
    dt = dt.clamp(min=lo, max=hi)  # [b, n, H]
    A = -torch.exp(module.A_log.detach().double())  # [H]
    CB = torch.einsum("btgn,bsgn->bgts", C, B).repeat_interleave(H // groups, dim=1)  # [b, H, q, n]
    L = CB * decay_matrix(dt * A) * dt.transpose(1, 2)[:, :, None, :]
    L = add_diagonal(L, module.D.detach().double())
    kernel = L.repeat_interleave(P, dim=1)  # shared by the P channels of each head

    # y before the norm, to fix the norm's scale at its real value.
    uc = u[..., :ch].double()
    y = torch.einsum("bcts,bsc->btc", kernel, uc)
    gate = F.silu(z.double())
    norm = getattr(module, "norm", None)
    if norm is not None and getattr(module, "mamba_rms_norm", True):
        g = y * gate
        size = int(getattr(norm, "group_size", ch))
        var = g.view(b, n, ch // size, size).pow(2).mean(-1, keepdim=True)
        inv = torch.rsqrt(var + norm_eps(norm)).expand(b, n, ch // size, size).reshape(b, n, ch)
        gate = gate * inv * norm.weight.detach().double()
    op = compose(
        kernel,
        receiver_gate=gate,
        source_gate=torch.sigmoid(p[..., :ch].double()) * keep.double(),
        conv_weight=w[:ch].double(),
        conv_bias=None if cb is None else cb[:ch].double(),
    )
    return op, xbc[..., :ch]
