"""Contributions of each source to each receiver, from transformed vectors (docs/spec.md §2, §3).

Work is split per batch item into chunks of receivers and blocks of sources, so no
`[q, k, d]` (token level) or `[h, q, k, d]` (per head) tensor ever exists; the
distances come from the fused kernels in `lens_alti.alti.kernels`. In causal blocks a
chunk of receivers only visits the sources up to its last receiver.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.alti.backend import BACKENDS, block_backend
from lens_alti.alti.decompose import TransformedVectors
from lens_alti.alti.kernels import compile_available, get_kernel

MEASURES: tuple[str, ...] = ("l1", "l2", "koba", "attention")
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Receivers x sources per kernel call: sized for the CPU caches; larger buys nothing.
_ROWS, _KEYS = 64, 512


def normalise_rows(x: Tensor, dims: tuple[int, ...] = (-1,)) -> Tensor:
    """Divide by the sum over `dims`; rows whose sum is 0 stay 0 (never NaN)."""
    total = x.sum(dim=dims, keepdim=True)
    return torch.where(total > 0, x / torch.where(total > 0, total, 1), 0)


@dataclass(frozen=True)
class BlockContributions:
    """`tokens[b, q, sources]` rows sum to 1; with heads, `heads[b, h, q, k]` and
    `heads_residual[b, q]` together sum to 1 per row."""

    tokens: Float[Tensor, "b q s"]
    heads: Float[Tensor, "b h q k"] | None = None
    heads_residual: Float[Tensor, "b q"] | None = None


def use_compiled(backend: str, tv: TransformedVectors, heads: bool = False) -> str:
    """The kernels this block runs: "native", "compiled" or "eager" (`lens_alti.alti.backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    choice = block_backend(backend, tv, heads)
    return "eager" if choice == "compiled" and not compile_available() else choice


def _tiles(
    tv: TransformedVectors, compiled: bool, heads: bool, max_chunk_bytes: int, positions: list[int] | None = None
) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """Blocks of sources (k0, k1), each with the receiver chunks (i0, i1, end) that read it.

    Causal blocks skip sources at or after `end`, one past the chunk's last receiver
    position (`positions[i]` is row i's position, default i). Chunks are sized so that the
    kernel's temporaries fit `max_chunk_bytes`.
    """
    _, h, q, k = tv.weights.shape
    d = tv.vo.shape[-1]
    size = tv.weights.element_size()
    keys = min(k, _KEYS)
    # Eager kernels hold [h, rows, keys, d] (heads) or [rows, keys, d] temporaries; compiled ones only outputs.
    per_row = keys * size * ((h + 1) if compiled else (h + 2 if heads else 3) * d)
    rows = max(1, min(q, _ROWS if compiled else q, max_chunk_bytes // per_row))
    chunks = [(i0, min(q, i0 + rows)) for i0 in range(0, q, rows)]
    ends = [i1 if positions is None else max(positions[i0:i1]) + 1 for i0, i1 in chunks]
    for k0 in range(0, k, keys):
        k1 = min(k, k0 + keys)
        yield k0, k1, [(i0, i1, end) for (i0, i1), end in zip(chunks, ends, strict=True) if not tv.causal or end > k0]


def _norm(x: Tensor, measure: str) -> Tensor:
    return x.abs().sum(-1) if measure == "l1" else x.square().sum(-1).sqrt()


def _from_distance(y_norm: Tensor, dist: Tensor, measure: str) -> Tensor:
    """Contribution from a distance ‖y − T‖ (l1, l2) or the norm ‖T‖ itself (koba)."""
    return dist if measure == "koba" else (y_norm - dist).clamp(min=0)


def block_contributions(
    tv: TransformedVectors,
    measure: str = "l1",
    *,
    heads: bool = False,
    key_mask: Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
) -> BlockContributions:
    """Token-level contributions of one block (and per-head ones, always L1).

    Token columns are the k sources, plus the residual as a last column when it is a
    separate source (cross-attention). `l1`/`l2`: max(0, ‖y_i‖ − ‖y_i − T_i(x_j)‖);
    `koba`: ‖T_i(x_j)‖₂; `attention`: head-mean attention weights (the residual gets 0).
    Per head (docs/spec.md §3): parts `s_i ⊙ A[h,i,j]·VO[h,j]` and the residual, each scored
    max(0, ‖y_i‖₁ − ‖y_i − part‖₁) and normalised over all parts of the row; with
    `tv.channels_per_head` G > 1 a head's part sums its G channels' parts (`heads[b, H, q, k]`).
    `key_mask[b, k]` (False = padding) forces padded sources to exactly 0.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {', '.join(MEASURES)}")
    A, vo, y = tv.weights, tv.vo, tv.resultant
    b, h, q, k = A.shape
    choice = use_compiled(backend, tv, heads)
    compiled = choice == "compiled"
    tokens = A.new_zeros(b, q, tv.n_sources)
    G = tv.channels_per_head
    head_scores = A.new_zeros(b, tv.n_heads, q, k) if heads else None
    y_l1 = y.abs().sum(-1)
    token_kernel = None if measure == "attention" else get_kernel(measure, choice)
    both_kernel = get_kernel("l1+heads", choice) if heads and G == 1 else None
    # Channels grouped into heads (G > 1): a head's distance is the token-level L1 kernel run on
    # that head's channels only (exact: its part is s_i ⊙ Σ_{c∈h} A[c,i,j]·VO[c,j]).
    group_kernel = get_kernel("l1", choice) if heads and G > 1 else None
    if measure == "attention":
        tokens[..., :k] = A.mean(dim=1)

    scale = tv.scale if tv.scale is not None else torch.ones_like(y)
    y_norm = _norm(y, measure) if measure != "attention" else None
    # Compiled kernels get fresh tensors (views add recompilation guards); eager ones views.
    fresh = (lambda t: t.clone()) if compiled else (lambda t: t)  # noqa: E731
    rows_at = None if tv.receivers is None else tv.receivers.tolist()
    for bi in range(b):
        row_pos = None if rows_at is None else rows_at[bi]
        for k0, k1, chunks in _tiles(tv, choice != "eager", heads and G == 1, max_chunk_bytes, row_pos):
            vo_tile = fresh(vo[bi, :, k0:k1])
            for i0, i1, end in chunks:
                kk = min(k1, end) if tv.causal else k1  # causal: no source after the last receiver
                a_tile = A[bi, :, i0:i1, k0:kk]
                if tv.receivers is not None and not bool(a_tile.any()):
                    continue  # no attention in this tile (a sliding window): every score is exactly 0
                v = vo_tile if kk == k1 else fresh(vo_tile[:, : kk - k0])
                args = (fresh(y[bi, i0:i1]), fresh(scale[bi, i0:i1]), fresh(a_tile), v)
                if both_kernel is not None and measure == "l1":
                    per_head, dist = both_kernel(*args)
                else:
                    dist = token_kernel(*args) if token_kernel is not None else None
                    per_head = both_kernel(*args)[0] if both_kernel is not None else None
                if group_kernel is not None:
                    per_head = torch.stack([
                        group_kernel(args[0], args[1], fresh(args[2][c0 : c0 + G]), fresh(args[3][c0 : c0 + G]))
                        for c0 in range(0, h, G)
                    ])
                if dist is not None and y_norm is not None:
                    tokens[bi, i0:i1, k0:kk] = _from_distance(y_norm[bi, i0:i1, None], dist, measure)
                if per_head is not None and head_scores is not None:
                    head_scores[bi, :, i0:i1, k0:kk] = (y_l1[bi, None, i0:i1, None] - per_head).clamp(min=0)

    if y_norm is not None:  # every measure but "attention"
        _add_residual(tv, tokens, y_norm, measure)
    if tv.causal:
        if tv.receivers is None:
            upper = torch.ones(q, k, dtype=torch.bool, device=A.device).triu(1)
            tokens[..., :k].masked_fill_(upper, 0)
        else:  # [b, q, k]: source after the receiver's position
            upper = torch.arange(k, device=A.device) > tv.receivers[..., None]
            tokens[..., :k].masked_fill_(upper, 0)
            upper = upper[:, None]
        if head_scores is not None:
            head_scores.masked_fill_(upper, 0)
    if key_mask is not None:
        tokens[..., :k] *= key_mask[:, None, :].to(tokens.dtype)
        if head_scores is not None:
            head_scores *= key_mask[:, None, None, :].to(head_scores.dtype)
    if head_scores is None:
        return BlockContributions(normalise_rows(tokens))
    head_parts, residual = _normalise_with_residual(head_scores.transpose(1, 2), _residual_score(tv))
    return BlockContributions(normalise_rows(tokens), head_parts.transpose(1, 2), residual)


def _residual_score(tv: TransformedVectors) -> Float[Tensor, "b q"]:
    """max(0, ‖y_i‖₁ − ‖y_i − R_i‖₁) for the residual part R_i of each receiver."""
    y = tv.resultant
    return (y.abs().sum(-1) - (y - tv.residual).abs().sum(-1)).clamp(min=0)


def _normalise_with_residual(parts: Tensor, residual: Float[Tensor, "b q"]) -> tuple[Tensor, Tensor]:
    """Normalise `parts[b, q, ...]` and `residual[b, q]` together so each row sums to 1 (0 if empty)."""
    extra = (1,) * (parts.dim() - 2)
    total = parts.sum(dim=tuple(range(2, parts.dim()))) + residual
    keep = total > 0
    safe = torch.where(keep, total, 1)
    return (
        torch.where(keep.view(*keep.shape, *extra), parts / safe.view(*safe.shape, *extra), 0),
        torch.where(keep, residual / safe, 0),
    )


def _add_residual(tv: TransformedVectors, tokens: Tensor, y_norm: Tensor, measure: str) -> None:
    """Score the residual: on the diagonal (its own token's T_i(x_i)) or as the last column."""
    y = tv.resultant
    q, k = tv.weights.shape[-2:]
    if tv.residual_column == "last":
        dist = _norm(tv.residual if measure == "koba" else y - tv.residual, measure)
        tokens[..., k] = _from_distance(y_norm, dist, measure)
        return
    if tv.receivers is not None:
        _add_own_residual(tv, tokens, y_norm, measure)
        return
    n = min(q, k)
    idx = torch.arange(n, device=y.device)
    own = torch.einsum("bhi,bhid->bid", tv.weights[:, :, idx, idx], tv.vo[:, :, :n])  # Σ_h A[h,i,i]·VO[h,i]
    if tv.scale is not None:
        own = own * tv.scale[:, :n]
    t_ii = own + tv.residual[:, :n]
    dist = _norm(t_ii if measure == "koba" else y[:, :n] - t_ii, measure)
    tokens[:, idx, idx] = _from_distance(y_norm[:, :n], dist, measure)


def _add_own_residual(tv: TransformedVectors, tokens: Tensor, y_norm: Tensor, measure: str) -> None:
    """Diagonal residual term for restricted receivers: row r is position p = receivers[b, r]."""
    pos = tv.receivers
    assert pos is not None  # internal: only called for restricted receivers
    b, h, q, k = tv.weights.shape
    inside = pos < k  # a receiver with no source at its own position has no diagonal term
    p = pos.clamp(max=k - 1)
    a_own = tv.weights.gather(3, p[:, None, :, None].expand(b, h, q, 1))[..., 0]  # [b, h, q]: A[h, r, p]
    vo_own = tv.vo.gather(2, p[:, None, :, None].expand(b, h, q, tv.vo.shape[-1]))  # [b, h, q, d]: VO[h, p]
    own = torch.einsum("bhq,bhqd->bqd", a_own, vo_own)
    if tv.scale is not None:
        own = own * tv.scale
    t_ii = own + tv.residual
    dist = _norm(t_ii if measure == "koba" else tv.resultant - t_ii, measure)
    value = _from_distance(y_norm, dist, measure)
    rows = torch.arange(q, device=pos.device).expand(b, q)
    batch = torch.arange(b, device=pos.device)[:, None].expand(b, q)
    tokens[batch[inside], rows[inside], p[inside]] = value[inside]


def head_output_contributions(tv: TransformedVectors) -> tuple[Float[Tensor, "b h q"], Float[Tensor, "b q"]]:
    """Head-level summary (docs/spec.md §3): parts are whole head outputs o^h_i plus the residual.

    `o^h_i = s_i ⊙ Σ_j A[h,i,j]·VO[h,j]` (summed over a head's channels when G > 1);
    normalised like the per-head contributions.
    """
    y = tv.resultant
    parts = (y.abs().sum(-1)[:, None] - (y[:, None] - tv.head_outputs()).abs().sum(-1)).clamp(min=0)  # [b, h, q]
    shares, residual = _normalise_with_residual(parts.transpose(1, 2), _residual_score(tv))
    return shares.transpose(1, 2), residual
