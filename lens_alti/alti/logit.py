"""ALTI-Logit (docs/spec.md §7): a logit (difference) split exactly into direct parts, and mapped to input tokens.

Everything here works on explained positions (rows `N_{b,m}`, any number per batch item) and on
*directions*: with the final norm's scale fixed at its real value, the logit is an affine
function of the residual stream at N, `logit = x·w + c`. Going down the stack, each step
either adds to the stream (its parts are read as `part·w`) or, in post-norm models, is
followed by a norm linearised at its real scale, which maps the direction below it to
`centre(s ⊙ w)` (LayerNorm) or `s ⊙ w` (RMSNorm) and adds `β·w` to the bias terms.

Model-agnostic: receives records (`AttentionBlock`, `DirectWrite`, `Readout` or plain tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_alti.alti.decompose import group_heads
from lens_alti.alti.rows import RowWise

if TYPE_CHECKING:  # records are the interface; alti never imports reading at run time
    from lens_alti.reading.records import AttentionBlock, NormAfterAttention

# Direct parts must sum to the real logit (difference) this well, relative (fp32 caches).
COMPLETENESS_TOLERANCE = 1e-4


def channel_groups(block: AttentionBlock) -> int:
    """Channels per reported head: the record's grouping, or all its channels as one part when
    they form no heads (a mixer without heads is then one "head" of its layer)."""
    return block.channels_per_head if block.has_heads else block.pattern.shape[1]


def _pass_norm(norm: NormAfterAttention | None, w: Float[Tensor, "b m d"]) -> tuple[Tensor, Tensor]:
    """(direction below a post-norm of placement "block", its bias's logit update `[b, m]`).

    `out = s ⊙ centre(z) + β` (LayerNorm) or `s ⊙ z + β` (RMSNorm) with `s = weight / scale_N`
    (`norm.scale[b, m]`, restricted to the explained rows): `out·w = z·centre(s ⊙ w) + β·w`.
    """
    if norm is None or norm.placement != "block":
        return w, w.new_zeros(w.shape[:-1])
    s = norm.weight.to(w.dtype) / norm.scale[..., None].to(w.dtype)  # [b, m, d]
    below = s * w
    if norm.kind == "layernorm":
        below = below - below.mean(-1, keepdim=True)
    bias = (norm.bias.to(w.dtype) * w).sum(-1) if norm.bias is not None else w.new_zeros(w.shape[:-1])
    return below, bias


@dataclass(frozen=True)
class ExplainedUpdate:
    """Logit updates of one block at the explained rows, from a `RowWise` block (docs/spec.md §7b).

    `heads[b, m, h, k]` = `T^h_N(x_k)·w` for explained row m of batch item b (docs/spec.md §7
    Δ^l[h, k]; a head's channels summed when the record groups channels into heads, all channels
    as one "head" when they form none); `bias[b, m]` = the block's terms owned by no source (b_O,
    post-norm β) read through w; `below[b, m, d]` the direction at the block's input; `error`: the
    explained rows' relative reconstruction error (NaN when unchecked).
    """

    heads: Float[Tensor, "b m h k"]
    bias: Float[Tensor, "b m"]
    below: Float[Tensor, "b m d"]
    error: float


def explained_update(
    block: RowWise, rows: Int[Tensor, "b m"], w: Float[Tensor, "b m d"]
) -> ExplainedUpdate:
    """Δ^l[h, k] of a block prepared for row-wise work, at the explained rows `rows[b, m]`, for the
    directions `w[b, m]` (one per explained row: several positions of one item share the block's work).

    The rows are checked (NaN, padding, reconstruction) and decomposed by `block.vectors`, with the
    block's value vectors formed once (`RowWise`).
    """
    tv, error = block.vectors(rows)
    w = w.to(tv.vo.dtype)
    sw = w if tv.scale is None else tv.scale * w  # [b, m, d]
    vo_w = torch.einsum("bhkd,bmd->bmhk", tv.vo, sw)
    heads = group_heads(tv.weights.transpose(1, 2) * vo_w, channel_groups(block.block), dim=2)
    bias = (tv.bias * w).sum(-1)
    norm = block.block.norm
    below = w
    if norm is not None and norm.placement == "block":  # docs/spec.md §7b: the direction below a post-norm
        below = sw - sw.mean(-1, keepdim=True) if norm.kind == "layernorm" else sw
    return ExplainedUpdate(heads=heads, bias=bias, below=below, error=error)


def write_update(
    output: Float[Tensor, "b m d"], norm: NormAfterAttention | None, w: Float[Tensor, "b m d"]
) -> tuple[Tensor, Tensor, Tensor]:
    """(logit update `[b, m]`, bias update `[b, m]`, direction below `[b, m, d]`) of a direct write (an
    MLP) at the explained rows.

    `norm` is the post-norm after the write (placement "block", scale `[b, m]` restricted to the
    explained rows), or None.
    """
    below, bias = _pass_norm(norm, w)
    return (output.to(w.dtype) * below).sum(-1), bias, below


def readout_direction(
    x_final: Float[Tensor, "b d"],
    kind: str,
    gain: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
    u: Float[Tensor, "b d"],
    u_bias: Float[Tensor, " b"],
) -> tuple[Float[Tensor, "b d"], Float[Tensor, " b"]]:
    """(direction `w` at the final residual, readout bias `[b]`) for `logit = F(x)·u + u_bias`.

    The final norm F is linearised at the real scale of `x_final` (biased variance or mean
    square, eps inside the root): LayerNorm `w = centre(g ⊙ u) / σ_N`, RMSNorm `g ⊙ u / rms_N`,
    no norm `u`. The readout bias is `β·u + u_bias` (u_bias: the unembedding bias difference).
    """
    x = x_final.to(u.dtype)
    if kind == "none":
        return u, u_bias
    g = u.new_ones(u.shape[-1]) if gain is None else gain.to(device=u.device, dtype=u.dtype)  # no gain: 1
    if kind == "layernorm":
        xc = x - x.mean(-1, keepdim=True)
        scale = (xc.square().mean(-1) + eps).sqrt()
        w = g * u
        w = (w - w.mean(-1, keepdim=True)) / scale[:, None]
    else:
        scale = (x.square().mean(-1) + eps).sqrt()
        w = g * u / scale[:, None]
    bias = u_bias if norm_bias is None else u_bias + (norm_bias.to(device=u.device, dtype=u.dtype) * u).sum(-1)
    return w, bias


def to_input_tokens(
    heads: Float[Tensor, "b h k"], rollout_below: Float[Tensor, "b k s"] | None
) -> Float[Tensor, "b s"]:
    """ALTI-Logit^l = Δ^l @ R^(l−1) (docs/spec.md §7): summed over heads, mapped through the rollout below.

    `rollout_below` None: the sources are the input tokens themselves (layer 0).
    """
    delta = heads.sum(1)
    if rollout_below is None:
        return delta
    return torch.einsum("bk,bks->bs", delta, rollout_below.to(delta.dtype))


def completeness_gap(logit: Float[Tensor, " b"], parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(signed gap `logit − Σ parts` `[b]`, the scale it is judged against `[b]`).

    `parts` are `[b, ...]` tensors of direct parts; the scale is max(|logit|, max |part|), so a
    near-zero logit difference made of large cancelling parts is judged against the parts.
    """
    total = sum(p.reshape(p.shape[0], -1).sum(-1) for p in parts)
    biggest = torch.stack([p.reshape(p.shape[0], -1).abs().amax(-1) for p in parts if p[0].numel()], -1).amax(-1)
    return logit - total, torch.maximum(logit.abs(), biggest)
