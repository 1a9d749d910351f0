"""The neutral record of one attention block, read from a cache.

Readers (one per model family) fill these records; everything after them is
model-agnostic mathematics. Shapes use `b` batch, `h` query heads, `q` receivers
(query positions), `k` sources (key positions), `e` d_head, `d` d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True)
class NormAfterAttention:
    """A normalisation applied after the attention block (post-norm models).

    `placement="block"`: `y_i = Norm(x_i + attn_out_i)` (post-LN BERT/Marian/BART, post-RMS).
    `placement="attn_out"`: `y_i = x_i + Norm(attn_out_i)` (Gemma-2/3, OLMo-2 post-attention norm).
    `scale[b, q]` is σ_i (LayerNorm, biased std with eps inside the root) or the RMS,
    computed from the real input of the norm, so it is fixed per receiver and the
    norm is linear in each summand.
    """

    kind: Literal["layernorm", "rmsnorm"]
    placement: Literal["block", "attn_out"]
    weight: Float[Tensor, " d"]
    bias: Float[Tensor, " d"] | None
    scale: Float[Tensor, "b q"]


class PatternRows(Protocol):
    """Attention rows computed on demand, for a block whose dense pattern is never formed.

    `rows(positions)` gives `[b, h, r, k]`: row `r` is the attention of receiver `positions[b, r]`
    over every key, exactly the probabilities the model applied (docs/spec.md §9);
    `span_rows(positions)` gives `(rows[b, h, r, s], lo)`, the same rows over keys `lo .. lo + s − 1`
    only, every other key having probability exactly 0 in each of them. `shape` is the whole
    pattern's `[b, h, q, k]`; `dtype` and `device` those of the rows.
    """

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device

    def rows(self, positions: Int[Tensor, "b r"]) -> Float[Tensor, "b h r k"]: ...

    def span_rows(self, positions: Int[Tensor, "b r"]) -> tuple[Float[Tensor, "b h r s"], int]: ...


def pattern_placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The `pattern` of a record whose rows are recomputed (`AttentionBlock.pattern_rows`): the pattern's
    shape and dtype, one zero expanded, no memory. Never read its values."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def is_placeholder(t: Tensor) -> bool:
    """True for a `pattern_placeholder` (every stride 0): shape-only, nothing to check or read."""
    return t.numel() > 1 and all(s == 0 for s in t.stride())


@dataclass(frozen=True)
class AttentionBlock:
    """Everything needed to write one attention block's output as a sum over sources.

    `values` are already expanded to one per query head (grouped-query attention is
    undone by the reader) and contain `b_V` and the pre-norm of each source token.
    `residual[b, q, d]` is the residual stream added to receiver q (for self-attention
    it is the receiver's own input x_q; for cross-attention the decoder stream).
    `target[b, q, d]` is the real activation the decomposition must reproduce.
    `residual_column`: "diagonal" — the residual belongs to source j = q (self-attention);
    "last" — it is a separate, extra source after the k keys (cross-attention).
    `pattern_is_distribution`: the pattern's rows are probabilities over the valid keys
    (non-negative, summing to 1), which is checked before decomposing; records whose
    "pattern" is a general linear token-to-token operator (recurrent mixers) set it False;
    their `b_O` may then be per receiver, `[b, q, d]` (terms of no token that the recurrence
    carries, such as a convolution bias).
    `recurrent`: True for linear-recurrent mixers, whose "heads" are channels (no attention
    weights); gated or sink attention is not a distribution but is still attention.
    `channels_per_head` (G): the pattern's head axis holds H·G channels, G contiguous ones per
    real head (G channels of head 0, then head 1, ...); per-head results sum each head's
    channels (docs/spec-mixers.md §7). 1 for ordinary attention (one pattern per head).
    `has_heads`: False when the channels group into no real heads (Mamba-1, short
    convolutions, a parallel attention + mixer record): per-head results are refused.
    `output_gated`: a receiver-wise gate on the heads' output is folded into the pattern, so
    the pattern is not the attention weights (measure="attention" is refused).
    `padding_unmasked`: the pattern was recomputed without the (uncached) padding mask (see
    `reading/relative_bias.py`).
    `pattern_rows`: set when the block's attention rows are recomputed on demand from the
    queries and keys (docs/spec.md §9). `pattern` is then a placeholder of the pattern's shape
    and dtype that holds no memory (one zero, expanded) and must not be read: row-wise code reads
    the rows with `lens_alti.alti.rows.pattern_at`, and whole-block code refuses such a record.
    `receivers[b, r]`: the position of each receiver row when the record holds some receivers
    only (`lens_alti.alti.rows.row_block`); None when row q is position q.
    """

    name: str
    layer: int
    pattern: Float[Tensor, "b h q k"]
    values: Float[Tensor, "b k h e"]
    W_O: Float[Tensor, "h e d"]
    b_O: Float[Tensor, " d"] | Float[Tensor, "b q d"] | None
    residual: Float[Tensor, "b q d"]
    target: Float[Tensor, "b q d"]
    residual_column: Literal["diagonal", "last"] = "diagonal"
    norm: NormAfterAttention | None = None
    architecture: str = "unknown"
    pattern_is_distribution: bool = True
    recurrent: bool = False
    # The pattern was recomputed without the (uncached) padding mask: rows are renormalised over the
    # valid keys of the mask given to attribute, which is what an additive -inf mask does (Switch).
    padding_unmasked: bool = False
    channels_per_head: int = 1
    has_heads: bool = True
    output_gated: bool = False
    pattern_rows: PatternRows | None = None
    receivers: Int[Tensor, "b r"] | None = None
