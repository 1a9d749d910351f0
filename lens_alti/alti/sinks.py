"""Attention sinks (docs/spec.md §10): which positions are sinks, and the sink-as-bias rollout.

A sink is a position the model attends to when a head has nothing to read: a prepended special
token (BOS, `<|im_start|>`), or, without one, the position that takes the majority of the
attention in the majority of the heads. Its share of an explanation is reported apart from the
content's (`AltiResult.sinks`, `LogitAttribution.sink`); nothing is removed.

Model-agnostic: receives attention patterns `[b, h, q, k]` (the records' `pattern`) and the
reading layer's answer to "is the first real token a special token?".
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_alti.alti.contributions import normalise_rows

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
        n = valid.shape[1]
        pair = valid[:, :, None] & valid[:, None, :]  # [b, receiver, key]
        i = torch.arange(n, device=valid.device)
        sees = i[:, None] > i[None, :] if causal else i[:, None] != i[None, :]
        self.receivers = pair & sees
        self.count = self.receivers.sum(1)  # [b, key]
        self.votes = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        self.heads = 0

    def add(self, pattern: Float[Tensor, "b h q k"]) -> None:
        """One attention block's probabilities (query rows for every position)."""
        recv = self.receivers.to(pattern.device)
        p = torch.where(recv[:, None], pattern.float(), 0.0)  # a select: padding may hold NaN
        mean = p.sum(2) / self.count.to(pattern.device)[:, None].clamp(min=1)  # [b, h, key]
        sinks_here = (mean > SINK_SHARE) & (self.count.to(pattern.device) > 0)[:, None]
        self.votes += sinks_here.sum(1).to(self.votes.device)
        self.heads += pattern.shape[1]

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
