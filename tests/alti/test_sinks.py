"""Attention sinks (docs/spec.md §10): the measured rule and the sink-as-bias layers against hand computations."""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_alti.alti.rollout import rollout
from lens_alti.alti.sinks import SinkMeter, sink_bias_layers, sink_positions
from lens_alti.reading.records import AttentionBlock, pattern_placeholder


def _hand_votes(patterns: list[torch.Tensor], valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Per item and key, how many heads give it > 1/2 of their later receivers' attention, by loops."""
    b, n = valid.shape
    votes = torch.zeros(b, n, dtype=torch.long)
    for pattern in patterns:
        for item in range(b):
            for h in range(pattern.shape[1]):
                for j in range(n):
                    if not valid[item, j]:
                        continue
                    seen = [i for i in range(n) if valid[item, i] and (i > j if causal else i != j)]
                    if seen and sum(float(pattern[item, h, i, j]) for i in seen) / len(seen) > 0.5:
                        votes[item, j] += 1
    return votes


def _causal_patterns(b: int, h: int, n: int, seed: int, sink_logit: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, n, n, generator=g)
    scores[..., 0] += sink_logit
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


def test_meter_counts_the_heads_by_hand():
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    layers = [_causal_patterns(2, 3, 6, seed, sink_logit=2.0 * seed) for seed in range(3)]
    for layer in layers:
        layer[1, :, :, :2] = 0  # padded keys get no attention
        layer[1] = torch.where(valid[1][:, None], layer[1] / layer[1].sum(-1, keepdim=True).clamp(min=1e-9), 0.0)
        layer[1, :, :2] = float("nan")  # padded receivers may hold anything
    meter = SinkMeter(valid, causal=True)
    for layer in layers:
        meter.add(layer)
    votes = _hand_votes([torch.nan_to_num(x) for x in layers], valid, causal=True)
    assert torch.equal(meter.votes, votes)
    assert meter.heads == 9
    assert torch.equal(meter.measured(), votes > 4.5)


class _Rows:
    """A record's recomputed attention rows (`AttentionBlock.pattern_rows`), served from a dense pattern,
    counting the rows asked for at once."""

    def __init__(self, pattern: torch.Tensor) -> None:
        self.pattern, self.asked = pattern, []
        self.dtype, self.device = pattern.dtype, pattern.device

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        self.asked.append(positions.shape[1])
        return self.pattern.gather(2, positions[:, None, :, None].expand(-1, self.pattern.shape[1], -1,
                                                                          self.pattern.shape[3]))


def _record(pattern: torch.Tensor, rows: _Rows | None, padding_unmasked: bool = False) -> AttentionBlock:
    b, h, n, _ = pattern.shape
    return AttentionBlock(
        name="blocks.0.attn", layer=0, pattern=pattern_placeholder(pattern.shape, pattern.dtype, pattern.device)
        if rows is not None else pattern, values=torch.zeros(b, n, h, 2), W_O=torch.zeros(h, 2, 3), b_O=None,
        residual=torch.zeros(b, n, 3), target=torch.zeros(b, n, 3), pattern_rows=rows,
        padding_unmasked=padding_unmasked,
    )


def test_recomputed_rows_are_read_in_chunks_and_counted_alike():
    """`add_block` on rows recomputed in chunks of receivers gives the votes of the whole pattern."""
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    keep = valid[:, None, :, None] & valid[:, None, None, :]
    layers = [torch.where(keep, _causal_patterns(2, 4, 9, seed, sink_logit=1.5 * seed), 0.0) for seed in range(4)]
    layers = [x / x.sum(-1, keepdim=True).clamp(min=1e-9) for x in layers]
    whole, chunked = SinkMeter(valid, causal=True), SinkMeter(valid, causal=True)
    for layer in layers:
        whole.add(layer)
        rows = _Rows(layer)
        chunked.add_block(_record(layer, rows), max_chunk_bytes=4 * 4 * 2 * 4 * 9 * 2)  # two receivers a chunk
        assert max(rows.asked) == 2 and sum(rows.asked) == 9
    assert torch.equal(chunked.votes, whole.votes)
    assert torch.equal(whole.votes, _hand_votes(layers, valid, causal=True))
    assert whole.measured().any()  # the test can fail: some position is a sink


def test_rows_recomputed_without_the_padding_mask_are_renormalised():
    """Rows that still give padding a share (`padding_unmasked`) count over the real keys (docs/spec.md §1h)."""
    valid = torch.tensor([[False, True, True, True, True]])
    layer = _causal_patterns(1, 2, 5, 0, sink_logit=0.0)  # attends to the padded key 0 as well
    real = layer * valid[:, None, None, :]
    real = real / real.sum(-1, keepdim=True).clamp(min=1e-9)
    want, got = SinkMeter(valid, causal=True), SinkMeter(valid, causal=True)
    want.add(real)
    got.add_block(_record(layer, _Rows(layer), padding_unmasked=True))
    assert torch.equal(got.votes, want.votes)


def test_mixers_without_attention_are_skipped():
    valid = torch.ones(1, 4, dtype=torch.bool)
    meter = SinkMeter(valid, causal=True)
    pattern = _causal_patterns(1, 2, 4, 0, sink_logit=9.0)
    meter.add_block(replace(_record(pattern, None), recurrent=True))
    assert meter.heads == 0 and not meter.measured().any()
    meter.add_block(_record(pattern, None))
    assert meter.heads == 2 and meter.measured()[0, 0]


def test_meter_bidirectional_counts_every_other_receiver():
    valid = torch.ones(1, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    pattern = (torch.randn(1, 4, 5, 5, generator=g) + torch.tensor([0, 0, 0, 0, 3.0])).softmax(-1)
    meter = SinkMeter(valid, causal=False)
    meter.add(pattern)
    assert torch.equal(meter.votes, _hand_votes([pattern], valid, causal=False))


def test_last_position_is_never_measured_a_sink():
    valid = torch.ones(1, 3, dtype=torch.bool)
    pattern = torch.zeros(1, 1, 3, 3)
    pattern[0, 0, :, :] = torch.eye(3)  # every receiver attends to itself only
    meter = SinkMeter(valid, causal=True)
    meter.add(pattern)
    assert not meter.measured().any()


def test_special_first_token_decides_else_measured():
    valid = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    measured = torch.tensor([[False, False, True, False], [False, True, False, False]])
    out = sink_positions(valid, torch.tensor([True, False]), measured)
    assert out.tolist() == [[False, True, False, False], [False, True, False, False]]
    assert sink_positions(valid, None, None).sum() == 0
    padded_claim = torch.tensor([[True, False, False, False], [False, False, False, False]])
    assert sink_positions(valid, None, padded_claim).sum() == 0  # padding is never a sink


def test_sink_bias_layers_by_hand():
    g = torch.Generator().manual_seed(0)
    layers = torch.rand(1, 2, 4, 4, generator=g).tril()
    layers = layers / layers.sum(-1, keepdim=True)
    sinks = torch.tensor([[True, False, False, False]])
    out = sink_bias_layers(layers, sinks)
    for layer in range(2):
        assert torch.equal(out[0, layer, 0], layers[0, layer, 0])  # the sink's own row is kept
        for i in range(1, 4):
            row = layers[0, layer, i].clone()
            row[0] = 0
            torch.testing.assert_close(out[0, layer, i], row / row.sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 7), seed=st.integers(0, 10_000), first=st.booleans())
def test_sink_bias_rollout_is_stochastic_and_leaves_the_sink_alone(n, seed, first):
    g = torch.Generator().manual_seed(seed)
    layers = torch.rand(1, 3, n, n, generator=g, dtype=torch.float64).tril()
    layers = layers / layers.sum(-1, keepdim=True)
    sinks = torch.zeros(1, n, dtype=torch.bool)
    sinks[0, 0 if first else n // 2] = True
    rolled = rollout(sink_bias_layers(layers, sinks))
    torch.testing.assert_close(rolled.sum(-1), torch.ones(1, 3, n, dtype=torch.float64))
    assert (rolled >= 0).all()
    if first:  # a first-position sink reaches no other position
        assert (rolled[0, :, 1:, 0] == 0).all()
