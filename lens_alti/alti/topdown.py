"""The rollout of a few positions, evaluated top-down one block at a time (docs/spec.md §12).

The rollout row of position p after layer l is `R^l[p] = e_p C^l C^(l−1) ⋯ C^0`: a row vector
pushed down through the blocks, `r ← r C^l`, starting from the top. `RowRollout` holds such row
vectors (any number per batch item) over the positions entering the current block, and
`through(block)` replaces each by `r C^l`, computing `C^l` in chunks of receivers
(`lens_alti.alti.rows.RowWise`) and never holding it whole: a chunk of receivers `R` adds
`r[R] @ C^l[R, :]`, over the keys the chunk's rows reach only (`RowWise.span_vectors`: a causal
chunk's earlier keys, a sliding window's window). A chunk whose entries are 0 in every row
vector is skipped (in a causal model, receivers after the explained position), unless one of its
rows is kept.

Used by `attribute(..., positions=...)` (the rollout rows of the explained positions after each
layer) and by `logit_attribution` (each layer's update `Δ^l` pushed through the layers below it,
docs/spec.md §7d). Peak memory: the row vectors, one block's sources and one chunk's rows.

Model-agnostic: receives `RowWise` blocks.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_alti.alti.contributions import DEFAULT_CHUNK_BYTES, block_contributions
from lens_alti.alti.rows import RowWise, gather_rows

# Copies of a chunk's attention rows alive at once (the rows, a masked copy under padding, and the
# temporaries of recomputing or checking them), counted in the chunk's budget.
_ROW_COPIES = 4


def chunk_rows(
    batch: int, heads: int, keys: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, element_size: int = 4
) -> int:
    """Receivers per chunk so that a chunk's attention rows and their working copies fit `max_chunk_bytes`."""
    per_row = _ROW_COPIES * batch * heads * keys * element_size
    return max(1, max_chunk_bytes // max(1, per_row))


class RowRollout:
    """Row vectors `[b, m, n]` over the positions entering the current block, pushed down block by block."""

    def __init__(self, batch: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.vectors: Float[Tensor, "b m n"] = torch.zeros(batch, 0, n, dtype=dtype, device=device)

    def add(self, rows: Float[Tensor, "b m n"]) -> slice:
        """Append row vectors (over the positions entering the current block); their indices."""
        start = self.vectors.shape[1]
        self.vectors = torch.cat([self.vectors, rows.to(self.vectors)], dim=1)
        return slice(start, self.vectors.shape[1])

    def through(
        self,
        block: RowWise,
        measure: str,
        *,
        keep: Int[Tensor, "b r"] | None = None,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backend: str = "auto",
    ) -> tuple[Float[Tensor, "b r s"] | None, float]:
        """Replace every row vector `r` by `r C` for the block's contributions `C` (`measure`).

        Returns (`C[keep[b, r], :]`, the contribution rows of the receivers `keep`, or None;
        the largest relative reconstruction error of the computed receivers, NaN unchecked).
        """
        V = self.vectors
        b, m, n = V.shape
        device = block.block.residual.device
        heads, keys = block.block.values.shape[2], block.block.values.shape[1]
        size = torch.finfo(block.dtype).bits // 8
        step = min(n, chunk_rows(b, heads, keys, max_chunk_bytes, size))
        key_mask = None if bool(block.valid_k.all()) else block.valid_k
        out = torch.zeros(b, m, keys, dtype=V.dtype, device=V.device)
        kept = None
        worst = float("nan")
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            wanted = keep is not None and bool(((keep >= i0) & (keep < i1)).any())
            if not wanted and not bool(V[:, :, i0:i1].any()):
                continue
            positions = torch.arange(i0, i1, device=device).expand(b, i1 - i0)
            tv, err, lo = block.span_vectors(positions)  # sources lo .. hi − 1: the keys these rows reach
            hi = lo + tv.weights.shape[-1]
            worst = err if worst != worst else max(worst, err)  # NaN-aware max
            span_mask = None if key_mask is None else key_mask[:, lo:hi]
            c = block_contributions(tv, measure, key_mask=span_mask, max_chunk_bytes=max_chunk_bytes, backend=backend)
            rows = (c.tokens * block.valid_q[:, i0:i1, None].to(c.tokens.dtype)).to(V.device, V.dtype)
            if m:
                out[..., lo:hi] += torch.einsum("bmc,bck->bmk", V[:, :, i0:i1], rows[..., : hi - lo])
            if wanted and keep is not None:
                whole = rows.new_zeros(b, i1 - i0, keys)
                whole[..., lo:hi] = rows[..., : hi - lo]
                kept = _keep_rows(kept, whole, keep.to(V.device), i0, i1)
        self.vectors = out
        return kept, worst


def _keep_rows(kept: Tensor | None, rows: Tensor, keep: Tensor, i0: int, i1: int) -> Tensor:
    """`kept[b, r]` set to the chunk's row of receiver `keep[b, r]` where it lies in [i0, i1)."""
    if kept is None:
        kept = rows.new_zeros(keep.shape[0], keep.shape[1], rows.shape[-1])
    inside = (keep >= i0) & (keep < i1)
    picked = gather_rows(rows, (keep - i0).clamp(0, i1 - i0 - 1), 1)
    return torch.where(inside[..., None], picked, kept)
