"""The results of `lens_alti.attribute`: AltiResult (decoder-only, encoder) and Seq2SeqAltiResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_alti.errors import InvalidArgumentError
from lens_alti.results.saving import savable, save
from lens_alti.validation import check_choice, check_index, check_position, check_size, check_type


@savable
@dataclass
class AltiResult:
    """ALTI contributions of one cache (decoder-only or encoder-only model).

    Shapes are batch first; `query` = receiver position, `key` = source position.

    Attributes:
        layers: `[batch, layer, query, key]` layer-wise contributions C^l; each valid row
            sums to 1, padded rows and columns are 0. For causal models, 0 above the diagonal.
        rollout: `[batch, layer, query, key]` R^l = C^l @ R^(l-1): how much input token `key`
            reaches position `query` after layer l. `rollout[:, -1]` is the final attribution.
        heads: `[batch, layer, head, query, key]` token-through-head contributions (docs/spec.md §3),
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
        positions: `[batch, row]` the receiver positions of the rows of `layers`, `rollout`
            and the per-head results when `attribute(..., positions=...)` restricted them
            (their `query` dimension then has one row per position); None when every
            position was computed.
        sinks: `[batch, pos]` True at the attention sinks (docs/spec.md §10): the first real
            token when it is a special token (BOS, `<|im_start|>`, [CLS]), else the positions
            into which most heads put most of their attention. Nothing is removed from `layers`
            or `rollout`; `top_sources` leaves the sinks out unless asked, `sink_share` reports
            them. None for results saved before sinks were detected.
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
    positions: Int[Tensor, "batch row"] | None = None
    sinks: Bool[Tensor, "batch pos"] | None = None

    @property
    def n_layers(self) -> int:
        return self.layers.shape[1]

    @property
    def sink_share(self) -> Float[Tensor, "batch row"]:
        """`[batch, row]` the share of the attention sinks in each receiver after the last layer
        (Σ over the sink positions of `rollout[:, -1]`; 0 where no sink was found)."""
        final = self.rollout[:, -1]
        if self.sinks is None:
            return final.new_zeros(final.shape[:2])
        return (final * self.sinks.to(device=final.device, dtype=final.dtype)[:, None, :]).sum(-1)

    def _label(self, batch: int, pos: int) -> str:
        if self.str_tokens is not None and pos < len(self.str_tokens[batch]):
            return self.str_tokens[batch][pos]
        return str(pos)

    def top_sources(
        self, position: int = -1, k: int = 5, *, batch: int = 0, layer: int = -1, use_rollout: bool = True,
        include_sink: bool = False,
    ) -> list[tuple[int, str, float]]:
        """The `k` sources contributing most to `position`: (source index, token, value).

        Uses the rollout after `layer` (default: the last) or, with `use_rollout=False`,
        that layer's own contributions. Negative positions count from the last real token.
        The attention sinks (`sinks`, docs/spec.md §10) are left out unless `include_sink=True`;
        their share is `sink_share`.
        """
        batch = check_index("batch", batch, self.layers.shape[0], what="batch items")
        layer = check_index("layer", layer, self.n_layers, what="layers")
        position = check_position("position", position, self.attention_mask[batch], where=f"batch item {batch}")
        k = check_size("k", k)
        check_type("include_sink", include_sink, bool, "True or False")
        mat = (self.rollout if use_rollout else self.layers)[batch, layer]
        real = self.attention_mask[batch].bool().to(mat.device)
        if not include_sink and self.sinks is not None:
            real = real & ~self.sinks[batch].to(mat.device)
        row = torch.where(real, mat[self.row_of(position, batch)], float("-inf"))  # padded sources are never listed
        vals, idx = row.topk(min(k, int(real.sum())))
        return [(int(i), self._label(batch, int(i)), float(v)) for v, i in zip(vals, idx, strict=False)]

    def row_of(self, position: int, batch: int = 0) -> int:
        """Row of `layers`/`rollout`/`heads` holding receiver `position` (itself unless restricted)."""
        if self.positions is None:
            return position
        hits = (self.positions[batch] == position).nonzero().flatten()
        if len(hits) == 0:
            raise InvalidArgumentError(
                "position", position, f"one of the computed positions {self.positions[batch].tolist()} of batch "
                f"item {batch}",
                f"Position {position} was not computed: this result was made with attribute(..., positions=...).",
            )
        return int(hits[0])

    def to_dataframe(self, which: str = "rollout") -> Any:
        """Long-format pandas DataFrame of `which` ("layers", "rollout" or "heads").

        Columns: batch, layer, [head,] query, key, query_token, key_token, value; padded
        positions are left out.
        """
        import pandas as pd

        check_choice("which", which, ("layers", "rollout", "heads"))
        data = {"layers": self.layers, "rollout": self.rollout, "heads": self.heads}.get(which)
        if data is None:
            raise InvalidArgumentError("which", which, "'layers' or 'rollout' ('heads' needs heads=True)")
        names = ["batch", "layer", "head", "query", "key"] if which == "heads" else ["batch", "layer", "query", "key"]
        idx = torch.nonzero(torch.ones_like(data, dtype=torch.bool, device="cpu"))
        mask = self.attention_mask.bool().cpu()
        b, r, kk = idx[:, 0], idx[:, -2], idx[:, -1]
        q = r if self.positions is None else self.positions.cpu()[b, r]
        keep = mask[b, q] & mask[b, kk]
        values = data.detach().cpu().flatten()[keep]
        idx, q = idx[keep], q[keep]
        idx[:, -2] = q  # rows -> receiver positions
        frame = pd.DataFrame(idx.numpy(), columns=names)
        frame["value"] = values.numpy()
        if self.str_tokens is not None:
            import numpy as np

            # One label table [batch, pos] indexed by arrays: no Python loop per cell.
            width = max(self.attention_mask.shape[-1], max(len(t) for t in self.str_tokens))
            labels = np.array([[self._label(bi, p) for p in range(width)] for bi in range(len(self.str_tokens))])
            frame["query_token"] = labels[frame["batch"].to_numpy(), frame["query"].to_numpy()]
            frame["key_token"] = labels[frame["batch"].to_numpy(), frame["key"].to_numpy()]
        return frame

    def save(self, path: Any) -> Any:
        """Write this result to `path` (.safetensors + JSON metadata); read it back with `lens_alti.load`."""
        return save(self, path)

    def __repr__(self) -> str:
        b, n_layers, q, k = self.layers.shape
        heads = "" if self.heads is None else f", heads={self.heads.shape[2]}"
        return (
            f"AltiResult(batch={b}, layers={n_layers}, query={q}, key={k}{heads}, measure={self.measure!r}, "
            f"architecture={self.architecture!r}, weight_processing={self.weight_processing!r}, "
            f"max_reconstruction_error={float(self.reconstruction_error.nan_to_num(0).max()):.2e})"
        )


@savable
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

    Models whose decoder attends to [target prefix ; source] in one softmax (T5Gemma2) have one
    block per decoder layer; it is reported split exactly (`alti.rollout.split_merged`): `cross`
    holds its source columns and, as the residual column, the target prefix's whole share (with
    measure="attention": the attention to the target prefix); `decoder_self` is the target part
    renormalised; both `reconstruction_error` entries are the merged blocks' errors.
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
    positions: Int[Tensor, "batch row"] | None = None

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
        batch = check_index("batch", batch, self.total.shape[0], what="batch items")
        position = check_position("position", position, self.target_mask[batch], where=f"target of batch item {batch}")
        k = check_size("k", k)
        row = self.total[batch, -1, position]
        vals, idx = row.topk(min(k, row.numel()))
        out = []
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            side, j = ("source", i) if i < s else ("target", i - s)
            toks = self.source_str_tokens if side == "source" else self.target_str_tokens
            label = toks[batch][j] if toks is not None else str(j)
            out.append((side, j, label, v))
        return out

    def save(self, path: Any) -> Any:
        """Write this result to `path` (.safetensors + JSON metadata); read it back with `lens_alti.load`."""
        return save(self, path)

    def __repr__(self) -> str:
        b, n_layers, t, _ = self.decoder_self.shape
        s = self.source_mask.shape[-1]
        errs = {k: f"{float(v.nan_to_num(0).max()):.1e}" for k, v in self.reconstruction_error.items()}
        return (
            f"Seq2SeqAltiResult(batch={b}, encoder_layers={self.encoder.n_layers}, decoder_layers={n_layers}, "
            f"src={s}, tgt={t}, measure={self.measure!r}, architecture={self.architecture!r}, "
            f"weight_processing={self.weight_processing!r}, max_reconstruction_error={errs})"
        )
