"""Aggregation of layer-wise contributions across layers (spec §4)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.contributions import normalise_rows


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
