"""Attention sinks reported apart (docs/spec.md §10): `attribute` and `logit_attribution` on tiny decoders."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError
from tests.support.errors import raises_exactly
from tests.support.models import build_bridge


@pytest.fixture(scope="module")
def llama():
    return build_bridge("llama")[1]


def _padded(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two inputs that start with the tokenizer's BOS (id 1, a special token), the first left-padded."""
    rows = [torch.tensor([1, 5, 6, 7]), torch.tensor([1, 8, 9, 10, 11, 12])]
    ids = torch.full((2, 6), 3, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 6 - len(r):], mask[i, 6 - len(r):] = r, 1
    return ids, mask


def _hand_sinks(cache, n_layers: int, valid: torch.Tensor) -> torch.Tensor:
    """docs/spec.md §10a rule 2 in loops over the cache's own patterns (decoder: receivers i > j)."""
    b, n = valid.shape
    votes, heads = torch.zeros(b, n), 0
    for layer in range(n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        heads += pattern.shape[1]
        for item in range(b):
            for h in range(pattern.shape[1]):
                for j in range(n):
                    seen = [i for i in range(j + 1, n) if valid[item, i]]
                    if valid[item, j] and seen and sum(float(pattern[item, h, i, j]) for i in seen) / len(seen) > 0.5:
                        votes[item, j] += 1
    return votes > heads / 2


def test_prepended_special_token_is_the_sink(llama):
    ids, mask = _padded(llama)
    _, cache = llama.run_with_cache(ids, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask, tokens=ids)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[0, 2] = expected[1, 0] = True  # the first real token, t1 (BOS)
    assert torch.equal(res.sinks, expected)
    torch.testing.assert_close(res.sink_share[0], res.rollout[0, -1, :, 2])
    torch.testing.assert_close(res.sink_share[1], res.rollout[1, -1, :, 0])
    listed = [p for p, _, _ in res.top_sources(-1, k=6, batch=0)]
    assert 2 not in listed and sorted(listed) == [3, 4, 5]
    with_sink = res.top_sources(-1, k=6, batch=0, include_sink=True)
    assert sorted(p for p, _, _ in with_sink) == [2, 3, 4, 5]
    streamed = lens_alti.attribute(llama, tokens=ids, attention_mask=mask)
    assert torch.equal(streamed.sinks, expected)


def test_without_a_special_token_the_measured_rule_decides(llama):
    ids = torch.randint(4, 1000, (2, 7), generator=torch.Generator().manual_seed(5))
    _, cache = llama.run_with_cache(ids)
    valid = torch.ones(2, 7, dtype=torch.bool)
    want = _hand_sinks(cache, llama.cfg.n_layers, valid)
    assert torch.equal(lens_alti.attribute(cache).sinks, want)
    assert torch.equal(lens_alti.logit_attribution(cache, 5).sinks, want)


def test_logit_sink_is_reported_apart(llama):
    ids, mask = _padded(llama)
    _, cache = llama.run_with_cache(ids, attention_mask=mask)
    attr = lens_alti.logit_attribution(cache, [5, 6], [7, 8], attention_mask=mask, tokens=ids)
    torch.testing.assert_close(attr.sink, torch.stack([attr.tokens[0, 2], attr.tokens[1, 0]]))
    torch.testing.assert_close(attr.content + attr.sink, attr.tokens.sum(-1))
    top = attr.top_tokens(10, batch=0)
    assert sorted(p for p, _, _ in top) == [3, 4, 5]  # neither the sink nor the padding
    values = [v for _, _, v in top]
    assert values == sorted(values, reverse=True)  # the target's supporters first
    assert [p for p, _, _ in attr.top_tokens(10, batch=0, include_sink=True)].count(2) == 1
    by_size = [abs(v) for _, _, v in attr.top_tokens(10, batch=1, signed=False)]
    assert by_size == sorted(by_size, reverse=True)
    assert attr.top_tokens(1, batch=1)[0][1] in {"t8", "t9", "t10", "t11", "t12"}


def test_top_tokens_and_top_sources_refuse_bad_arguments(llama):
    ids, mask = _padded(llama)
    _, cache = llama.run_with_cache(ids, attention_mask=mask)
    attr = lens_alti.logit_attribution(cache, 5, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask)
    raises_exactly(ArgumentTypeError, "include_sink", attr.top_tokens, 3, include_sink="no")
    raises_exactly(ArgumentTypeError, "signed", attr.top_tokens, 3, signed=None)
    raises_exactly(OutOfRangeError, "batch", attr.top_tokens, 3, batch=2)
    raises_exactly(InvalidArgumentError, "k", attr.top_tokens, 0)
    raises_exactly(ArgumentTypeError, "include_sink", res.top_sources, -1, include_sink=1)
