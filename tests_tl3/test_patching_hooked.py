"""Activation patching and the attention baselines on a TransformerLens 3.x HookedTransformer."""

from __future__ import annotations

import pytest
import torch

from lens_alti.analysis import ablation, compare, patching
from tests_tl3.models import from_config


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patching_one_head_matches_a_hand_written_hook(arch):
    model = from_config(arch, seed=2)
    clean = torch.randint(4, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[:, 1] = torch.tensor([17, 23])
    metric = ablation.logit_diff([5, 6], [8, 9])
    table = patching.head_patching(model, clean, corrupt, metric, chunk=3)
    _, cache = model.run_with_cache(corrupt)

    def hook(z, hook):
        z = z.clone()
        z[:, :, 2] = cache["blocks.1.attn.hook_z"][:, :, 2]
        return z

    patched = model.run_with_hooks(clean, fwd_hooks=[("blocks.1.attn.hook_z", hook)])
    expected = metric(model(clean)) - metric(patched)
    torch.testing.assert_close(table.per_prompt[1, 2].float(), expected.float(), atol=1e-5, rtol=1e-5)
    _, clean_cache = model.run_with_cache(clean)
    scores = compare.attention_head_scores(clean_cache)
    pattern = clean_cache["blocks.0.attn.hook_pattern"]
    assert float(scores["attention off the first token"][0, 1]) == pytest.approx(
        float((1 - pattern[:, 1, -1, 0]).mean()), abs=1e-6
    )
