"""Decompose an attention block into transformed vectors T_i(x_j) (docs/spec.md §1).

The transformed vectors are never materialised for all (i, j) at once. They are kept
in the factored form

    T_i(x_j) = s_i ⊙ Σ_h A[h,i,j] · VO[h,j]  (+ residual_i if j is the residual source)

where `VO[h,j] = v[j,h] @ W_O[h]` (centred for a post-LayerNorm), `s_i` is the
receiver's linearised norm scale (γ/σ_i, g/rms_i, or 1 for pre-norm blocks), and the
residual term is x_i passed through the same linear map when the norm follows the
residual sum. Terms belonging to no source go to `bias_i`, so that
`y_i = Σ_j T_i(x_j) + bias_i` exactly.

The `h` axis may hold channels rather than heads (`channels_per_head` G > 1: gated attention
outputs, mixers with heads): then `h = H·G`, G contiguous channels per real head, and a
head's part is the sum of its channels' parts (`group_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_alti.errors import LensAltiError, PatternNotDistributionError, ReconstructionError

if TYPE_CHECKING:  # the records are the interface; alti never imports reading at run time
    from lens_alti.reading.records import AttentionBlock

RECONSTRUCTION_TOLERANCE = 1e-4
# A half-precision cache holds activations rounded at every step of the real forward
# pass, so an exact fp32 decomposition of its inputs can only match them this well.
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# How far a pattern row may be from a distribution (negative mass, |Σ − 1|) before it is refused.
DISTRIBUTION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TransformedVectors:
    """Factored transformed vectors of one block; see the module docstring.

    `weights[b,h,q,k]` attention probabilities; `vo[b,h,k,d]` per-head value vectors
    after W_O (and centring); `scale[b,q,d]` or None for 1; `residual[b,q,d]` the
    residual's transformed vector; `bias[b,q,d]` the part of y owned by no source;
    `resultant[b,q,d]` y_i = Σ_j T_i(x_j) + bias_i.
    `receivers[b,q]`: the position of each receiver row, or None when row q is position q
    (see `lens_alti.alti.receivers.select_receivers`).
    `channels_per_head` G: the `h` axis holds `n_heads·G` channels, G contiguous per head.
    """

    name: str
    weights: Float[Tensor, "b h q k"]
    vo: Float[Tensor, "b h k d"]
    scale: Float[Tensor, "b q d"] | None
    residual: Float[Tensor, "b q d"]
    bias: Float[Tensor, "b q d"]
    resultant: Float[Tensor, "b q d"]
    residual_column: Literal["diagonal", "last"]
    causal: bool
    z: Float[Tensor, "b q h e"]
    W_O: Float[Tensor, "h e d"]
    centred: bool
    receivers: Int[Tensor, "b q"] | None = None
    channels_per_head: int = 1

    @property
    def n_heads(self) -> int:
        """Real heads: the `h` axis's channels grouped by `channels_per_head`."""
        return self.weights.shape[1] // self.channels_per_head

    def head_outputs(self) -> Float[Tensor, "b H q d"]:
        """Each real head's whole transformed output o^h_i = s_i ⊙ Σ_{c∈h} Σ_j A[c,i,j]·VO[c,j]."""
        # A head's G channels are summed inside the contraction: never [b, H·G, q, d].
        b, q, c, e = self.z.shape
        H, G = self.n_heads, self.channels_per_head
        o = torch.einsum("bqhf,hfd->bhqd", self.z.reshape(b, q, H, G * e), self.W_O.reshape(H, G * e, -1))
        if self.centred:
            o = _centre(o)
        return o if self.scale is None else o * self.scale[:, None]

    @property
    def n_sources(self) -> int:
        """Columns of the contribution matrix: the keys, plus the residual if it is separate."""
        return self.weights.shape[-1] + (self.residual_column == "last")


def group_heads(t: Tensor, channels_per_head: int, dim: int = 1) -> Tensor:
    """Sum contiguous groups of `channels_per_head` along `dim` (channels → real heads)."""
    if channels_per_head == 1:
        return t
    shape = list(t.shape)
    shape[dim : dim + 1] = [shape[dim] // channels_per_head, channels_per_head]
    return t.reshape(shape).sum(dim + 1)


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=-1, keepdim=True)


def is_causal(pattern: Float[Tensor, "b h q k"], valid_rows: Tensor | None = None) -> bool:
    """True when no receiver attends to a later source (so j > i can be skipped)."""
    q, k = pattern.shape[-2:]
    if q != k:
        return False
    upper = pattern.triu(1)
    if valid_rows is not None:
        upper = upper * valid_rows[:, None, :, None].to(pattern.dtype)
    return not bool(upper.any())


def check_pattern_distribution(
    block: AttentionBlock,
    valid_rows: Tensor | None = None,
    valid_keys: Tensor | None = None,
    tolerance: float = DISTRIBUTION_TOLERANCE,
) -> None:
    """Raise PatternNotDistributionError unless every valid receiver's row is a distribution.

    Cheap (one pass over the pattern) and done before decomposing: entries must be ≥ 0 and
    each valid receiver's row must sum to 1 over the valid keys, or be all zero (a head switched
    off by an ablation hook). Skipped for records whose `pattern_is_distribution` is False
    (recurrent mixers' operators).
    """
    if not block.pattern_is_distribution or block.pattern.numel() == 0:
        return
    A = block.pattern
    if valid_keys is not None:
        A = A * valid_keys[:, None, None, :].to(A.dtype)
    sums = A.sum(-1, dtype=torch.float64)  # [b, h, q]
    low = A.amin(dim=-1).to(torch.float64)
    if valid_rows is not None:
        rows = valid_rows[:, None, :].expand_as(sums)
        sums, low = sums[rows], low[rows]
    if sums.numel() == 0:
        return
    # A row of zeros is a head switched off (head ablation hooks on hook_pattern): allowed.
    worst_sum = float(torch.where(sums == 0, torch.zeros_like(sums), (sums - 1).abs()).max())
    worst_low = float(low.min())
    if worst_low < -tolerance or worst_sum > tolerance:
        raise PatternNotDistributionError(
            f"{block.name} (layer {block.layer}, {block.architecture}): the cache's hook_pattern is not a "
            f"probability distribution over the valid keys (rows must be ≥ 0 and sum to 1; smallest entry "
            f"{worst_low:.3g}, max|row sum − 1| = {worst_sum:.3g}). The hook does not hold the attention "
            "probabilities the block applied (a TransformerLens adapter issue for this architecture), so ALTI "
            "cannot be computed from it"
        )


def value_vectors(block: AttentionBlock, dtype: torch.dtype = torch.float32) -> Float[Tensor, "b h k d"]:
    """`VO[h, j] = v[j, h] @ W_O[h]` for every head and source, centred over `d` below a post-LayerNorm.

    Depends on the sources only: row-wise work forms it once per block (`decompose(..., vo=)`).
    """
    vo = torch.einsum("bkhe,hed->bhkd", block.values.to(dtype), block.W_O.to(dtype))
    norm = block.norm
    return _centre(vo) if norm is not None and norm.kind == "layernorm" else vo


def _attend(A: Float[Tensor, "b h r k"], v: Float[Tensor, "b k h e"]) -> Float[Tensor, "b r h e"]:
    """`z = A @ v` for some receivers' rows, over the keys some row attends to only (a chunk of a causal
    block reads no key after its last receiver, a sliding window only its window)."""
    cols = (A.abs().amax(dim=(0, 1, 2)) > 0).nonzero().flatten()
    if len(cols) == 0:
        return A.new_zeros(A.shape[0], A.shape[2], A.shape[1], v.shape[-1])
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return torch.einsum("bhqk,bkhe->bqhe", A[..., lo:hi], v[:, lo:hi])


def causal_rows(A: Float[Tensor, "b h r k"], receivers: Int[Tensor, "b r"], valid_rows: Tensor | None = None) -> bool:
    """True when no receiver row attends to a source after its own position `receivers[b, r]`."""
    later = torch.arange(A.shape[-1], device=A.device) > receivers[..., None].to(A.device)  # [b, r, k]
    if valid_rows is not None:
        later = later & valid_rows[..., None].to(A.device)
    return not bool((A != 0).logical_and(later[:, None]).any())


def decompose(
    block: AttentionBlock,
    dtype: torch.dtype = torch.float32,
    valid_rows: Tensor | None = None,
    vo: Float[Tensor, "b h k d"] | None = None,
) -> TransformedVectors:
    """Turn a block record into factored transformed vectors, computed in `dtype`.

    `vo`: the block's `value_vectors`, when already formed (row-wise work forms them once per
    block). A record restricted to some receivers (`block.receivers`) keeps their positions.
    """
    if block.pattern_rows is not None:
        raise LensAltiError(
            f"{block.name}: its attention rows are recomputed on demand; read them with "
            "lens_alti.alti.rows.pattern_at (a whole-block path was given a row-wise record)"
        )

    def f(t: Tensor) -> Tensor:
        return t.to(dtype)

    A = f(block.pattern)
    v = f(block.values)
    W_O = f(block.W_O)
    b_O = None if block.b_O is None else f(block.b_O)
    x = f(block.residual)
    b, h, q, k = A.shape
    d = W_O.shape[-1]
    G = int(block.channels_per_head)
    if G < 1 or h % G:
        raise LensAltiError(
            f"{block.name}: channels_per_head = {G} does not divide the record's {h} channels (a reader bug)"
        )

    vo = value_vectors(block, dtype) if vo is None else vo
    bias_vec = b_O if b_O is not None else torch.zeros(d, dtype=dtype, device=A.device)
    scale: Tensor | None = None
    residual = x
    norm = block.norm
    if norm is not None:
        weight = f(norm.weight)
        scale = weight / f(norm.scale)[..., None]  # [b, q, d]
        if norm.kind == "layernorm":
            bias_vec = _centre(bias_vec)
        if norm.placement == "block":
            residual = scale * (_centre(x) if norm.kind == "layernorm" else x)
        bias = scale * bias_vec
        if norm.bias is not None:
            bias = bias + f(norm.bias)
    else:
        bias = bias_vec.expand(b, q, d)

    # Σ_j Σ_h A·VO through z = A @ v, far cheaper than summing VO over (i, j).
    z = _attend(A, v) if block.receivers is not None else torch.einsum("bhqk,bkhe->bqhe", A, v)
    attn = torch.einsum("bqhe,hed->bqd", z, W_O)
    if norm is not None and norm.kind == "layernorm":
        attn = _centre(attn)
    if scale is not None:
        attn = attn * scale
    resultant = attn + residual + bias
    diagonal = block.residual_column == "diagonal"
    if block.receivers is None:
        causal = diagonal and is_causal(A, valid_rows)
    else:
        causal = diagonal and causal_rows(A, block.receivers, valid_rows)
    return TransformedVectors(
        name=block.name,
        weights=A,
        vo=vo,
        scale=scale,
        residual=residual,
        bias=bias,
        resultant=resultant,
        residual_column=block.residual_column,
        causal=causal,
        z=z,
        W_O=W_O,
        centred=norm is not None and norm.kind == "layernorm",
        receivers=block.receivers,
        channels_per_head=G,
    )


def reconstruction_error(
    tv: TransformedVectors, block: AttentionBlock, valid_rows: Tensor | None = None
) -> tuple[float, float]:
    """(max|Σ_j T_i(x_j) + bias_i − y_real|, max|y_real|) over valid receivers."""
    target = block.target.to(tv.resultant.dtype)
    diff = (tv.resultant - target).abs()
    mag = target.abs()
    if valid_rows is not None:
        keep = valid_rows[..., None].to(diff.dtype)
        diff, mag = diff * keep, mag * keep
    return float(diff.max()), float(mag.max())


def check_reconstruction(
    tv: TransformedVectors,
    block: AttentionBlock,
    valid_rows: Tensor | None = None,
    tolerance: float = RECONSTRUCTION_TOLERANCE,
) -> float:
    """Raise ReconstructionError unless max|Δ| ≤ tolerance · max|y|; return the relative error."""
    err, mag = reconstruction_error(tv, block, valid_rows)
    if not err <= tolerance * mag:
        raise ReconstructionError(
            f"{block.name} (layer {block.layer}, {block.architecture})",
            err,
            mag,
            tolerance,
            "The block's output is not the sum the decomposition assumes: the architecture's "
            "block layout is not supported, or the cache was produced with settings that "
            "break it (hooks that modified activations, a different attention mask). "
            "Pass check=False only if you know why.",
        )
    return err / max(mag, 1e-30)
