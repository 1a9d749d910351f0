"""lens_alti.alti.masking on synthetic attention patterns (model-agnostic)."""

from __future__ import annotations

import pytest
import torch

from lens_alti.alti.masking import check_declared_padding, isolate_padding, leaked_attention, undeclared_padding
from lens_alti.errors import MaskMismatchError
from lens_alti.reading.records import AttentionBlock, NormAfterAttention


def causal_pattern(real: list[int], q: int = 5, heads: int = 2, fully_masked: str = "uniform") -> torch.Tensor:
    """Softmax weights of a causal block run with padding: real rows spread over earlier real keys;
    a row with no visible real key is uniform over all keys (as eager attention with a finite mask value)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(heads, q, q, generator=g)
    allowed = torch.ones(q, q, dtype=torch.bool).tril() & torch.tensor([j in real for j in range(q)])[None, :]
    p = torch.where(allowed, scores, float("-inf")).softmax(-1)
    empty = ~allowed.any(-1)
    p[:, empty] = 1.0 / q
    return p[None]


def test_left_and_right_padding_are_found():
    left = causal_pattern([2, 3, 4])
    flags = undeclared_padding(left, torch.ones(1, 5, dtype=torch.bool), causal=True)
    assert flags.tolist() == [[True, True, False, False, False]]
    right = causal_pattern([0, 1, 2])
    flags = undeclared_padding(right, torch.ones(1, 5, dtype=torch.bool), causal=True)
    assert flags.tolist() == [[False, False, False, True, True]]
    declared = torch.tensor([[False, False, True, True, True]])
    assert not undeclared_padding(left, declared, causal=True).any()


def test_unpadded_blocks_are_never_flagged():
    p = causal_pattern([0, 1, 2, 3, 4])
    p[:, 0, 3, 3] = 0.0  # one head ignoring itself is not padding
    p[:, 0, 3, :3] /= p[:, 0, 3, :3].sum()
    assert not undeclared_padding(p, torch.ones(1, 5, dtype=torch.bool), causal=True).any()
    full = torch.rand(1, 2, 4, 4).softmax(-1)  # bidirectional
    assert not undeclared_padding(full, torch.ones(1, 4, dtype=torch.bool), causal=False).any()


def test_bidirectional_padding():
    p = torch.rand(1, 2, 4, 4)
    p[..., 3] = 0  # no query attends to the padded key 3
    p = p / p.sum(-1, keepdim=True)
    flags = undeclared_padding(p, torch.ones(1, 4, dtype=torch.bool), causal=False)
    assert flags.tolist() == [[False, False, False, True]]


def _block(pattern: torch.Tensor, nan_at: int) -> AttentionBlock:
    b, h, q, _ = pattern.shape
    values = torch.randn(b, q, h, 3)
    residual, target = torch.randn(b, q, 4), torch.randn(b, q, 4)
    values[:, nan_at], residual[:, nan_at], target[:, nan_at] = float("nan"), float("nan"), float("inf")
    scale = torch.rand(b, q) + 0.5
    scale[:, nan_at] = 0.0
    norm = NormAfterAttention("layernorm", "block", torch.ones(4), None, scale)
    return AttentionBlock("blk", 0, pattern, values, torch.randn(h, 3, 4), None, residual, target, norm=norm)


def test_isolate_padding_removes_nan_at_padded_positions():
    block = _block(causal_pattern([1, 2, 3, 4]), nan_at=0)
    valid = torch.tensor([[False, True, True, True, True]])
    out = isolate_padding(block, valid, valid)
    for t in (out.pattern, out.values, out.residual, out.target, out.norm.scale):
        assert torch.isfinite(t).all()
    assert (out.pattern[:, :, 0] == 0).all() and (out.pattern[..., 0] == 0).all() and out.norm.scale[0, 0] == 1
    torch.testing.assert_close(out.values[:, 1:], block.values[:, 1:])
    assert isolate_padding(block, torch.ones_like(valid), torch.ones_like(valid)) is block


def test_check_declared_padding_and_leaks():
    block = _block(causal_pattern([2, 3, 4]), nan_at=0)
    with pytest.raises(MaskMismatchError, match="0-1 of batch item 0 .* attention_mask marks them as real"):
        check_declared_padding(block, torch.ones(1, 5, dtype=torch.bool), causal=True, mask_name="attention_mask")
    declared = torch.tensor([[False, False, True, True, True]])
    check_declared_padding(block, declared, causal=True, mask_name="attention_mask")
    assert leaked_attention(block.pattern, declared, declared) == 0.0
    wrong = torch.tensor([[False, False, False, True, True]])
    assert leaked_attention(block.pattern, wrong, wrong) > 0.1
