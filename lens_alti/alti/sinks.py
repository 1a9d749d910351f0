"""Attention sinks (docs/spec.md §10): which positions are sinks, and the sink-as-bias rollout.

A sink is a position the model attends to when a head has nothing to read: a prepended special
token (BOS, `<|im_start|>`), or, without one, the position that takes the majority of the
attention in the majority of the heads. Its share of an explanation is reported apart from the
content's (`AltiResult.sinks`, `LogitAttribution.sink`); nothing is removed.

Model-agnostic: receives attention patterns `[b, h, q, k]` (the records' `pattern`) and the
reading layer's answer to "is the first real token a special token?".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_alti.alti.contributions import DEFAULT_CHUNK_BYTES, normalise_rows
from lens_alti.alti.rows import pattern_at
from lens_alti.alti.topdown import chunk_rows

if TYPE_CHECKING:  # the records are the interface; alti never imports reading at run time
    from lens_alti.reading.records import AttentionBlock

# A head "sinks into" position j when j takes more than this share of the attention of the
# receivers that can see it (a majority: more than all other keys together); j is a sink when
# more than this share of all heads sink into it (a majority of the heads).
SINK_SHARE = 0.5


class SinkMeter:
    """Counts, over the attention blocks it is shown, the heads that sink into each position.

    `valid[b, n]`: real tokens. `causal`: a receiver i sees keys j ≤ i (decoders); otherwise every
    real key (encoders). For each head and real key j, the mean attention that the real receivers
    i ≠ j that can see j give to j is compared with `SINK_SHARE`.
    """

    def __init__(self, valid: Bool[Tensor, "b n"], causal: bool) -> None:
        self.valid, self.causal = valid, causal
        real = valid.long()
        if causal:  # the real receivers after j: the real tokens from j + 1 on
            self.count = real.flip(-1).cumsum(-1).flip(-1) - real
        else:  # every other real token
            self.count = real.sum(-1, keepdim=True) - real
        self.count = self.count * real  # [b, key]; padded keys have no receivers
        self.votes = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        self.heads = 0

    def _receivers(self, start: int, stop: int) -> Bool[Tensor, "b r n"]:
        """Which real receivers `start .. stop` can see each real key (never the whole `[n, n]` at once)."""
        n = self.valid.shape[1]
        i = torch.arange(start, stop, device=self.valid.device)
        j = torch.arange(n, device=self.valid.device)
        sees = i[:, None] > j[None, :] if self.causal else i[:, None] != j[None, :]
        return self.valid[:, start:stop, None] & self.valid[:, None, :] & sees

    def add(self, pattern: Float[Tensor, "b h q k"]) -> None:
        """One attention block's probabilities (query rows for every position)."""
        b, heads, n, keys = pattern.shape
        sums = torch.zeros(b, heads, keys, device=pattern.device)
        step = chunk_rows(b, heads, keys)
        for i0 in range(0, n, step):
            sums += self._column_sums(pattern[:, :, i0 : i0 + step], i0)
        self._vote(sums, heads)

    def add_block(self, block: AttentionBlock, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        """One block's attention, its rows sliced from a dense pattern or recomputed in chunks of receivers
        (`AttentionBlock.pattern_rows`; the `[head, n, n]` pattern is never formed). Blocks without
        an attention distribution (recurrent mixers, output-gated or per-channel mixing) are skipped."""
        if block.recurrent or block.output_gated or block.channels_per_head != 1:
            return
        if block.pattern_rows is None:
            self.add(block.pattern)
            return
        b, n = self.valid.shape
        heads = block.values.shape[2]
        step = chunk_rows(b, heads, n, max_chunk_bytes)
        sums = torch.zeros(b, heads, n, device=block.residual.device)
        for i0 in range(0, n, step):
            rows = torch.arange(i0, min(n, i0 + step), device=block.residual.device).expand(b, -1)
            part = pattern_at(block, rows)  # [b, h, r, k]
            if block.padding_unmasked:  # recomputed without the padding mask: renormalised (docs/spec.md §1h)
                part = normalise_rows(part * self.valid[:, None, None, :].to(part))
            sums += self._column_sums(part, i0).to(sums.device)
        self._vote(sums, heads)

    def _column_sums(self, rows: Float[Tensor, "b h r k"], start: int) -> Float[Tensor, "b h k"]:
        """Per head and key, the attention the real receivers `start .. start + r` that can see the key give it."""
        recv = self._receivers(start, start + rows.shape[2]).to(rows.device)
        return torch.where(recv[:, None], rows.float(), 0.0).sum(2)  # a select: padding may hold NaN

    def _vote(self, sums: Float[Tensor, "b h k"], heads: int) -> None:
        count = self.count.to(sums.device)
        mean = sums / count[:, None].clamp(min=1)  # [b, h, key]
        sinks_here = (mean > SINK_SHARE) & (count > 0)[:, None]
        self.votes += sinks_here.sum(1).to(self.votes.device)
        self.heads += heads

    def measured(self) -> Bool[Tensor, "b n"]:
        """Positions into which more than `SINK_SHARE` of the heads seen sink (none before any block)."""
        if self.heads == 0:
            return torch.zeros_like(self.votes, dtype=torch.bool)
        return self.votes > SINK_SHARE * self.heads


def sink_positions(
    valid: Bool[Tensor, "b n"], first_special: Bool[Tensor, " b"] | None, measured: Bool[Tensor, "b n"] | None
) -> Bool[Tensor, "b n"]:
    """The sinks of each item (docs/spec.md §10): the first real token when it is a special token
    (`first_special[b]`), else the positions `measured` by attention (`SinkMeter.measured`)."""
    out = torch.zeros_like(valid, dtype=torch.bool)
    if measured is not None:
        out |= measured.to(valid.device) & valid
    if first_special is not None:
        special = first_special.to(valid.device)
        first = valid.long().argmax(-1)  # the first real token (left or right padding)
        rows = torch.arange(valid.shape[0], device=valid.device)
        with_special = torch.zeros_like(out)
        with_special[rows, first] = True
        out = torch.where(special[:, None], with_special & valid, out)
    return out


def sink_bias_layers(
    layers: Float[Tensor, "b l q k"], sinks: Bool[Tensor, "b k"]
) -> Float[Tensor, "b l q k"]:
    """The layer-wise contributions with the sinks treated like a bias (docs/spec.md §10c).

    At every receiver that is not itself a sink, the sinks' column is set to 0 and the row is
    renormalised over the other sources (as ALTI normalises over sources, never over a bias);
    a sink's own row is kept. Rolled out (`alti.rollout.rollout`), content positions then carry
    no share of a sink.
    """
    s = sinks.to(device=layers.device)
    drop = (~s)[:, None, :, None] & s[:, None, None, :]  # [b, 1, receiver, source]
    return normalise_rows(torch.where(drop, torch.zeros_like(layers), layers))
