"""Receivers of interest: compute a block's contributions for some receiver rows only.

`select_receivers(tv, positions)` keeps the receiver rows `positions[b, r]` of a block's
transformed vectors; `block_contributions` and `head_output_contributions` then do the
per-row work (the `H·n²·d` per-head kernels) only for those rows and return
`[b, r, ...]` results whose row `r` is receiver `positions[b, r]`. The sources (keys) are
untouched. This is what `attribute(..., positions=...)` and information-flow routes use to
explain a few positions without paying for all of them. `resolve_positions` turns what a
user passes as `positions=` ("last", ints counting back from the last real token, a tensor,
a boolean mask) into those `[b, r]` positions, refusing padding.

What an exact rollout of those positions needs (docs/spec.md §4): row i of `R^l = C^l @ R^(l-1)`
reads every row of `R^(l-1)` that C^l[i] reaches. In a causal block row i reaches only
sources j ≤ i, so `R^l[i]` needs the token-level rows `0..i` of every layer below and no
others: `rollout_rows(positions, causal=True)` is `0..max(positions)`. In a bidirectional
block every row reaches every source, so all rows are needed. Only the token-level
contributions (`n²·d` per layer) are needed for those extra rows, never the per-head ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import overload

import torch
from jaxtyping import Int
from torch import Tensor

from lens_alti.alti.decompose import TransformedVectors


@overload
def _rows(t: Tensor, positions: Tensor, dim: int) -> Tensor: ...
@overload
def _rows(t: None, positions: Tensor, dim: int) -> None: ...
@overload
def _rows(t: Tensor | None, positions: Tensor, dim: int) -> Tensor | None: ...
def _rows(t: Tensor | None, positions: Tensor, dim: int) -> Tensor | None:
    """Gather rows `positions[b, r]` along dimension `dim` of a batch-first tensor."""
    if t is None:
        return None
    shape = [1] * t.dim()
    shape[0], shape[dim] = positions.shape
    index = positions.view(shape).expand(*t.shape[:dim], positions.shape[1], *t.shape[dim + 1 :])
    return t.gather(dim, index)


def select_receivers(tv: TransformedVectors, positions: Int[Tensor, "b r"]) -> TransformedVectors:
    """The transformed vectors of receiver rows `positions[b, r]` only.

    `positions` are row indices of `tv`: positions in the block, unless `tv` was already
    restricted (they then index its rows, and the positions in the block are kept).
    The result's `receivers` records each row's position, which the contribution code uses
    for the self-attention residual (source j = i) and for causal skipping.
    """
    positions = positions.to(device=tv.weights.device, dtype=torch.long)
    if positions.dim() != 2 or positions.shape[0] != tv.weights.shape[0]:
        raise ValueError(
            f"positions must be [batch, receivers] with batch {tv.weights.shape[0]}, got {tuple(positions.shape)}"
        )
    rows = positions if tv.receivers is None else tv.receivers.gather(1, positions)
    local = positions  # row indices in tv as it is now
    return replace(
        tv,
        weights=_rows(tv.weights, local, 2),
        scale=_rows(tv.scale, local, 1),
        residual=_rows(tv.residual, local, 1),
        bias=_rows(tv.bias, local, 1),
        resultant=_rows(tv.resultant, local, 1),
        z=_rows(tv.z, local, 1),
        receivers=rows,
    )


def rollout_rows(positions: Int[Tensor, "b r"], n: int, causal: bool) -> int:
    """How many leading receiver rows an exact rollout of `positions` needs (see module doc)."""
    if not causal or positions.numel() == 0:
        return n
    return int(positions.max()) + 1


def receiver_positions(tv: TransformedVectors) -> Int[Tensor, "b q"]:
    """The position of every receiver row of `tv` (`arange(q)` when it was not restricted)."""
    if tv.receivers is not None:
        return tv.receivers
    b, _, q, _ = tv.weights.shape
    return torch.arange(q, device=tv.weights.device).expand(b, q)
