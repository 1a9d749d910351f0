"""Aggregation of layer-wise contributions across layers (docs/spec.md §4)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.alti.contributions import normalise_rows


def rollout(layers: Float[Tensor, "b l q k"]) -> Float[Tensor, "b l q k"]:
    """R^0 = C^0, R^l = C^l @ R^(l-1): row i of R^l is how much each input token reaches i.

    Rows are receivers; padded (all-zero) rows stay zero.
    """
    if layers.shape[-1] != layers.shape[-2]:
        raise ValueError(f"rollout needs square [query, key] matrices, got {tuple(layers.shape[-2:])}")
    out = torch.empty_like(layers)
    acc = layers[:, 0]
    out[:, 0] = acc
    for layer in range(1, layers.shape[1]):
        acc = layers[:, layer] @ acc
        out[:, layer] = acc
    return out


def attention_rollout_layers(
    patterns: Float[Tensor, "b l h q k"], valid: Float[Tensor, "b q"] | None = None
) -> Float[Tensor, "b l q k"]:
    """Abnar & Zuidema's per-layer matrices: 0.5·mean_h A + 0.5·I, rows renormalised."""
    mean = patterns.mean(dim=2)
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    mixed = 0.5 * mean + 0.5 * eye
    if valid is not None:
        v = valid.to(mixed.dtype)
        mixed = mixed * v[:, None, :, None] * v[:, None, None, :]
    return normalise_rows(mixed)


def encoder_decoder_rollout(
    encoder_rollout: Float[Tensor, "b s s"],
    cross: Float[Tensor, "b l t s1"],
    decoder_self: Float[Tensor, "b l t t"],
) -> Float[Tensor, "b l t st"]:
    """ALTI+ rollout (docs/spec.md §4): contributions of source then target-prefix tokens.

    `encoder_rollout` is the last encoder layer's rollout `[b, S, S]`; `cross[b, l]` the
    cross-attention matrices `[T, S+1]` (decoder residual last); `decoder_self[b, l]` the
    decoder self-attention matrices `[T, T]`. Returns `total[b, l]` `[T, S+T]`.
    """
    s = encoder_rollout.shape[-1]
    if cross.shape[-1] != s + 1:
        raise ValueError(f"cross has {cross.shape[-1]} columns, expected source length + 1 = {s + 1}")
    scaled_self = decoder_self * cross[..., s:]  # self rows scaled by the residual's share
    ced = cross[..., :s] @ encoder_rollout[:, None]  # [b, l, T, S]
    out = []
    acc_src, acc_tgt = ced[:, 0], scaled_self[:, 0]
    out.append(torch.cat([acc_src, acc_tgt], dim=-1))
    for layer in range(1, cross.shape[1]):
        csa = scaled_self[:, layer]
        acc_src, acc_tgt = ced[:, layer] + csa @ acc_src, csa @ acc_tgt
        acc = normalise_rows(torch.cat([acc_src, acc_tgt], dim=-1))  # removes numerical drift only
        acc_src, acc_tgt = acc[..., :s], acc[..., s:]
        out.append(acc)
    return torch.stack(out, dim=1)


def split_merged(
    merged: Float[Tensor, "b l t ts"], t: int
) -> tuple[Float[Tensor, "b l t t"], Float[Tensor, "b l t s1"]]:
    """(decoder_self, cross) of merged self+cross blocks (T5Gemma2), for `encoder_decoder_rollout`.

    `merged[b, l]` `[T, T+S]`: one block's contributions of the T target-prefix tokens (the
    residual on the diagonal) then the S source tokens, rows summing to 1. Written as a
    cross block whose residual column is the target's whole share `c_tgt_i = Σ_j merged[i, j]`,
    and a self block `merged[i, j] / c_tgt_i`, the ALTI+ step (self rows scaled by the
    residual share) gives back exactly `[merged[:, T:], merged[:, :T]]`.
    """
    tgt, src = merged[..., :t], merged[..., t:]
    return normalise_rows(tgt), torch.cat([src, tgt.sum(-1, keepdim=True)], dim=-1)


def split_merged_heads(
    heads: Float[Tensor, "b l h t ts"], residual: Float[Tensor, "b l t"], t: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-head contributions of merged blocks split like `split_merged`.

    `heads[b, l, h, i, :]` over the keys `[target ; source]` and `residual[b, l, i]` sum to 1
    per row. Returns (self heads `[b, l, h, T, T]`, self residual `[b, l, T]`, cross heads
    `[b, l, h, T, S]`, cross residual `[b, l, T]`): the cross block keeps the source parts and
    gives the rest (every target part and the residual) to its residual; the self block is
    that rest renormalised, so cross residual × self parts gives back the merged parts.
    """
    cross_heads = heads[..., t:]
    cross_residual = heads[..., :t].sum(dim=(2, 4)) + residual  # [b, l, T]
    keep = cross_residual > 0
    safe = torch.where(keep, cross_residual, torch.ones_like(cross_residual))
    self_heads = torch.where(keep[:, :, None, :, None], heads[..., :t] / safe[:, :, None, :, None], 0)
    self_residual = torch.where(keep, residual / safe, 0)
    return self_heads, self_residual, cross_heads, cross_residual
