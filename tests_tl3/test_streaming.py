"""Streaming `attribute(model, tokens=...)` on TransformerLens 3.x models equals the cache path."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from tests_tl3.models import from_config

TOL = 1e-6


def _close(a, b, fields):
    for name in fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "attn_only", "bert"])
@pytest.mark.parametrize("padded", [False, True])
def test_stream_equals_cache(arch, padded):
    model = from_config(arch)
    ids = torch.randint(4, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    run_kw = {}
    if padded:
        run_kw = {"one_zero_attention_mask": mask} if arch == "bert" else {"attention_mask": mask}
    _, cache = model.run_with_cache(ids, **run_kw)
    kw = {"attention_mask": mask} if padded else {}
    ref = lens_alti.attribute(cache, heads=True, **kw)
    got = lens_alti.attribute(model, tokens=ids, heads=True, **kw)
    _close(ref, got, ("layers", "rollout", "heads", "heads_residual", "head_outputs"))
    pos = lens_alti.attribute(model, tokens=ids, heads=True, positions=[-1], **kw)
    for b in range(2):
        q = int(pos.positions[b, 0])
        torch.testing.assert_close(pos.heads[b, :, :, 0], ref.heads[b, :, :, q], atol=TOL, rtol=0)
        torch.testing.assert_close(pos.rollout[b, :, 0], ref.rollout[b, :, q], atol=TOL, rtol=0)


def test_t5_stream_equals_cache():
    model = from_config("t5")
    src = torch.randint(4, 500, (2, 6), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(4, 500, (2, 4), generator=torch.Generator().manual_seed(4))
    _, cache = model.run_with_cache(src, decoder_input=tgt)
    ref = lens_alti.attribute(cache, heads=True)
    got = lens_alti.attribute(model, tokens=src, decoder_tokens=tgt, heads=True)
    _close(ref, got, ("decoder_self", "cross", "total", "cross_heads", "decoder_self_heads"))
    _close(ref.encoder, got.encoder, ("layers", "rollout"))
    with pytest.raises(ValueError, match="no decoder mask"):
        lens_alti.attribute(
            model, tokens=src, decoder_tokens=tgt, decoder_attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        )
