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
    # the direct effect (docs/spec.md §11) by hand: the head's output change at the last position through
    # W_O, read through the final norm frozen at its clean scale
    _, clean_run = model.run_with_cache(clean)
    dz = (cache["blocks.1.attn.hook_z"] - clean_run["blocks.1.attn.hook_z"])[:, -1, 2]
    delta = (dz @ model.blocks[1].attn.W_O[2]).double()
    x = clean_run["blocks.1.hook_resid_post"][:, -1].double()
    norm = model.ln_final
    if arch == "gpt2":
        scale = ((x - x.mean(-1, keepdim=True)).square().mean(-1, keepdim=True) + norm.eps).sqrt()
        read = (delta - delta.mean(-1, keepdim=True)) / scale * norm.w.double()
    else:
        read = delta / (x.square().mean(-1, keepdim=True) + norm.eps).sqrt() * norm.w.double()
    logits = model(clean).detach().double()
    logits[:, -1] += read @ model.W_U.double()
    direct = metric(model(clean)).double() - metric(logits)
    torch.testing.assert_close(table.per_prompt_direct[1, 2], direct, atol=1e-5, rtol=1e-4)
    _, clean_cache = model.run_with_cache(clean)
    scores = compare.attention_head_scores(clean_cache)
    pattern = clean_cache["blocks.0.attn.hook_pattern"]
    assert float(scores["attention off the first token"][0, 1]) == pytest.approx(
        float((1 - pattern[:, 1, -1, 0]).mean()), abs=1e-6
    )
