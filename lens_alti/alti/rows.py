"""Row-wise work on one block: some receivers at a time, the sources prepared once (docs/spec.md §9).

A receiver's row of a block needs its own activations (residual, output, norm scale), its
attention row, and every source's value vectors. `RowWise` prepares what belongs to the sources
once per block — the value vectors checked, their padding zeroed, `VO[h, j]` formed — and then
decomposes any receivers, `vectors(positions)`, in `[b, r, ...]` tensors whose row `r` is receiver
`positions[b, r]`. A block's rows are read with `pattern_at`: sliced from a dense pattern, or
recomputed from the queries and keys where the record says so (`AttentionBlock.pattern_rows`),
so the `[head, n, n]` pattern is never formed.

`row_block` restricts a record to some receivers; `lens_alti.alti.logit` and
`lens_alti.alti.routes` use it for the explained rows, and `lens_alti.alti.topdown` runs whole
blocks through `RowWise` in chunks of receivers.

Model-agnostic: receives `AttentionBlock` records.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_alti.alti.contributions import normalise_rows
from lens_alti.alti.decompose import (
    HALF_TOLERANCE,
    RECONSTRUCTION_TOLERANCE,
    TransformedVectors,
    check_pattern_distribution,
    check_reconstruction,
    decompose,
    value_vectors,
)
from lens_alti.alti.masking import MASK_LEAK_TOLERANCE, isolate_padding, leaked_attention
from lens_alti.errors import MaskMismatchError, NonFiniteError

if TYPE_CHECKING:  # the records are the interface; alti never imports reading at run time
    from lens_alti.reading.records import AttentionBlock


def gather_rows(t: Tensor, positions: Int[Tensor, "b r"], dim: int) -> Tensor:
    """`t` restricted to the indices `positions[b, r]` along `dim` of a batch-first tensor."""
    positions = positions.to(device=t.device, dtype=torch.long)
    shape = [1] * t.dim()
    shape[0], shape[dim] = positions.shape
    index = positions.view(shape).expand(*t.shape[:dim], positions.shape[1], *t.shape[dim + 1 :])
    return t.gather(dim, index)


def pattern_at(block: AttentionBlock, positions: Int[Tensor, "b r"]) -> Float[Tensor, "b h r k"]:
    """The attention rows of receivers `positions[b, r]`: recomputed (`block.pattern_rows`) or sliced."""
    if block.pattern_rows is not None:
        return block.pattern_rows.rows(positions.to(block.residual.device))
    return gather_rows(block.pattern, positions, 2)


def span_at(block: AttentionBlock, positions: Int[Tensor, "b r"]) -> tuple[Float[Tensor, "b h r s"], int]:
    """(the attention rows of receivers `positions[b, r]` over keys `lo .. lo + s − 1`, `lo`): every key
    outside the span has weight exactly 0 in every row, and the span holds every receiver's own key."""
    if block.pattern_rows is not None:
        rows, lo = block.pattern_rows.span_rows(positions.to(block.residual.device))
    else:
        rows = gather_rows(block.pattern, positions, 2)
        cols = (rows != 0).any(dim=2).any(dim=(0, 1)).nonzero().flatten()
        lo = int(cols[0]) if len(cols) else int(positions.min())
        rows = rows[..., lo : int(cols[-1]) + 1] if len(cols) else rows[..., :0]
    first, last = int(positions.min()), int(positions.max()) + 1
    before, after = max(0, lo - first), max(0, last - (lo + rows.shape[-1]))
    if before or after:  # a receiver's own key (its residual's column) lies outside: widen with zeros
        rows = torch.nn.functional.pad(rows, (before, after))
        lo -= before
    return rows, lo


def row_block(
    block: AttentionBlock, positions: Int[Tensor, "b r"], span: tuple[Tensor, int] | None = None
) -> AttentionBlock:
    """The record with only the receivers `positions[b, r]`, dense rows.

    The pattern rows, the residual, the output, the norm scale and a per-receiver `b_O` are
    those of the receivers; `receivers` records their positions. With `span = (rows, lo)`
    (`span_at`) the sources are cut to the span's keys `lo .. lo + s − 1` too, and `receivers`
    counts from `lo`: the record of the same receivers over the keys their rows reach.
    """
    norm = block.norm
    if norm is not None:
        norm = replace(norm, scale=gather_rows(norm.scale, positions, 1))
    b_O = block.b_O
    if b_O is not None and b_O.dim() == 3:  # a per-receiver bias (recurrent mixers)
        b_O = gather_rows(b_O, positions, 1)
    receivers = positions.to(block.residual.device, torch.long)
    pattern, values = (pattern_at(block, positions), block.values) if span is None else (
        span[0], block.values[:, span[1] : span[1] + span[0].shape[-1]])
    return replace(
        block,
        pattern=pattern,
        pattern_rows=None,
        values=values,
        b_O=b_O,
        residual=gather_rows(block.residual, positions, 1),
        target=gather_rows(block.target, positions, 1),
        norm=norm,
        receivers=receivers if span is None else receivers - span[1],
    )


def _check_finite(name: str, what: str, t: Tensor, valid: Tensor, layer: int) -> None:
    """NonFiniteError for NaN or Inf at a real position (`valid` broadcast from the left); boolean temporaries only."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    keep = valid.view(*valid.shape, *([1] * (t.dim() - valid.dim())))
    if bool((bad & keep).any()):
        raise NonFiniteError(f"{name}: the cache holds NaN or Inf in its {what} (layer {layer})")


class RowWise:
    """One block prepared for row-wise work (docs/spec.md §9).

    Once per block: the value vectors are checked for NaN/Inf at real sources, padded sources'
    values are zeroed (a select, so NaN there cannot reach a real row), and `vo` is formed.
    Then `vectors(positions)` decomposes receivers `positions[b, r]`: their attention rows
    (padding zeroed, the mask checked against them), residual, output and norm scale, checked
    for NaN/Inf, and their reconstruction checked (docs/spec.md §1g) when `check`.
    """

    def __init__(
        self,
        block: AttentionBlock,
        valid_q: Bool[Tensor, "b q"],
        valid_k: Bool[Tensor, "b k"],
        *,
        dtype: torch.dtype,
        check: bool,
    ) -> None:
        device = block.residual.device
        self.valid_q, self.valid_k = valid_q.to(device), valid_k.to(device)
        _check_finite(block.name, "values", block.values, self.valid_k, block.layer)
        zero = torch.zeros((), dtype=block.values.dtype, device=device)
        values = block.values if bool(self.valid_k.all()) else torch.where(
            self.valid_k[:, :, None, None], block.values, zero
        )
        self.block = replace(block, values=values)
        self.vo = value_vectors(self.block, dtype)
        self.dtype, self.check = dtype, check
        self.n_receivers = block.residual.shape[1]

    def vectors(self, positions: Int[Tensor, "b r"]) -> tuple[TransformedVectors, float]:
        """(the decomposed receivers `positions[b, r]`, their relative reconstruction error or NaN)."""
        return self._decomposed(row_block(self.block, positions), positions, self.valid_k, self.vo)

    def span_vectors(self, positions: Int[Tensor, "b r"]) -> tuple[TransformedVectors, float, int]:
        """`vectors` over the keys the receivers' rows reach only, `lo .. lo + s − 1` (`span_at`; a
        causal chunk's earlier keys, a sliding window's window): `(tv, error, lo)`, the sources of `tv`
        (and its `receivers`) counted from `lo`. Self-attention records only (the residual's column is
        the receiver's own key); others get every key, `lo = 0`."""
        if self.block.residual_column != "diagonal":
            tv, error = self.vectors(positions)
            return tv, error, 0
        rows, lo = span_at(self.block, positions)
        keys = slice(lo, lo + rows.shape[-1])
        block = row_block(self.block, positions, (rows, lo))
        tv, error = self._decomposed(block, positions, self.valid_k[:, keys], self.vo[:, :, keys])
        return tv, error, lo

    def _decomposed(
        self, block: AttentionBlock, positions: Tensor, valid_k: Tensor, vo: Tensor
    ) -> tuple[TransformedVectors, float]:
        """Check and decompose a record of receivers `positions` (`row_block`) with the sources' `valid_k`, `vo`."""
        valid_rows = self.valid_q.gather(1, positions.to(self.valid_q.device))
        for what, t in (("attention pattern", block.pattern), ("residual stream", block.residual),
                        ("block output", block.target)):
            _check_finite(block.name, what, t, valid_rows[:, None] if t.dim() == 4 else valid_rows, block.layer)
        block = _isolate_rows(block, valid_rows, valid_k)
        if self.check:
            tolerance = 10 * HALF_TOLERANCE.get(block.pattern.dtype, 1e-4)
            keys = None if bool(valid_k.all()) else valid_k  # padded keys are 0 already: no masked copy
            check_pattern_distribution(block, valid_rows, keys, tolerance)
        tv = decompose(block, dtype=self.dtype, valid_rows=valid_rows, vo=vo)
        if not self.check:
            return tv, float("nan")
        tolerance = HALF_TOLERANCE.get(block.target.dtype, RECONSTRUCTION_TOLERANCE)
        return tv, check_reconstruction(tv, block, valid_rows, tolerance)


def _isolate_rows(block: AttentionBlock, valid_rows: Tensor, valid_k: Tensor) -> AttentionBlock:
    """Padded receivers' rows and padded sources' columns set to 0 (the values were zeroed once per block);
    real rows that attend to padding are refused (the mask is not the one the model ran with), as
    `lens_alti.alti.prepare.masked_block` does for whole blocks (docs/spec.md §1h)."""
    if bool(valid_rows.all()) and bool(valid_k.all()):
        return block
    pattern = block.pattern
    if block.padding_unmasked:  # recomputed without the padding mask: renormalised (docs/spec.md §1h)
        pattern = normalise_rows(pattern * valid_k[:, None, None, :].to(pattern.dtype))
    leak = leaked_attention(pattern.abs(), valid_rows, valid_k)
    if leak > MASK_LEAK_TOLERANCE:
        raise MaskMismatchError(
            f"{block.name}: real tokens attend to positions that the mask marks as padding "
            f"(attention up to {leak:.3g}); pass the attention_mask the model was run with"
        )
    return isolate_padding(replace(block, pattern=pattern), valid_rows, valid_k, values=False)
