"""ALTI-Logit and routes on TransformerLens 3.x HookedTransformer caches."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from tests.support.reference_logit import reference_logit_decoder
from tests_tl3.models import from_config, from_hf, hf_model


def _ids(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "attn_only"])
def test_hooked_completeness(arch):
    model = from_config(arch)
    tokens = _ids(2, 7, 1)
    logits, cache = model.run_with_cache(tokens)
    res = lens_alti.logit_attribution(cache, [5, 6], [7, 8])
    logits = logits.detach()
    real = logits[torch.arange(2), -1, [5, 6]] - logits[torch.arange(2), -1, [7, 8]]
    torch.testing.assert_close(res.logit, real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.direct_total, res.logit, atol=1e-4 * float(real.abs().max()), rtol=0)
    graph = lens_alti.routes(cache, threshold=0.02)
    assert graph.head_importance.shape == (2, 4)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_hooked_matches_reference(arch):
    hf = hf_model(arch)
    model = from_hf(hf)
    tokens = _ids(2, 7, 2)
    _, cache = model.run_with_cache(tokens)
    res = lens_alti.logit_attribution(cache, [5, 6], [7, 8])
    ref = reference_logit_decoder(hf, tokens, [5, 6], [7, 8], [6, 6])
    for name in ("heads", "mlp", "embedding", "logit", "tokens"):
        want = ref[name]
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(getattr(res, name).double(), want, atol=1e-5 * scale, rtol=0)
