"""The result object returned by `lens_alti.attribute`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class AltiResult:
    """ALTI contributions of one cache (decoder-only or encoder-only model).

    Shapes are batch first; `query` = receiver position, `key` = source position.

    Attributes:
        layers: `[batch, layer, query, key]` layer-wise contributions C^l; each valid row
            sums to 1, padded rows and columns are 0. For causal models, 0 above the diagonal.
        rollout: `[batch, layer, query, key]` R^l = C^l @ R^(l-1): how much input token `key`
            reaches position `query` after layer l. `rollout[:, -1]` is the final attribution.
        heads: `[batch, layer, head, query, key]` token-through-head contributions (spec §3),
            or None unless `heads=True`. Together with `heads_residual` each row sums to 1.
        heads_residual: `[batch, layer, query]` the residual's share in that normalisation.
        head_outputs: `[batch, layer, head, query]` share of each head's whole output (parts:
            head outputs plus the residual), or None unless `heads=True`.
        head_outputs_residual: `[batch, layer, query]` the residual's share there.
        attention_mask: `[batch, pos]` 1 for real tokens.
        reconstruction_error: `[layer]` max|Σ_j T_i(x_j) + bias_i − y| / max|y| per layer
            (NaN when `check=False`).
        measure: "l1", "l2", "koba" or "attention".
        architecture: the model's architecture name.
        weight_processing: "raw" or how the weights were processed (numbers then differ from
            the unprocessed model).
        str_tokens: token strings per batch item, when `tokens` were given.
    """

    layers: Float[Tensor, "batch layer query key"]
    rollout: Float[Tensor, "batch layer query key"]
    attention_mask: Float[Tensor, "batch pos"]
    reconstruction_error: Float[Tensor, " layer"]
    measure: str
    architecture: str
    weight_processing: str
    heads: Float[Tensor, "batch layer head query key"] | None = None
    heads_residual: Float[Tensor, "batch layer query"] | None = None
    head_outputs: Float[Tensor, "batch layer head query"] | None = None
    head_outputs_residual: Float[Tensor, "batch layer query"] | None = None
    str_tokens: list[list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.layers.shape[1]

    def _label(self, batch: int, pos: int) -> str:
        if self.str_tokens is not None and pos < len(self.str_tokens[batch]):
            return self.str_tokens[batch][pos]
        return str(pos)

    def top_sources(
        self, position: int = -1, k: int = 5, *, batch: int = 0, layer: int = -1, use_rollout: bool = True
    ) -> list[tuple[int, str, float]]:
        """The `k` sources contributing most to `position`: (source index, token, value).

        Uses the rollout after `layer` (default: the last) or, with `use_rollout=False`,
        that layer's own contributions. Negative positions count from the last real token.
        """
        mat = (self.rollout if use_rollout else self.layers)[batch, layer]
        if position < 0:
            real = torch.nonzero(self.attention_mask[batch]).flatten()
            if len(real) == 0:
                raise ValueError(f"batch item {batch} has no real tokens")
            position = int(real[position])
        row = mat[position]
        vals, idx = row.topk(min(k, row.numel()))
        return [(int(i), self._label(batch, int(i)), float(v)) for v, i in zip(vals, idx, strict=False)]

    def to_dataframe(self, which: str = "rollout") -> Any:
        """Long-format pandas DataFrame of `which` ("layers", "rollout" or "heads").

        Columns: batch, layer, [head,] query, key, query_token, key_token, value; padded
        positions are left out.
        """
        import pandas as pd

        data = {"layers": self.layers, "rollout": self.rollout, "heads": self.heads}.get(which)
        if data is None:
            raise ValueError(f"which must be 'layers', 'rollout' or 'heads' (with heads=True), got {which!r}")
        names = ["batch", "layer", "head", "query", "key"] if which == "heads" else ["batch", "layer", "query", "key"]
        idx = torch.nonzero(torch.ones_like(data, dtype=torch.bool))
        mask = self.attention_mask.bool()
        b, q, kk = idx[:, 0], idx[:, -2], idx[:, -1]
        keep = mask[b, q] & mask[b, kk]
        idx = idx[keep]
        frame = pd.DataFrame(idx.cpu().numpy(), columns=names)
        frame["value"] = data[tuple(idx.T)].cpu().numpy()
        if self.str_tokens is not None:
            frame["query_token"] = [self._label(bi, qi) for bi, qi in zip(frame["batch"], frame["query"], strict=False)]
            frame["key_token"] = [self._label(bi, ki) for bi, ki in zip(frame["batch"], frame["key"], strict=False)]
        return frame

    def __repr__(self) -> str:
        b, n_layers, q, k = self.layers.shape
        heads = "" if self.heads is None else f", heads={self.heads.shape[2]}"
        return (
            f"AltiResult(batch={b}, layers={n_layers}, query={q}, key={k}{heads}, measure={self.measure!r}, "
            f"architecture={self.architecture!r}, weight_processing={self.weight_processing!r}, "
            f"max_reconstruction_error={float(self.reconstruction_error.nan_to_num(0).max()):.2e})"
        )


@dataclass
class Seq2SeqAltiResult:
    """ALTI+ contributions of an encoder-decoder cache (`S` source, `T` target positions).

    Attributes:
        encoder: an AltiResult for the encoder (`layers`, `rollout` `[batch, enc_layer, S, S]`).
        decoder_self: `[batch, dec_layer, T, T]` decoder self-attention blocks (causal).
        cross: `[batch, dec_layer, T, S+1]` cross-attention blocks; the decoder residual
            entering the block is the LAST column.
        total: `[batch, dec_layer, T, S+T]` ALTI+ rollout: source tokens first, then the
            target prefix (decoder input) tokens. `total[:, -1]` explains each prediction.
        source_contribution: `[batch, T]` share of the source in each prediction.
        decoder_self_heads / cross_heads: `[batch, dec_layer, head, T, T]` / `[..., T, S]`
            token-through-head contributions, with `*_heads_residual` `[batch, dec_layer, T]`
            (None unless `heads=True`).
        source_mask / target_mask: `[batch, S]` / `[batch, T]`, 1 for real tokens.
        reconstruction_error: per block kind ("encoder", "decoder_self", "cross"), `[layer]`.
    """

    encoder: AltiResult
    decoder_self: Float[Tensor, "batch layer tgt tgt"]
    cross: Float[Tensor, "batch layer tgt src_plus_1"]
    total: Float[Tensor, "batch layer tgt src_plus_tgt"]
    source_mask: Float[Tensor, "batch src"]
    target_mask: Float[Tensor, "batch tgt"]
    reconstruction_error: dict[str, Tensor]
    measure: str
    architecture: str
    weight_processing: str
    decoder_self_heads: Float[Tensor, "batch layer head tgt tgt"] | None = None
    decoder_self_heads_residual: Float[Tensor, "batch layer tgt"] | None = None
    cross_heads: Float[Tensor, "batch layer head tgt src"] | None = None
    cross_heads_residual: Float[Tensor, "batch layer tgt"] | None = None
    source_str_tokens: list[list[str]] | None = None
    target_str_tokens: list[list[str]] | None = None

    @property
    def source_contribution(self) -> Float[Tensor, "batch tgt"]:
        s = self.source_mask.shape[-1]
        return self.total[:, -1, :, :s].sum(-1)

    @property
    def target_contribution(self) -> Float[Tensor, "batch tgt"]:
        s = self.source_mask.shape[-1]
        return self.total[:, -1, :, s:].sum(-1)

    def top_sources(self, position: int = -1, k: int = 5, *, batch: int = 0) -> list[tuple[str, int, str, float]]:
        """The `k` tokens contributing most to target `position` in the ALTI+ total:
        ("source" or "target", index, token, value)."""
        s = self.source_mask.shape[-1]
        if position < 0:
            real = torch.nonzero(self.target_mask[batch]).flatten()
            position = int(real[position])
        row = self.total[batch, -1, position]
        vals, idx = row.topk(min(k, row.numel()))
        out = []
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            side, j = ("source", i) if i < s else ("target", i - s)
            toks = self.source_str_tokens if side == "source" else self.target_str_tokens
            label = toks[batch][j] if toks is not None else str(j)
            out.append((side, j, label, v))
        return out

    def __repr__(self) -> str:
        b, n_layers, t, _ = self.decoder_self.shape
        s = self.source_mask.shape[-1]
        errs = {k: f"{float(v.nan_to_num(0).max()):.1e}" for k, v in self.reconstruction_error.items()}
        return (
            f"Seq2SeqAltiResult(batch={b}, encoder_layers={self.encoder.n_layers}, decoder_layers={n_layers}, "
            f"src={s}, tgt={t}, measure={self.measure!r}, architecture={self.architecture!r}, "
            f"weight_processing={self.weight_processing!r}, max_reconstruction_error={errs})"
        )
