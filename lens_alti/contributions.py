"""Contributions of each source to each receiver, from transformed vectors (spec §2, §3).

All functions work in chunks of receivers, so the `[q, k, d]` (token level) and
`[h, q, k, d]` (per head) intermediates never exist at once: memory per chunk is
bounded by `max_chunk_bytes`. In causal blocks a chunk of receivers only visits the
sources up to its last receiver.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.decompose import TransformedVectors

Measure = Literal["l1", "l2", "koba", "attention"]
MEASURES: tuple[str, ...] = ("l1", "l2", "koba", "attention")
DEFAULT_CHUNK_BYTES = 256 * 2**20


def normalise_rows(x: Tensor, dims: tuple[int, ...] = (-1,)) -> Tensor:
    """Divide by the sum over `dims`; rows whose sum is 0 stay 0 (never NaN)."""
    total = x.sum(dim=dims, keepdim=True)
    return torch.where(total > 0, x / torch.where(total > 0, total, 1), 0)


def _chunks(tv: TransformedVectors, row_elements: int, max_chunk_bytes: int) -> Iterator[tuple[int, int, int]]:
    """Yield (i0, i1, n_keys) receiver chunks whose intermediates fit the byte budget."""
    q, k = tv.weights.shape[-2:]
    per_row = max(1, row_elements * k * tv.weights.element_size() * tv.weights.shape[0])
    size = max(1, min(q, max_chunk_bytes // per_row))
    for i0 in range(0, q, size):
        i1 = min(q, i0 + size)
        yield i0, i1, (i1 if tv.causal else k)


def _distance(diff: Tensor, measure: str) -> Tensor:
    """Norm over the last dim, computed in place on `diff` (which is consumed)."""
    if measure == "l1":
        return diff.abs_().sum(dim=-1)
    return torch.linalg.vector_norm(diff, ord=2, dim=-1)


def _norm(y: Tensor, measure: str) -> Tensor:
    return y.abs().sum(dim=-1) if measure == "l1" else torch.linalg.vector_norm(y, ord=2, dim=-1)


def token_contributions(
    tv: TransformedVectors,
    measure: str = "l1",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Float[Tensor, "b q s"]:
    """Token-level contribution matrix of one block, rows normalised to sum to 1.

    Columns are the k sources, plus the residual as a last column when it is a separate
    source (cross-attention). `l1`/`l2`: max(0, ‖y_i‖ − ‖y_i − T_i(x_j)‖); `koba`:
    ‖T_i(x_j)‖₂; `attention`: head-mean attention weights (the residual gets 0).
    """
    A = tv.weights
    b, h, q, k = A.shape
    out = A.new_zeros(b, q, tv.n_sources)
    if measure == "attention":
        out[..., :k] = A.mean(dim=1)
        return normalise_rows(out)
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {', '.join(MEASURES)}")

    d = tv.vo.shape[-1]
    for i0, i1, nk in _chunks(tv, d, max_chunk_bytes):
        u = torch.einsum("bhck,bhkd->bckd", A[:, :, i0:i1, :nk], tv.vo[:, :, :nk])
        if tv.scale is not None:
            u.mul_(tv.scale[:, i0:i1, None, :])
        if tv.residual_column == "diagonal":
            rows = torch.arange(i1 - i0, device=u.device)
            u[:, rows, rows + i0] += tv.residual[:, i0:i1]
        if measure == "koba":
            out[:, i0:i1, :nk] = torch.linalg.vector_norm(u, ord=2, dim=-1)
        else:
            y = tv.resultant[:, i0:i1]
            dist = _distance(u.sub_(y[:, :, None]), measure)
            out[:, i0:i1, :nk] = (_norm(y, measure)[..., None] - dist).clamp_(min=0)

    if tv.residual_column == "last":
        if measure == "koba":
            out[..., k] = torch.linalg.vector_norm(tv.residual, ord=2, dim=-1)
        else:
            y = tv.resultant
            out[..., k] = (_norm(y, measure) - _distance(y - tv.residual, measure)).clamp_(min=0)
    return normalise_rows(out)


def head_contributions(
    tv: TransformedVectors,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Float[Tensor, "b h q k"], Float[Tensor, "b q"]]:
    """Token-through-head contributions (spec §3, L1) and the residual's share.

    Parts of receiver i are `s_i ⊙ A[h,i,j]·VO[h,j]` for every (j, h) plus the residual;
    each gets max(0, ‖y_i‖₁ − ‖y_i − part‖₁), normalised over all parts of the row, so
    `heads.sum((1, 3)) + residual == 1` on every non-empty row.
    """
    A = tv.weights
    b, h, q, k = A.shape
    d = tv.vo.shape[-1]
    heads = A.new_zeros(b, h, q, k)
    y_norm = tv.resultant.abs().sum(dim=-1)
    for i0, i1, nk in _chunks(tv, h * d, max_chunk_bytes):
        part = A[:, :, i0:i1, :nk, None] * tv.vo[:, :, None, :nk]
        if tv.scale is not None:
            part.mul_(tv.scale[:, None, i0:i1, None, :])
        y = tv.resultant[:, None, i0:i1, None, :]
        dist = part.sub_(y).abs_().sum(dim=-1)
        heads[:, :, i0:i1, :nk] = (y_norm[:, None, i0:i1, None] - dist).clamp_(min=0)
    residual = (y_norm - (tv.resultant - tv.residual).abs().sum(dim=-1)).clamp_(min=0)
    total = heads.sum(dim=(1, 3)) + residual
    safe = torch.where(total > 0, total, 1)
    keep = total > 0
    heads = torch.where(keep[:, None, :, None], heads / safe[:, None, :, None], 0)
    residual = torch.where(keep, residual / safe, 0)
    return heads, residual


def head_output_contributions(tv: TransformedVectors) -> tuple[Float[Tensor, "b h q"], Float[Tensor, "b q"]]:
    """Head-level summary (spec §3): parts are whole head outputs o^h_i plus the residual.

    `o^h_i = s_i ⊙ Σ_j A[h,i,j]·VO[h,j]`; normalised like `head_contributions`.
    """
    o = tv.head_outputs()
    y = tv.resultant
    y_norm = y.abs().sum(dim=-1)
    parts = (y_norm[:, None] - (y[:, None] - o).abs().sum(dim=-1)).clamp(min=0)
    residual = (y_norm - (y - tv.residual).abs().sum(dim=-1)).clamp(min=0)
    total = parts.sum(dim=1) + residual
    safe = torch.where(total > 0, total, 1)
    return torch.where(total[:, None] > 0, parts / safe[:, None], 0), torch.where(total > 0, residual / safe, 0)
