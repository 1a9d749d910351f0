"""The context-attribution evaluation (lens_alti.analysis.context): the prompt set, ablated log-probabilities
against a direct computation, leave-one-out, top-k drops, rank metrics, errors."""

from __future__ import annotations

import re

import pytest
import torch

from lens_alti.analysis import context as evaluation
from lens_alti.api.inputs import text_units
from lens_alti.errors import InvalidArgumentError
from tests.support.context_model import copy_bridge
from tests.support.errors import raises_exactly

CONTEXT = "w1 w2 w3 . w4 w5 .\n\nw6 w7 paris w8 . w9 w10 .\n\nw11 w12 w13 . w14 ."
QUERY = "where is it ?"


@pytest.fixture(scope="module")
def copying():
    return copy_bridge()


def test_prompts_are_deterministic_and_hold_one_fact():
    words = lambda c, q: len((c + " " + q).split())  # noqa: E731
    a = evaluation.context_prompts(4, 300, seed=7, count_tokens=words)
    assert a == evaluation.context_prompts(4, 300, seed=7, count_tokens=words)
    assert a != evaluation.context_prompts(4, 300, seed=8, count_tokens=words)
    for case in a:
        passages = case.context.split("\n\n")
        assert len(passages) == case.n_passages == len(text_units(case.context, "paragraph")) >= 2
        assert words(case.context, case.query) <= 300
        assert case.person in passages[case.fact] and f"born in {case.answer}" in passages[case.fact].lower().replace(
            case.answer.lower(), case.answer)
        assert case.person in case.query and case.answer not in case.query
        for i, p in enumerate(passages):
            if i != case.fact:
                assert case.person not in p and case.answer not in p
        first, last = case.person.split()
        others = {m.group(0) for m in re.finditer(r"[A-Z][a-z]+ [A-Z][a-z]+", case.context)} - {case.person}
        assert any(first in o or last in o for o in others), "distractors about similar people"


def test_response_log_prob_against_the_model(copying):
    _, model = copying
    spans = text_units(CONTEXT, "paragraph")
    paris = model.tokenizer.convert_tokens_to_ids(["paris", "w3"])
    text = "Context: w1 w2 w3 . w4 w5 .\n\nw11 w12 w13 . w14 .\n\nQuery: where is it ?"
    ids = [model.tokenizer.bos_token_id, *model.tokenizer(text, add_special_tokens=False).input_ids]
    with torch.no_grad():
        logp = model(torch.tensor([ids + paris]))[0].double().log_softmax(-1)
    want = float(logp[len(ids) - 1, paris[0]] + logp[len(ids), paris[1]])
    got = evaluation.response_log_prob(model, CONTEXT, QUERY, paris, spans=spans, removed=[1])
    assert abs(got - want) < 1e-6
    full, loo = evaluation.leave_one_out(model, CONTEXT, QUERY, paris, spans)
    assert abs(full - loo[1] - want) < 1e-6 and int(loo.argmax()) == 1 and float(loo[1]) > 1.0
    assert evaluation.top_k_drop(model, CONTEXT, QUERY, paris, spans, [1, 0, 2], 1, full) == pytest.approx(loo[1])


def test_rank_metrics():
    m = evaluation.rank_metrics(torch.tensor([0.1, 0.9, 0.3]), torch.tensor([0.0, 2.0, 1.0]), fact=1)
    assert m == {"top1": 1.0, "spearman_loo": pytest.approx(1.0)}
    m = evaluation.rank_metrics(torch.tensor([0.9, 0.1, 0.3]), torch.tensor([0.0, 2.0, 1.0]), fact=1)
    assert m["top1"] == 0.0 and m["spearman_loo"] == pytest.approx(-1.0)


def test_errors(copying):
    _, model = copying
    spans = text_units(CONTEXT, "paragraph")
    raises_exactly(InvalidArgumentError, "n", evaluation.context_prompts, 0, 512)
    raises_exactly(InvalidArgumentError, "length", evaluation.context_prompts, 1, 0)
    raises_exactly(InvalidArgumentError, "response_ids", evaluation.response_log_prob, model, CONTEXT, QUERY, [])
    raises_exactly(InvalidArgumentError, "removed", evaluation.response_log_prob, model, CONTEXT, QUERY, [5],
                   spans=spans, removed=[3])
    raises_exactly(InvalidArgumentError, "k", evaluation.top_k_drop, model, CONTEXT, QUERY, [5], spans, [0], 0, 0.0)
