"""Banded local attention (Longformer / LED encoders): the band expanded to dense keys.

Longformer's sliding-window attention stores each query's window of keys, not all keys: the
bridge's `hook_pattern` is Hugging Face's `[batch, query, head, 2w+1]`, column `c` holding the
weight of key `j = i - w + c` (w = one-sided window, `attention_window / 2`; columns whose key
falls outside the sequence are 0). It is still attention: a fixed probability per (receiver,
source) pair times a value of the source alone, so it is linear per receiver; written densely,
`A[b, h, i, j] = band[b, i, h, j - i + w]` for `|i - j| ≤ w` and 0 elsewhere.

LED pads the encoder input to a multiple of `attention_window` internally (the pads are masked
as keys and dropped from the encoder output), so its encoder hooks have more positions than the
source. The reader crops every encoder hook to the source length (the key length of the
decoder's cross-attention, which reads the real encoder output) after checking that no real
receiver puts weight on a padded position, so the reconstruction is checked against the real
block output at the real positions.

Global attention (`global_attention_mask`) adds columns before the band and gives the global
tokens other projections (`query_global`, `key_global`, `value_global`); it is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.types import CacheView


def band_width(hf_attn: Any) -> int | None:
    """The one-sided window w of a Longformer-style attention module, or None for any other module."""
    inner = getattr(hf_attn, "longformer_self_attn", hf_attn)
    w = getattr(inner, "one_sided_attn_window_size", None)
    return None if w is None else int(w)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def dense_from_band(
    band: Float[Tensor, "b q h c"], w: int, n: int, name: str, tolerance: float = 1e-6
) -> Float[Tensor, "b h n n"]:
    """The dense pattern `[batch, head, query, key]` of the first `n` positions of a band.

    Raises UnsupportedModelError when the band has global-attention columns (more than 2w + 1)
    or when a real receiver (one of the first n) puts weight on a key outside the sequence or on
    a position at or after `n` (the internal window padding), which the crop would drop.
    """
    if band.ndim != 4 or band.shape[-1] < 2 * w + 1 or band.shape[1] < n:
        raise UnsupportedModelError(
            f"{name}.hook_pattern has shape {_shape(band)}; a Longformer band of one-sided window {w} needs "
            f"[batch, query ≥ {n}, head, {2 * w + 1}]"
        )
    if band.shape[-1] != 2 * w + 1:
        raise UnsupportedModelError(
            f"{name}.hook_pattern has {band.shape[-1] - (2 * w + 1)} global-attention column(s) before its window "
            f"of {2 * w + 1} keys: global attention (global_attention_mask) gives the global tokens their own "
            "query/key/value projections, which lens_alti does not decompose; run without global_attention_mask"
        )
    b, _, h, c = band.shape
    length = band.shape[1]
    rows = band[:, :n].permute(0, 2, 1, 3)  # [b, h, n, c]
    i = torch.arange(n, device=band.device)[:, None]
    offset = torch.arange(c, device=band.device)[None, :]
    key = i - w + offset  # [n, c]: the key of each band column
    kept = (key >= 0) & (key < n)
    lost = torch.where(kept, torch.zeros((), dtype=band.dtype, device=band.device), rows.abs()).amax() if n else 0.0
    if float(lost) > tolerance:
        raise UnsupportedModelError(
            f"{name}.hook_pattern: a receiver among the first {n} positions puts weight {float(lost):.3g} on a key "
            f"outside them (the encoder runs on {length} positions, padded to the attention window); the band "
            "cannot be cropped to the source"
        )
    j = torch.arange(n, device=band.device)
    col = j[None, :] - i + w  # [n, n]: the band column of key j for receiver i
    inside = (col >= 0) & (col <= 2 * w)
    dense = torch.gather(rows, 3, col.clamp(0, 2 * w).expand(b, h, n, n))
    return torch.where(inside, dense, torch.zeros((), dtype=band.dtype, device=band.device))


class BandedEncoderCache(CacheView):
    """A read-only view of a cache in which one banded encoder layer looks like dense attention.

    `cache[f"{attn}.hook_pattern"]` is the dense `[b, h, n, n]` pattern; `cache[f"{attn}.hook_v"]`
    (Longformer projects sequence-first: `[pos, batch, head, d_head]`) is `[b, n, head, d_head]`;
    every other hook under `prefix` is cropped to its first n positions (axis 1).
    """

    def __init__(self, cache: Any, prefix: str, attn: str, w: int, n: int) -> None:
        super().__init__(cache)
        self._prefix, self._attn, self._w, self._n = prefix + ".", attn, w, n

    def __getitem__(self, key: str) -> Tensor:
        t = self._cache[key]
        if key == f"{self._attn}.hook_pattern":
            return dense_from_band(t, self._w, self._n, self._attn)
        if key == f"{self._attn}.hook_v":
            band = self._cache[f"{self._attn}.hook_pattern"]
            if t.ndim != 4 or t.shape[:2] != (band.shape[1], band.shape[0]):
                raise UnsupportedModelError(
                    f"{self._attn}.hook_v has shape {_shape(t)}; Longformer's values are sequence-first, "
                    f"[pos, batch, head, d_head] = [{band.shape[1]}, {band.shape[0]}, head, d_head] for "
                    f"hook_pattern {_shape(band)}"
                )
            return t.transpose(0, 1)[:, : self._n]
        if key.startswith(self._prefix) and t.ndim >= 2:
            return t[:, : self._n]
        return t


def source_length(cache: Any, cross_pattern: str, name: str) -> int:
    """The real source length: the key length of the decoder's cross-attention pattern."""
    if cross_pattern not in cache.keys():
        raise UnsupportedModelError(
            f"{name}: a banded encoder is cropped to the source length read from {cross_pattern}, which the cache lacks"
        )
    return int(cache[cross_pattern].shape[-1])
