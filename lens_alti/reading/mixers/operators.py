"""Token-to-token operators of linear-recurrent mixers, one per channel (spec-mixers.md).

A mixer channel `c` carries a sequence `u[b, s, c]`. Once the data-dependent quantities
(Δ, B, C, gates, decays) are fixed at their real values, every step of a Mamba, Mamba-2,
short-convolution, gated-DeltaNet or RG-LRU layer is linear per channel, so the layer maps
its per-source values to receivers through one matrix per channel:

    out[b, t, c] = Σ_s M[b, c, t, s] · v[b, s, c] + β[b, t, c]

`M` is causal (zero for s > t) and `β` collects the terms of no token (a convolution bias
carried through the recurrence). The functions here build and compose such operators;
they are plain tensor algebra and know no model. Every operator is held densely as
`[b, C, q, n]`: `C·n²` numbers per batch item (float64 while it is built), the cost of
reading a mixer layer exactly. Quantities indexed `[b, n, C]` follow the cache's
`[batch, pos, channel]` layout.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

# Budget for the [b, chunk, state, q, n] temporaries of the selective-scan kernel.
_KERNEL_BYTES = 256 * 2**20


def causal_conv(
    x: Float[Tensor, "b n C"], weight: Float[Tensor, "C K"], bias: Float[Tensor, " C"] | None
) -> Float[Tensor, "b n C"]:
    """Depthwise causal convolution `p[t] = Σ_k w[k]·x[t−K+1+k] + bias` (zero history)."""
    n, K = x.shape[1], weight.shape[-1]
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x).clone()
    for k in range(K):
        m = K - 1 - k  # lag of tap k
        out[:, m:] += x[:, : n - m] * weight[:, k].to(x.dtype)
    return out


def conv_on_sources(op: Float[Tensor, "b C q n"], weight: Float[Tensor, "C K"]) -> Float[Tensor, "b C q n"]:
    """`op @ Conv`: the causal depthwise convolution applied to the sources before `op`.

    `Conv[c, s, j] = w[c, j − s + K − 1]` for `s − K < j ≤ s`, so
    `(op @ Conv)[t, j] = Σ_k op[t, j + K − 1 − k] · w[k]`. Costs `K·C·q·n`, not `C·q·n²`.
    """
    n, K = op.shape[-1], weight.shape[-1]
    w = weight.to(op.dtype)
    out = torch.zeros_like(op)
    for k in range(K):
        m = K - 1 - k
        out[..., : n - m] += op[..., m:] * w[None, :, None, k : k + 1]
    return out


def decay_matrix(log_decay: Float[Tensor, "b n G"]) -> Float[Tensor, "b G q n"]:
    """`exp(Σ_{r=s+1..t} log_decay[r])` for s ≤ t, 0 above the diagonal (a causal decay)."""
    cum = log_decay.cumsum(dim=1).transpose(1, 2)  # [b, G, n]
    n = cum.shape[-1]
    seg = cum[..., :, None] - cum[..., None, :]
    upper = torch.ones(n, n, dtype=torch.bool, device=cum.device).triu(1)
    return seg.masked_fill(upper, float("-inf")).exp()


def selective_scan_kernel(
    dt: Float[Tensor, "b n C"], A: Float[Tensor, "C N"], B: Float[Tensor, "b n N"], C: Float[Tensor, "b n N"]
) -> Float[Tensor, "b C q n"]:
    """Mamba's hidden attention (Ali et al. 2024): per channel c,
    `α[c, t, s] = Σ_n C[t,n]·exp(A[c,n]·Σ_{r=s+1..t} dt[r,c])·dt[s,c]·B[s,n]` for s ≤ t.

    Built in chunks of channels so that the `[b, chunk, N, q, n]` temporary stays small.
    """
    b, n, ch = dt.shape
    N = A.shape[-1]
    cum = dt.cumsum(dim=1).transpose(1, 2)  # [b, C, n]
    upper = torch.ones(n, n, dtype=torch.bool, device=dt.device).triu(1)
    CB = torch.einsum("btn,bsn->btsn", C, B)  # [b, q, n, N]
    out = dt.new_zeros(b, ch, n, n)
    step = max(1, _KERNEL_BYTES // max(1, b * N * n * n * dt.element_size()))
    for c0 in range(0, ch, step):
        c1 = min(ch, c0 + step)
        seg = (cum[:, c0:c1, :, None] - cum[:, c0:c1, None, :]).masked_fill(upper, 0.0)  # [b, c, q, n]
        decay = torch.exp(seg[:, :, None] * A[None, c0:c1, :, None, None])  # [b, c, N, q, n]
        out[:, c0:c1] = torch.einsum("bcnts,btsn->bcts", decay, CB).masked_fill(upper, 0.0)
    return out * dt.transpose(1, 2)[:, :, None, :]


def add_diagonal(op: Float[Tensor, "b C q n"], d: Float[Tensor, " C"]) -> Float[Tensor, "b C q n"]:
    """`op + diag(d)` per channel (a skip term `D·u_t` of the receiver's own value)."""
    n = min(op.shape[-2:])
    idx = torch.arange(n, device=op.device)
    op[..., idx, idx] += d.to(op.dtype)[None, :, None]
    return op


def compose(
    kernel: Float[Tensor, "b C q n"] | None,
    *,
    receiver_gate: Float[Tensor, "b q C"] | None = None,
    source_gate: Float[Tensor, "b n C"] | None = None,
    conv_weight: Float[Tensor, "C K"] | None = None,
    conv_bias: Float[Tensor, " C"] | None = None,
    n: int | None = None,
) -> tuple[Float[Tensor, "b C q n"], Float[Tensor, "b q C"]]:
    """`(M, β)` of `out = diag(rg)·kernel·diag(sg)·(Conv·v + conv_bias)`, per channel.

    The value `v` first goes through the causal depthwise convolution (weights
    `conv_weight`, bias `conv_bias`), then a per-source gate (e.g. `sigmoid(p_s)`, which
    writes SiLU(p) as a gate times p), the token-mixing `kernel` (identity when None)
    and a per-receiver gate. The convolution bias belongs to no token: it is carried by
    the same operator into `β`.
    """
    if kernel is None:
        ref = receiver_gate if receiver_gate is not None else source_gate
        if ref is None or n is None:
            raise ValueError("an identity kernel needs a gate (for its shape) and n")
        b, ch = ref.shape[0], ref.shape[-1]
        kernel = torch.diag_embed(ref.new_ones(b, ch, n))
    op = kernel
    if receiver_gate is not None:
        op = op * receiver_gate.transpose(1, 2)[..., None]
    if source_gate is not None:
        op = op * source_gate.transpose(1, 2)[:, :, None, :]
    b, ch, q, _ = op.shape
    beta = op.new_zeros(b, q, ch)
    if conv_bias is not None:
        beta = op.sum(-1).transpose(1, 2) * conv_bias.to(op.dtype)
    if conv_weight is not None:
        op = conv_on_sources(op, conv_weight)
    return op, beta
