"""Context attribution (lens_alti.context_attribution, docs/spec.md §13): the hand-built copying model, the
float64 reference on tiny random decoders, units and their tokens, prompts, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import lens_alti
from lens_alti.api import inputs
from lens_alti.errors import (
    ArgumentTypeError,
    ContextLengthError,
    InvalidArgumentError,
    OutOfRangeError,
    UnsupportedModelError,
)
from tests.support.context_model import copy_bridge
from tests.support.errors import raises_exactly
from tests.support.reference_logit import reference_logit_decoder

# Three passages; the answer word "paris" is only in the second, in its first sentence.
CONTEXT = "w1 w2 w3 . w4 w5 .\n\nw6 w7 paris w8 . w9 w10 .\n\nw11 w12 w13 . w14 ."
QUERY = "where is it ?"


@pytest.fixture(scope="module")
def copying():
    return copy_bridge()


def test_the_passage_the_answer_is_copied_from_comes_first(copying):
    _, model = copying
    res = lens_alti.context_attribution(model, CONTEXT, QUERY, units="paragraph", max_new_tokens=1)
    assert res.generated and res.response == "paris"
    assert res.ranking()[0] == 1 and res.top(1)[0][:2] == (1, "w6 w7 paris w8 . w9 w10 .")
    assert float(res.scores[1]) > 0.1 > float(res.scores[[0, 2]].abs().max()) * 100
    sentences = lens_alti.context_attribution(model, CONTEXT, QUERY, "paris", units="sentence")
    assert sentences.ranking()[0] == 2 and not sentences.generated  # "w6 w7 paris w8 ."


def test_scores_match_the_float64_reference(copying):
    """Unit scores = Σ over response tokens of the reference ALTI-Logit of logit_t − Σ p·logit (p from the
    model's own logits), summed over the unit's tokens, mapped by hand (one token per word)."""
    hf, model = copying
    res = lens_alti.context_attribution(model, CONTEXT, QUERY, "paris w3", units="paragraph")
    words = ["<s>", "Context", ":", *CONTEXT.split(), "Query", ":", *QUERY.split()]
    assert res.str_tokens == [*words, "paris", "w3"]
    unit = [-1] * 3 + [0] * 7 + [1] * 8 + [2] * 6 + [-1] * 6
    assert res.token_units.tolist() == unit + [-1, -1]
    ids = torch.tensor([model.tokenizer.convert_tokens_to_ids(res.str_tokens)])
    hf64 = copy.deepcopy(hf).double()
    expected = torch.zeros(ids.shape[1], dtype=torch.float64)
    log_probs = []
    for r in range(2):
        q = len(words) + r - 1
        with torch.no_grad():
            logp = hf64(ids[:, : q + 1]).logits[0, -1].log_softmax(-1)
        t = int(ids[0, q + 1])
        ref = reference_logit_decoder(hf, ids[:, : q + 1], [t], None, [q], contrast_weights=logp.exp()[None])
        expected[: q + 1] += ref["tokens"][0]
        log_probs.append(float(logp[t]))
    torch.testing.assert_close(res.token_scores.double(), expected, atol=1e-5, rtol=0)
    by_unit = torch.stack([expected[torch.tensor(unit + [-1, -1]) == u].sum() for u in range(3)])
    torch.testing.assert_close(res.scores.double(), by_unit, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.log_prob.double(), torch.tensor(log_probs, dtype=torch.float64), atol=1e-5, rtol=0)
    total = res.scores.sum() + res.other + res.response_score + res.not_to_tokens.sum() + res.completeness_gap.sum()
    assert abs(float(total) - float(res.explained.sum())) < 1e-5


def test_soft_contrast_matches_the_reference(decoder):
    """logit_attribution with a distribution as the contrast, on every tiny decoder family."""
    arch, hf, bridge = decoder
    tokens = torch.randint(4, 1000, (2, 7), generator=torch.Generator().manual_seed(3))
    weights = torch.softmax(torch.randn(2, 1000, generator=torch.Generator().manual_seed(4)) * 3, -1)
    res = lens_alti.logit_attribution(bridge, [5, 9], weights, tokens=tokens, position=[-1, 3])
    ref = reference_logit_decoder(hf, tokens, [5, 9], None, [6, 3], contrast_weights=weights.double())
    for name in ("heads", "mlp", "embedding", "bias", "logit", "tokens"):
        torch.testing.assert_close(getattr(res, name).double(), ref[name], atol=1e-5 * max(1, ref[name].abs().max()),
                                   rtol=0, msg=f"{arch} {name}")
    assert res.contrast is None and res.extra["soft_contrast"] and "logit difference" in repr(res)


def test_generated_response_is_the_greedy_continuation(decoder):
    """Against a forward pass per token (the bridge's key-value cache is wrong on LLaMA and Gemma-2)."""
    arch, _, bridge = decoder
    res = lens_alti.context_attribution(bridge, "t5 t6 . t7 t8 .", "t9 t40", units="sentence", max_new_tokens=4)
    ids = bridge.to_tokens("Context: t5 t6 . t7 t8 .\n\nQuery: t9 t40")
    eos = bridge.tokenizer.eos_token_id
    with torch.no_grad():
        for _ in range(4):
            nxt = int(bridge(ids)[0, -1].argmax())
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert res.n_prompt + len(res.response_ids) == ids.shape[1], arch
    assert res.response_ids.tolist() == ids[0, res.n_prompt :].tolist(), arch


def test_any_decoder_family(decoder):
    arch, _, bridge = decoder
    res = lens_alti.context_attribution(bridge, "t5 t6 . t7 t8 .", "t9 t40", "t41 t42", units="sentence")
    assert res.n_units == 2 and res.scores.shape == (2,) and torch.isfinite(res.scores).all()
    total = res.scores.sum() + res.other + res.response_score + res.not_to_tokens.sum() + res.completeness_gap.sum()
    assert abs(float(total) - float(res.explained.sum())) < 1e-4 * max(1.0, float(res.explained.abs().sum()))


SENTENCES = 'One. Two!  "Three?" Four\nFive.\n\nSix (seven.) Eight'


@pytest.mark.parametrize(
    ("units", "texts"),
    [
        ("sentence", ["One.", "Two!", '"Three?"', "Four", "Five.", "Six (seven.)", "Eight"]),
        ("paragraph", ['One. Two!  "Three?" Four\nFive.', "Six (seven.) Eight"]),
        ([(0, 4), (5, 9)], ["One.", "Two!"]),
    ],
)
def test_units(units, texts):
    spans = inputs.text_units(SENTENCES, units)
    assert [SENTENCES[a:b] for a, b in spans] == texts


def test_tokens_go_to_the_unit_they_overlap_most():
    spans = [(0, 4), (6, 10)]
    offsets = [(0, 0), (0, 2), (2, 5), (5, 7), (7, 12), (12, 14)]
    assert inputs.token_units(offsets, spans) == [-1, 0, 0, 1, 1, -1]
    assert inputs.token_units([(10, 14), (16, 20)], spans, shift=10) == [0, 1]


@pytest.mark.parametrize(
    ("removed", "text"),
    [
        ([0], "B c.\n\nC."), ([1], "A.\n\nC."), ([2], "A.\n\nB c."), ([0, 1], "C."), ([0, 1, 2], ""),
        ([], "A.\n\nB c.\n\nC."),
    ],
)
def test_removing_units_takes_their_separator(removed, text):
    context = "A.\n\nB c.\n\nC."
    assert inputs.remove_units(context, inputs.text_units(context, "paragraph"), removed) == text


def test_prompt_with_and_without_a_chat_template(copying):
    _, model = copying
    prompt, start, chat = inputs.context_prompt(model, "a b", "q?", "Q: {query} C: {context}.", None)
    assert (prompt, start, chat) == ("Q: q? C: a b.", 9, False)
    tok = model.tokenizer
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{{ '<s>' }}"
    try:
        prompt, start, chat = inputs.context_prompt(model, "a b", "q?", inputs.DEFAULT_TEMPLATE, None)
        assert chat and prompt == "<s>Context: a b\n\nQuery: q?</s><s>" and prompt[start : start + 3] == "a b"
        assert not inputs.context_prompt(model, "a b", "q?", inputs.DEFAULT_TEMPLATE, False)[2]
        ids = inputs.context_tokens(model, "w1 w2", "where ?")[0]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 2  # from the template, no extra BOS
        tok.chat_template = "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}"
        raises_exactly(InvalidArgumentError, "chat", inputs.context_prompt, model, " a ", "q", "{context}{query}", None)
    finally:
        tok.chat_template = None


def test_result_table_save_and_load(copying, tmp_path):
    _, model = copying
    res = lens_alti.context_attribution(model, CONTEXT, QUERY, "paris", units="paragraph")
    frame = res.to_dataframe()
    assert list(frame.columns) == ["unit", "start", "end", "rank", "n_tokens", "score", "text"]
    assert frame["rank"].tolist()[1] == 1 and frame["n_tokens"].tolist() == [7, 8, 6]
    back = lens_alti.load(res.save(tmp_path / "c.safetensors"))
    assert isinstance(back, lens_alti.ContextAttribution) and back.units == res.units
    torch.testing.assert_close(back.scores, res.scores)
    assert "ContextAttribution(units=3 (paragraph)" in repr(back)


def test_errors(copying):
    _, model = copying
    cite = lens_alti.context_attribution
    raises_exactly(ArgumentTypeError, "context", cite, model, None, QUERY)
    raises_exactly(ArgumentTypeError, "query", cite, model, CONTEXT, 3)
    raises_exactly(ArgumentTypeError, "response", cite, model, CONTEXT, QUERY, ["paris"])
    raises_exactly(InvalidArgumentError, "response", cite, model, CONTEXT, QUERY, "")
    raises_exactly(InvalidArgumentError, "units", cite, model, CONTEXT, QUERY, units="word")
    raises_exactly(ArgumentTypeError, "units", cite, model, CONTEXT, QUERY, units=[])
    raises_exactly(ArgumentTypeError, "units[0]", cite, model, CONTEXT, QUERY, units=[(1, 2, 3)])
    raises_exactly(OutOfRangeError, "units[0]", cite, model, CONTEXT, QUERY, units=[(3, 2)])
    raises_exactly(OutOfRangeError, "units[0]", cite, model, CONTEXT, QUERY, units=[(0, 999)])
    raises_exactly(InvalidArgumentError, "units[1]", cite, model, CONTEXT, QUERY, units=[(0, 5), (4, 8)])
    raises_exactly(InvalidArgumentError, "context", cite, model, " \n ", QUERY)
    raises_exactly(InvalidArgumentError, "template", cite, model, CONTEXT, QUERY, template="{context}")
    raises_exactly(ArgumentTypeError, "chat", cite, model, CONTEXT, QUERY, chat="yes")
    raises_exactly(InvalidArgumentError, "chat", cite, model, CONTEXT, QUERY, chat=True)
    raises_exactly(InvalidArgumentError, "max_new_tokens", cite, model, CONTEXT, QUERY, max_new_tokens=0)
    raises_exactly(InvalidArgumentError, "dtype", cite, model, CONTEXT, QUERY, dtype=torch.float16)
    raises_exactly(UnsupportedModelError, "decoder-only", cite, object(), CONTEXT, QUERY)
    raises_exactly(InvalidArgumentError, "response", cite, model, CONTEXT, QUERY, "   ")
    raises_exactly(ContextLengthError, "context", cite, model, "w1 " * 300, QUERY, "paris")
    raises_exactly(ContextLengthError, "context", cite, model, "w1 " * 240, QUERY, max_new_tokens=20)


def test_model_without_a_fast_tokenizer(copying):
    _, model = copying
    fast = model.tokenizer
    model.tokenizer = None
    try:
        raises_exactly(ArgumentTypeError, "model", lens_alti.context_attribution, model, CONTEXT, QUERY)
    finally:
        model.tokenizer = fast


def test_encoders_are_refused():
    from tests.support.models import boot, hf_seq2seq

    bert = boot(hf_seq2seq("bert"), "tiny-bert")
    raises_exactly(UnsupportedModelError, "decoder-only", lens_alti.context_attribution, bert, "t5 t6 .", "t7")


def test_contrast_distribution_errors(copying):
    _, model = copying
    ids = torch.tensor([[0, 5, 6, 7]])
    n = len(model.tokenizer.get_vocab())
    attr = lens_alti.logit_attribution
    raises_exactly(InvalidArgumentError, "contrast", attr, model, 5, torch.ones(3) / 3, tokens=ids)
    raises_exactly(InvalidArgumentError, "contrast", attr, model, 5, -torch.ones(n) / n, tokens=ids)
    raises_exactly(InvalidArgumentError, "contrast", attr, model, 5, torch.ones(n), tokens=ids)
    raises_exactly(InvalidArgumentError, "contrast", attr, model, 5, torch.ones(2, 3, n) / n, tokens=ids)
