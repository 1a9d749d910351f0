"""The result of `lens_alti.logit_attribution` (ALTI-Logit, docs/spec.md §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_alti.validation import check_index, check_size, check_type


@dataclass
class LogitAttribution:
    """A logit (or logit difference `target − contrast`) at one position per batch item, split exactly.

    Shapes: `b` batch, `layer` attention layers (decoder layers for encoder-decoders), `head`
    heads, `src` input tokens. Decoder-only: `src` = the positions of the input. Encoder-decoder:
    `src` = the `n_source` source tokens, then the target-prefix (decoder input) tokens.

    Direct parts (each the logit update of one piece of the residual stream at the explained
    position, read through the final norm linearised at its real scale):
        heads: `[b, layer, head, k]` Δ^l[h, k]: head h's output at the explained position coming
            from source position k of that layer's input (decoder self-attention for
            encoder-decoders, `k` = target positions), or None with `heads=False`.
        head_totals: `[b, layer, head]` Σ_k heads: the head's direct logit attribution.
        cross_heads / cross_head_totals: `[b, layer, head, S]` / `[b, layer, head]` the same for
            cross-attention heads (encoder-decoders; k = encoder output positions), else None.
        mlp: `[b, layer]` each MLP output's logit update.
        attn_bias: `[b, layer]` each layer's attention terms owned by no source (b_O, post-norm β).
        embedding: `[b]` the embedding (x^0) of the explained position.
        bias: `[b]` every term owned by no token, head or MLP: Σ attn_bias, post-norm β of MLP
            sublayers, the final norm's β and the unembedding bias.
        logit: `[b]` the real logit (difference), read from the model's output (before any
            soft-capping; see `softcap`).
        completeness_gap: `[b]` logit − (embedding + Σ head_totals [+ Σ cross_head_totals] + Σ mlp
            + bias); checked to be ≤ 1e-4 relative on every call.

    Mapped to input tokens (ALTI-Logit):
        by_layer: `[b, layer, src]` ALTI-Logit^l = Δ^l @ R^(l−1), each attention layer's update
            (summed over heads) mapped to input tokens through the ALTI rollout below it.
        tokens: `[b, src]` Σ_l by_layer plus the embedding term on the explained token: each
            input token's signed contribution. MLP and bias terms are not given to tokens.

    Attention sinks (docs/spec.md §10):
        sinks: `[b, src]` True at the positions that are attention sinks (a prepended special
            token such as BOS or `<|im_start|>`, else the positions most heads attend to most),
            or None where they are not detected (encoder-decoders).
        sink: `[b]` (property) the signed contribution credited to the sinks, Σ tokens[sinks];
            `content` = `tokens.sum(-1) − sink`. `tokens` keeps every position; `top_tokens`
            leaves the sinks out unless `include_sink=True`.

    Also: `target`, `contrast` (`[b]` ids, contrast None without one or when it was a distribution
    over the vocabulary: then `extra["soft_contrast"]` is True and `logit` is `logit_target −
    Σ_v p_v·logit_v`, docs/spec.md §13b), `position` (`[b]` the
    explained position), `attention_mask` (`[b, pos]`, decoder side), `softcap`, `architecture`,
    `weight_processing`, `str_tokens` (labels of `src` per batch item, when tokens were given).
    """

    by_layer: Float[Tensor, "b layer src"]
    tokens: Float[Tensor, "b src"]
    heads: Float[Tensor, "b layer head k"] | None
    head_totals: Float[Tensor, "b layer head"]
    mlp: Float[Tensor, "b layer"]
    attn_bias: Float[Tensor, "b layer"]
    embedding: Float[Tensor, " b"]
    bias: Float[Tensor, " b"]
    logit: Float[Tensor, " b"]
    completeness_gap: Float[Tensor, " b"]
    target: Int[Tensor, " b"]
    contrast: Int[Tensor, " b"] | None
    position: Int[Tensor, " b"]
    attention_mask: Int[Tensor, "b pos"]
    architecture: str
    weight_processing: str
    softcap: float | None = None
    n_source: int = 0
    cross_heads: Float[Tensor, "b layer head S"] | None = None
    cross_head_totals: Float[Tensor, "b layer head"] | None = None
    str_tokens: list[list[str]] | None = None
    target_str: list[str] | None = None
    contrast_str: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sinks: Bool[Tensor, "b src"] | None = None

    @property
    def sink(self) -> Float[Tensor, " b"]:
        """`[b]` the signed contribution of the attention sinks (0 where none was found)."""
        if self.sinks is None:
            return self.tokens.new_zeros(self.tokens.shape[0])
        return (self.tokens * self.sinks.to(device=self.tokens.device, dtype=self.tokens.dtype)).sum(-1)

    @property
    def content(self) -> Float[Tensor, " b"]:
        """`[b]` the signed contribution of every input token but the sinks: `tokens.sum(-1) − sink`."""
        return self.tokens.sum(-1) - self.sink

    def _real(self, batch: int) -> Tensor:
        """`[src]` True at the real (unpadded) input tokens of item `batch` (source first for encoder-decoders)."""
        mask = self.attention_mask[batch].bool().cpu()
        if self.n_source:
            source = self.extra.get("source_mask")
            src = torch.ones(self.n_source, dtype=torch.bool) if source is None else torch.as_tensor(source)[batch]
            mask = torch.cat([src.bool().cpu(), mask])
        if mask.numel() != self.tokens.shape[-1]:  # a result assembled by hand, without a matching mask
            mask = torch.ones(self.tokens.shape[-1], dtype=torch.bool)
        return mask.to(self.tokens.device)

    @property
    def n_layers(self) -> int:
        return self.head_totals.shape[1]

    @property
    def direct_total(self) -> Float[Tensor, " b"]:
        """embedding + heads + MLPs + bias: equals `logit` up to `completeness_gap`."""
        total = self.embedding + self.head_totals.sum((1, 2)) + self.mlp.sum(1) + self.bias
        if self.cross_head_totals is not None:
            total = total + self.cross_head_totals.sum((1, 2))
        return total

    def _label(self, batch: int, pos: int) -> str:
        if self.str_tokens is not None and pos < len(self.str_tokens[batch]):
            return self.str_tokens[batch][pos]
        if self.n_source:
            return f"src{pos}" if pos < self.n_source else f"tgt{pos - self.n_source}"
        return str(pos)

    def top_tokens(
        self, k: int = 5, *, batch: int = 0, include_sink: bool = False, signed: bool = True
    ) -> list[tuple[int, str, float]]:
        """The `k` input tokens that push the explained logit (difference) most: `(position, token, value)`.

        Ranked by value, largest first (the tokens supporting the target lead; with
        `signed=False` by |value|). Padding is never listed; the attention sinks (`sinks`) are
        left out unless `include_sink=True` (their total is `sink`).
        """
        batch = check_index("batch", batch, self.tokens.shape[0], what="batch items")
        k = check_size("k", k)
        check_type("include_sink", include_sink, bool, "True or False")
        check_type("signed", signed, bool, "True or False")
        row = self.tokens[batch]
        keep = self._real(batch)
        if not include_sink and self.sinks is not None:
            keep = keep & ~self.sinks[batch].to(keep.device)
        key = torch.where(keep, row if signed else row.abs(), float("-inf"))
        idx = key.topk(min(k, int(keep.sum()))).indices
        return [(int(i), self._label(batch, int(i)), float(row[i])) for i in idx]

    def top_heads(self, k: int = 10, *, batch: int | None = None) -> list[tuple[int, int, float]]:
        """Heads by direct logit attribution (summed over the batch unless `batch` is given):
        (layer, head, value), largest first."""
        totals = self.head_totals.sum(0) if batch is None else self.head_totals[batch]
        flat = totals.flatten()
        idx = flat.topk(min(k, flat.numel())).indices
        n_heads = totals.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in idx]

    def __repr__(self) -> str:
        b, n_layers, n_heads = self.head_totals.shape
        rel = self.completeness_gap.abs() / self.logit.abs().clamp(min=1e-30)
        soft = bool(self.extra.get("soft_contrast"))
        what = "logit difference" if self.contrast is not None or soft else "logit"
        return (
            f"LogitAttribution(batch={b}, layers={n_layers}, heads={n_heads}, src={self.tokens.shape[-1]}, "
            f"{what}={[round(float(v), 4) for v in self.logit[:4]]}{'...' if b > 4 else ''}, "
            f"max_relative_gap={float(rel.max()):.1e}, architecture={self.architecture!r}"
            f"{', softcap=' + str(self.softcap) if self.softcap else ''})"
        )
