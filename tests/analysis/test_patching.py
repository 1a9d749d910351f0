"""Activation patching of head outputs and the IOI ABC corruption, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from lens_alti.analysis import ablation, patching
from lens_alti.analysis.ioi import IOIPrompt, abc_corruption, ioi_prompts, name_positions
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError
from tests.support.errors import raises_exactly
from tests.support.models import build_bridge

GEN = torch.Generator().manual_seed(5)
CLEAN = torch.randint(4, 1000, (3, 7), generator=GEN)
CORRUPT = CLEAN.clone()
CORRUPT[:, 2] = torch.randint(4, 1000, (3,), generator=GEN)  # one position changed, as a name swap would


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return build_bridge(request.param, seed=3)[1]


def _patched_by_hand(model, layer: int, head: int, clean, corrupt, mask=None):
    kw = {} if mask is None else {"attention_mask": mask}
    _, cache = model.run_with_cache(corrupt, **kw)
    z_bad = cache[f"blocks.{layer}.attn.hook_z"]

    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = z_bad[:, :, head]
        return z

    return model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)], **kw)


def test_patching_one_head_matches_a_hand_written_hook(model):
    metric = ablation.logit_diff([5, 6, 7], [8, 9, 10])
    table = patching.head_patching(model, CLEAN, CORRUPT, metric)
    assert table.per_prompt.shape == (2, 4, 3) and len(table.table) == 8
    clean = metric(model(CLEAN))
    for layer, head in [(0, 1), (1, 3)]:
        expected = clean - metric(_patched_by_hand(model, layer, head, CLEAN, CORRUPT))
        torch.testing.assert_close(table.per_prompt[layer, head].float(), expected.float(), atol=1e-5, rtol=1e-5)
        row = table.table[(table.table.layer == layer) & (table.table["head"] == head)].iloc[0]
        assert row.effect == pytest.approx(float(expected.mean()), abs=1e-5)
        assert row.abs_effect == pytest.approx(float(expected.abs().mean()), abs=1e-5)
    assert table.clean_metric == pytest.approx(float(clean.mean()), abs=1e-5)
    assert table.corrupted_metric == pytest.approx(float(metric(model(CORRUPT)).mean()), abs=1e-5)
    gap = table.clean_metric - table.corrupted_metric
    assert table.table.normalised.iloc[5] == pytest.approx(table.table.effect.iloc[5] / gap, rel=1e-6)
    assert table.effects("effect")[1, 1] == pytest.approx(table.table.effect.iloc[5])
    assert table.top(3).abs_effect.is_monotonic_decreasing


def test_chunks_and_padding_give_the_same_effects(model):
    metric = ablation.logprob([11, 12, 13])
    mask = torch.ones_like(CLEAN)
    mask[0, :2] = 0  # left padding of the first prompt
    whole = patching.head_patching(model, CLEAN, CORRUPT, metric, attention_mask=mask, corrupted_mask=mask)
    chunked = patching.head_patching(model, CLEAN, CORRUPT, metric, attention_mask=mask, chunk=3, progress=True)
    torch.testing.assert_close(whole.per_prompt, chunked.per_prompt, atol=1e-5, rtol=1e-5)
    one = patching.head_patching(model, CLEAN, CORRUPT, metric, attention_mask=mask, layers=[1])
    torch.testing.assert_close(one.per_prompt[1], whole.per_prompt[1], atol=1e-5, rtol=1e-5)
    assert one.per_prompt[0].isnan().all(), "layers not patched are NaN, never a silent 0"
    expected = metric(model(CLEAN, attention_mask=mask)) - metric(_patched_by_hand(model, 0, 2, CLEAN, CORRUPT, mask))
    torch.testing.assert_close(whole.per_prompt[0, 2].float(), expected.float(), atol=1e-5, rtol=1e-5)


def test_patching_identical_prompts_changes_nothing(model):
    table = patching.head_patching(model, CLEAN, CLEAN.clone(), ablation.logprob([5, 6, 7]))
    assert float(table.per_prompt.abs().max()) < 1e-5
    assert table.table.normalised.isna().all(), "no clean-corrupted gap: the normalised effect is undefined"


def test_patching_errors(model):
    metric = ablation.logprob([5, 6, 7])
    hp = patching.head_patching
    assert "same length" in str(raises_exactly(InvalidArgumentError, "corrupted_tokens=", hp, model, CLEAN,
                                               CORRUPT[:, :5], metric))
    raises_exactly(InvalidArgumentError, "tokens=", hp, model, CLEAN[0], CORRUPT[0], metric)
    bad = torch.ones_like(CLEAN)
    bad[1, 0] = 0
    raises_exactly(InvalidArgumentError, "corrupted_mask=", hp, model, CLEAN, CORRUPT, metric, corrupted_mask=bad)
    raises_exactly(InvalidArgumentError, "attention_mask", hp, model, CLEAN, CORRUPT, metric,
                   attention_mask=torch.ones(3, 5))
    raises_exactly(OutOfRangeError, "layers[0]=2", hp, model, CLEAN, CORRUPT, metric, layers=[2])
    raises_exactly(InvalidArgumentError, "chunk=0", hp, model, CLEAN, CORRUPT, metric, chunk=0)
    raises_exactly(ArgumentTypeError, "model=", hp, object(), CLEAN, CORRUPT, metric)


def test_abc_corruption_replaces_the_three_names():
    prompts = ioi_prompts(6, seed=1)
    corrupted = abc_corruption(prompts, seed=2)
    assert corrupted == abc_corruption(prompts, seed=2), "deterministic for a seed"
    for p, text in zip(prompts, corrupted, strict=True):
        a, b = p.correct.strip(), p.wrong.strip()
        words, new = p.text.replace(",", "").split(), text.replace(",", "").split()
        assert len(words) == len(new)
        changed = [(x, y) for x, y in zip(words, new, strict=True) if x != y]
        assert [x for x, _ in changed] == [a, b, b], "exactly the IO name and both subject mentions change"
        replacements = [y for _, y in changed]
        assert len(set(replacements)) == 3 and not {a, b} & set(replacements)
    with pytest.raises(InvalidArgumentError, match="found 2 and 1"):
        abc_corruption([IOIPrompt("When Mary and John left, Mary gave a book to", " Mary", " John")])


def test_name_positions():
    p = IOIPrompt("When Mary and John went, John gave it to", " Mary", " John")
    toks = ["<s>", "When", " Mary", " and", " John", " went", ",", " John", " gave", " it", " to"]
    assert name_positions(toks, p) == {"IO": 2, "S1": 4, "S2": 7}
    with pytest.raises(InvalidArgumentError, match="single token"):
        name_positions(["<s>", " Ma", "ry"], p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_direct_effect_matches_a_hand_computation_on_the_hf_model(arch):
    """docs/spec.md §11 computed on the Hugging Face model itself: the head's output change at N through
    W_O, added to the clean final residual, read through the final norm at its clean scale."""
    hf, bridge = build_bridge(arch, seed=3)
    metric = ablation.logit_diff([5, 6, 7], [8, 9, 10])
    table = patching.head_patching(bridge, CLEAN, CORRUPT, metric)
    inner = hf.model if arch == "llama" else hf.transformer
    blocks = inner.layers if arch == "llama" else inner.h
    final = inner.norm if arch == "llama" else inner.ln_f
    n_heads = 4
    for layer, head in [(0, 2), (1, 1)]:
        proj = blocks[layer].self_attn.o_proj if arch == "llama" else blocks[layer].attn.c_proj
        got: dict = {}
        h1 = proj.register_forward_pre_hook(lambda m, a, got=got: got.__setitem__("z", a[0].detach().double()))
        h2 = final.register_forward_pre_hook(lambda m, a, got=got: got.__setitem__("x", a[0].detach().double()))
        with torch.no_grad():
            hf(CORRUPT)
            z_bad = got["z"]
            logits = hf(CLEAN).logits.double()
        h1.remove(), h2.remove()
        z_clean, x = got["z"], got["x"][:, -1]
        d_head = z_clean.shape[-1] // n_heads
        cols = slice(head * d_head, (head + 1) * d_head)
        W = proj.weight.double()  # llama Linear [d_model, H*d_head]; gpt2 Conv1D [H*d_head, d_model]
        W_h = W[:, cols].T if arch == "llama" else W[cols]
        delta = (z_bad[:, -1, cols] - z_clean[:, -1, cols]) @ W_h
        if arch == "llama":
            rho = (x.square().mean(-1, keepdim=True) + final.variance_epsilon).sqrt()
            read = final.weight.double() * delta / rho
        else:
            xc = x - x.mean(-1, keepdim=True)
            sigma = (xc.square().mean(-1, keepdim=True) + final.eps).sqrt()
            read = final.weight.double() * (delta - delta.mean(-1, keepdim=True)) / sigma
        new_last = logits[:, -1] + read @ hf.lm_head.weight.double().T
        rows = torch.arange(3)
        before = logits[rows, -1, [5, 6, 7]] - logits[rows, -1, [8, 9, 10]]
        after = new_last[rows, [5, 6, 7]] - new_last[rows, [8, 9, 10]]
        torch.testing.assert_close(table.per_prompt_direct[layer, head], before - after, atol=2e-5, rtol=1e-4)
        row = table.table[(table.table.layer == layer) & (table.table["head"] == head)].iloc[0]
        assert row.abs_direct_effect == pytest.approx(float((before - after).abs().mean()), abs=2e-5)


def test_direct_effects_follow_layers_and_position(model):
    """Unpatched layers have NaN direct effects like total ones; the explained position is checked."""
    metric = ablation.logit_diff([5, 6, 7], [8, 9, 10])
    table = patching.head_patching(model, CLEAN, CORRUPT, metric, layers=[1])
    assert torch.isnan(table.per_prompt_direct[0]).all() and not torch.isnan(table.per_prompt_direct[1]).any()
    assert table.table.abs_direct_effect.iloc[4:].notna().all()
    raises_exactly(OutOfRangeError, "position", patching.head_patching, model, CLEAN, CORRUPT, metric, position=7)
