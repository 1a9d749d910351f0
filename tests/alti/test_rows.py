"""`span_at`: a chunk's attention rows over the keys they reach only (docs/spec.md §12a)."""

from __future__ import annotations

import torch

from lens_alti.alti.rows import RowWise, span_at
from lens_alti.reading.records import AttentionBlock

N = 8


def _block(pattern: torch.Tensor) -> AttentionBlock:
    b, h, n, _ = pattern.shape
    g = torch.Generator().manual_seed(0)
    return AttentionBlock(
        name="blocks.0.attn", layer=0, pattern=pattern, values=torch.randn(b, n, h, 2, generator=g),
        W_O=torch.randn(h, 2, 3, generator=g), b_O=None, residual=torch.randn(b, n, 3, generator=g),
        target=torch.zeros(b, n, 3),
    )


def _window(n: int, w: int) -> torch.Tensor:
    """A causal sliding-window pattern `[1, 2, n, n]`: row i spreads over keys i − w + 1 .. i."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & (j > i - w)
    scores = torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(1))
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)


def test_a_window_gives_its_keys_only():
    pattern = _window(N, 3)
    rows, lo = span_at(_block(pattern), torch.tensor([[5, 6]]))
    assert lo == 3 and rows.shape == (1, 2, 2, 4)  # row 5 reads keys 3..5, row 6 keys 4..6
    torch.testing.assert_close(rows, pattern[:, :, 5:7, 3:7])


def test_the_span_is_widened_to_the_receivers_own_keys():
    pattern = torch.zeros(1, 2, N, N)
    pattern[..., 0] = 1.0  # every row attends to key 0 only
    rows, lo = span_at(_block(pattern), torch.tensor([[5, 6]]))
    assert lo == 0 and rows.shape[-1] == 7  # keys 0..6: the residual's column of receiver 6 is key 6
    torch.testing.assert_close(rows, pattern[:, :, 5:7, :7])
    rows, lo = span_at(_block(torch.zeros(1, 2, N, N)), torch.tensor([[5, 6]]))  # rows attending to nothing
    assert lo == 5 and rows.shape[-1] == 2 and not bool(rows.any())


def test_span_vectors_are_the_vectors_of_the_span():
    """The decomposition over the span is the full one restricted to the span's keys."""
    pattern = _window(N, 3)
    valid = torch.ones(1, N, dtype=torch.bool)
    wise = RowWise(_block(pattern), valid, valid, dtype=torch.float64, check=False)
    positions = torch.tensor([[4, 5, 6]])
    full, _ = wise.vectors(positions)
    span, _, lo = wise.span_vectors(positions)
    hi = lo + span.weights.shape[-1]
    assert (lo, hi) == (2, 7)
    torch.testing.assert_close(span.weights, full.weights[..., lo:hi])
    torch.testing.assert_close(span.vo, full.vo[:, :, lo:hi])
    torch.testing.assert_close(span.resultant, full.resultant)
    assert span.receivers.tolist() == [[2, 3, 4]]  # counted from lo
    assert not bool(full.weights[..., :lo].any()) and not bool(full.weights[..., hi:].any())
