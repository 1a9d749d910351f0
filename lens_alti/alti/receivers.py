"""Receivers of interest: compute a block's contributions for some receiver rows only.

`select_receivers(tv, positions)` keeps the receiver rows `positions[b, r]` of a block's
transformed vectors; `block_contributions` and `head_output_contributions` then do the
per-row work (the `H·n²·d` per-head kernels) only for those rows and return
`[b, r, ...]` results whose row `r` is receiver `positions[b, r]`. The sources (keys) are
untouched. This is what `attribute(..., positions=...)` and information-flow routes use to
explain a few positions without paying for all of them. `resolve_positions` turns what a
user passes as `positions=` ("last", ints counting back from the last real token, a tensor,
a boolean mask) into those `[b, r]` positions, refusing padding.

What an exact rollout of those positions needs (spec §4): row i of `R^l = C^l @ R^(l-1)`
reads every row of `R^(l-1)` that C^l[i] reaches. In a causal block row i reaches only
sources j ≤ i, so `R^l[i]` needs the token-level rows `0..i` of every layer below and no
others: `rollout_rows(positions, causal=True)` is `0..max(positions)`. In a bidirectional
block every row reaches every source, so all rows are needed. Only the token-level
contributions (`n²·d` per layer) are needed for those extra rows, never the per-head ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, overload

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


def resolve_positions(positions: Any, valid: Tensor) -> Tensor | None:
    """Receivers of interest as `[batch, r]` positions, or None for all.

    `positions`: "last", an int, a list of ints (the same for every batch item; negative
    ones count back from each item's last real token, so -1 is the last real token under
    left or right padding), a `[batch, r]` integer tensor, or a `[batch, pos]` boolean mask
    selecting the same number of receivers in every item. Padding cannot be selected.
    """
    if positions is None:
        return None
    batch, pos = valid.shape
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(f"positions must be 'last', an int, a list of ints or a tensor, got {positions!r}")
        positions = [-1]
    if isinstance(positions, int):
        positions = [positions]
    t = torch.as_tensor(positions, device=valid.device)
    if t.dtype == torch.bool:
        if t.shape != (batch, pos):
            raise ValueError(f"a boolean positions mask must be [batch, pos] = [{batch}, {pos}], got {tuple(t.shape)}")
        counts = t.sum(-1)
        if t.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ValueError(
                f"a boolean positions mask must select the same, non-zero number of receivers in every batch item; "
                f"it selects {counts.tolist()}"
            )
        out = t.nonzero()[:, 1].view(batch, int(counts[0]))
    else:
        if t.dtype.is_floating_point or t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"positions must be a non-empty list of ints or a [batch, r] tensor, got {positions!r}")
        t = t.long()
        if t.dim() == 1:
            t = t.expand(batch, -1)
        if t.shape[0] != batch:
            raise ValueError(f"positions has {t.shape[0]} rows but the batch has {batch} items")
        n_real = valid.sum(-1, keepdim=True)
        if bool(((t < -n_real) | (t >= pos)).any()):
            raise ValueError(
                f"positions {t.tolist()} fall outside the inputs ({pos} positions; negative ones count back "
                f"over the {n_real.flatten().tolist()} real tokens of each item)"
            )
        real = torch.where(valid, torch.arange(pos, device=valid.device), pos).sort(-1).values  # real first
        from_end = real.gather(1, (n_real + t).clamp(0, pos - 1))
        out = torch.where(t < 0, from_end, t)
    if not bool(valid.gather(1, out).all()):
        raise ValueError(f"positions {out.tolist()} select padding; choose real tokens (attention_mask == 1)")
    return out
