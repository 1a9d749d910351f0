"""Padding and the attention mask, at the level of block records (model-agnostic).

Two guarantees `attribute` relies on:

1. **The mask matches the cache.** A cache run with padding leaves its trace in the
   attention weights of every layer: a padded receiver gives itself zero attention (its own
   key is masked) or, when every key it may see is padding (left padding in a causal model),
   spreads its attention over all positions, later ones included; and every real query gives
   a padded key exactly zero attention. `undeclared_padding` finds positions the mask calls
   real that show both signs, from the first block's pattern only (already read), so a missing
   or short mask raises `MaskMismatchError` instead of explaining pad tokens. (Positions the
   mask calls padding but that real queries attend to are caught by `leaked_attention`.)
2. **Padded positions never influence real ones.** `isolate_padding` replaces everything a
   padded position holds (pattern rows/columns, value vectors, residual, target, norm scale)
   by neutral values with `torch.where`, so NaN or Inf stored there cannot reach real rows
   (0·NaN would) nor the reconstruction check.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool
from torch import Tensor

from lens_alti.errors import MaskMismatchError

if TYPE_CHECKING:  # the records are the interface; alti never imports reading at run time
    from lens_alti.reading.records import AttentionBlock


def _describe(flags: Tensor) -> str:
    """ "0-1 of batch item 0; 5 of batch item 2" for a [b, q] bool tensor."""
    from lens_alti.validation import describe_positions

    parts = []
    for b in range(flags.shape[0]):
        pos = torch.nonzero(flags[b]).flatten().tolist()
        if pos:
            parts.append(f"{describe_positions(pos)} of batch item {b}")
    return "; ".join(parts)


def undeclared_padding(pattern: Tensor, declared_real: Bool[Tensor, "b q"], *, causal: bool) -> Bool[Tensor, "b q"]:
    """Positions the mask calls real whose attention weights say they are padding.

    `pattern[b, h, q, q]` of a self-attention block. A position is flagged when
    (a) as a receiver it gives itself zero attention in every head, or (causal blocks)
    attends to a later position; and (b) as a key it gets zero attention in every head from
    every other unflagged real query that may see it (later ones in causal blocks), or no
    such query exists (the last position of a causal block).
    """
    b, h, q, k = pattern.shape
    if q != k or q == 0:
        return torch.zeros(b, q, dtype=torch.bool, device=pattern.device)
    # Attention weights are ≥ 0 (NaN counts as attention): the max over heads says whether any
    # head attends, with one [b, q, k] reduction instead of a [b, h, q, k] temporary.
    nonzero = pattern.amax(1) != 0  # [b, query, key]
    receiver = ~torch.diagonal(nonzero, dim1=-2, dim2=-1)  # [b, q]: no head attends to itself
    if causal:
        receiver |= nonzero.triu(1).any(-1)
    receiver &= declared_real
    viewers = declared_real & ~receiver  # [b, q]
    seen = nonzero & viewers[:, :, None]  # [b, query, key]: some head of a trusted query attends
    allowed = torch.ones(q, q, dtype=torch.bool, device=pattern.device)
    allowed = allowed.tril(-1) if causal else allowed & ~torch.eye(q, dtype=torch.bool, device=pattern.device)
    seen &= allowed
    has_viewer = (viewers[:, :, None] & allowed).any(1)  # [b, key]
    unseen = ~seen.any(1)
    return receiver & (unseen | ~has_viewer)


def check_declared_padding(
    block: AttentionBlock, declared_real: Bool[Tensor, "b q"], *, causal: bool, mask_name: str
) -> None:
    """Raise MaskMismatchError when a self-attention block shows padding that `mask_name` does not declare."""
    if block.residual_column != "diagonal":
        return
    flags = undeclared_padding(block.pattern, declared_real.to(block.pattern.device), causal=causal)
    if bool(flags.any()):
        raise MaskMismatchError(
            f"{block.name}: position(s) {_describe(flags)} are padding in the cache (they give themselves no "
            f"attention{' or attend to later positions' if causal else ''}, and no real token attends to them) "
            f"but {mask_name} marks them as real. Pass the same {mask_name} that run_with_cache was given "
            "(None means the cache has no padding)."
        )


# Attention a real query may give a padded key before the mask is called inconsistent.
MASK_LEAK_TOLERANCE = 1e-6


def leaked_attention(pattern: Tensor, valid_q: Tensor, valid_k: Tensor) -> float:
    """Largest attention a real query gives a key the mask calls padding (0 when consistent)."""
    if pattern.numel() == 0:
        return 0.0
    keep = valid_q[:, :, None] & ~valid_k[:, None, :]
    return float(torch.where(keep, pattern.amax(1), 0).amax())  # weights ≥ 0: max over heads first


def isolate_padding(
    block: AttentionBlock, valid_q: Tensor, valid_k: Tensor, *, values: bool = True
) -> AttentionBlock:
    """The record with every padded position neutralised (0 pattern/values/residual/target, norm scale 1;
    `values=False` leaves the values as they are, for callers that zeroed them once already).

    Uses `torch.where`, never multiplication, so NaN/Inf at padded positions disappear
    instead of turning real rows into NaN.
    """
    if bool(valid_q.all()) and bool(valid_k.all()):
        return block
    zero = torch.zeros((), dtype=block.pattern.dtype, device=block.pattern.device)
    keep = valid_q[:, None, :, None] & valid_k[:, None, None, :]
    norm = block.norm
    if norm is not None:
        norm = replace(norm, scale=torch.where(valid_q, norm.scale, torch.ones((), dtype=norm.scale.dtype)))
    return replace(
        block,
        pattern=torch.where(keep, block.pattern, zero),
        values=torch.where(valid_k[:, :, None, None], block.values, torch.zeros((), dtype=block.values.dtype))
        if values else block.values,
        residual=torch.where(valid_q[..., None], block.residual, torch.zeros((), dtype=block.residual.dtype)),
        target=torch.where(valid_q[..., None], block.target, torch.zeros((), dtype=block.target.dtype)),
        norm=norm,
    )
