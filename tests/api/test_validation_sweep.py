"""Bad input across the public surface: the exact error class, naming the argument, or the right result.

Hypothesis strategies generate arguments of each kind (positions, batch/layer/head indices,
k and sizes, token ids, talp text, word ids); the explicit cases are those of issue 12.
No test accepts "any exception": each checks the class exactly and that the message names
the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lens_alti
from lens_alti import errors
from lens_alti.alti import memory
from lens_alti.analysis import ablation, alignment, compare, patching
from lens_alti.analysis.batching import left_padded
from lens_alti.analysis.ioi import IOIPrompt, abc_corruption
from lens_alti.analysis.study import head_ranking_study
from lens_alti.errors import (
    ArgumentTypeError,
    ContextLengthError,
    InsufficientMemoryError,
    InterventionNotSupportedError,
    InvalidArgumentError,
    MaskMismatchError,
    MissingTargetError,
    OutOfRangeError,
    PaddedPositionError,
)
from lens_alti.validation import check_index, check_position, describe_positions
from lens_alti.viz import plotting
from tests.support.errors import raises_exactly
from tests.support.models import build_bridge, build_seq2seq

SWEEP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENS = torch.randint(4, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])  # item 1 left-padded by two
NOT_INTS = st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), st.just([1]))


@pytest.fixture(scope="module")
def gpt2():
    return build_bridge("gpt2")[1]


@pytest.fixture(scope="module")
def padded(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS, attention_mask=MASK)
    return cache


@pytest.fixture(scope="module")
def result(padded):
    return lens_alti.attribute(padded, attention_mask=MASK, heads=True, tokens=TOKENS)


@pytest.fixture(scope="module")
def marian():
    return build_seq2seq("marian")[1]


@pytest.fixture(scope="module")
def seq2seq_result(marian):
    src, tgt = torch.tensor([[5, 6, 7, 8, 2]]), torch.tensor([[1, 9, 10, 11]])
    _, cache = marian.run_with_cache(src, decoder_input=tgt)
    return lens_alti.attribute(cache, tokens=src, decoder_tokens=tgt)


# ------------------------------------------------------------------ the error classes


def test_error_classes_are_lens_alti_and_builtin():
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(OutOfRangeError, IndexError)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(PaddedPositionError, ValueError)
    assert issubclass(MaskMismatchError, ValueError) and issubclass(InsufficientMemoryError, MemoryError)
    assert issubclass(InterventionNotSupportedError, errors.UnsupportedModelError)
    for cls in (InvalidArgumentError, OutOfRangeError, ArgumentTypeError, ContextLengthError, MissingTargetError):
        assert issubclass(cls, errors.LensAltiError)
    e = OutOfRangeError("layer", 5, "an index in 0..1")
    assert (e.argument, e.value, e.expected) == ("layer", 5, "an index in 0..1")
    assert str(e) == "layer=5 is out of range: expected an index in 0..1"
    c = ContextLengthError("text", 9000, 8192)
    assert str(c).startswith("text is too long: 9000 tokens, this model takes at most 8192")
    assert (c.value, c.limit) == (9000, 8192) and isinstance(c, ValueError)
    import pickle

    for err in (e, c, PaddedPositionError("position", 0, "a real position", "hint")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)


def test_describe_positions():
    assert describe_positions([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert describe_positions([]) == "none"


# ------------------------------------------------------------------ sweeps by argument kind


@SWEEP
@given(position=st.integers(-20, 20))
def test_positions_sweep(result, position):
    """Python-style negatives over real tokens; padded positions refused with the real ones listed."""
    real = [2, 3, 4, 5, 6]
    if -len(real) <= position < 0 or position in real:
        expected = real[position] if position < 0 else position
        assert result.top_sources(position, k=1, batch=1)[0][0] in real
        assert check_position("position", position, MASK[1]) == expected
        return
    cls = PaddedPositionError if 0 <= position < 7 else OutOfRangeError
    err = raises_exactly(cls, f"position={position}", result.top_sources, position, batch=1)
    assert "2-6" in str(err), "the message lists the real positions"
    for fn in (plotting.saliency_bar, plotting.head_heatmap):
        raises_exactly(cls, f"position={position}", fn, result, position, batch=1)


@SWEEP
@given(position=st.integers(-20, 20))
def test_logit_attribution_and_routes_position_sweep(padded, position):
    """The explained position: negatives over real tokens; padding and out-of-range refused, naming `position`."""
    real = [2, 3, 4, 5, 6]  # batch item 1
    if -len(real) <= position < 0 or position in real:
        expected = real[position] if position < 0 else position
        res = lens_alti.logit_attribution(padded, 5, position=[-1, position], attention_mask=MASK)
        assert res.position.tolist() == [6, expected]
        assert lens_alti.routes(padded, position, batch=1, attention_mask=MASK, threshold=0.5).position == expected
        return
    cls = PaddedPositionError if 0 <= position < 7 else OutOfRangeError
    err = raises_exactly(
        cls, f"position={position}", lens_alti.logit_attribution, padded, 5, position=[-1, position],
        attention_mask=MASK,
    )
    assert "2-6" in str(err), "the message lists the real positions"
    raises_exactly(cls, f"position={position}", lens_alti.routes, padded, position, batch=1, attention_mask=MASK)


@SWEEP
@given(token=st.one_of(st.integers(-3, 3), st.integers(990, 1010), st.integers(10**6, 10**6 + 1)))
def test_logit_attribution_and_routes_token_sweep(padded, token):
    """Target and contrast ids: inside the vocabulary they are explained, outside refused naming the argument."""
    vocab = int(padded.model.cfg.d_vocab)
    if 0 <= token < vocab:
        assert lens_alti.logit_attribution(padded, token, attention_mask=MASK).target.tolist() == [token, token]
        res = lens_alti.logit_attribution(padded, 5, token, attention_mask=MASK)
        assert res.contrast.tolist() == [token, token]
        assert lens_alti.routes(padded, target=token, attention_mask=MASK, threshold=0.5).target == token
        return
    raises_exactly(OutOfRangeError, f"target={token}", lens_alti.logit_attribution, padded, token, attention_mask=MASK)
    raises_exactly(OutOfRangeError, f"contrast={token}", lens_alti.logit_attribution, padded, 5, token,
                   attention_mask=MASK)
    raises_exactly(OutOfRangeError, f"target={token}", lens_alti.routes, padded, target=token, attention_mask=MASK)


@SWEEP
@given(threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), NOT_INTS))
def test_routes_threshold_sweep(padded, threshold):
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if number and 0 < threshold < 1:
        assert lens_alti.routes(padded, attention_mask=MASK, threshold=threshold).threshold == threshold
        return
    cls = InvalidArgumentError if number else ArgumentTypeError
    raises_exactly(cls, "threshold=", lens_alti.routes, padded, attention_mask=MASK, threshold=threshold)


def test_logit_attribution_and_routes_arguments(padded, gpt2):
    la, routes = lens_alti.logit_attribution, lens_alti.routes
    raises_exactly(InvalidArgumentError, "target='t5 t6'", la, padded, "t5 t6", attention_mask=MASK)
    raises_exactly(ArgumentTypeError, "target=", la, padded, 1.5, attention_mask=MASK)
    raises_exactly(InvalidArgumentError, "target=", la, padded, [1, 2, 3], attention_mask=MASK)
    raises_exactly(InvalidArgumentError, "dtype=", la, padded, 5, attention_mask=MASK, dtype=torch.float16)
    raises_exactly(ArgumentTypeError, "check=", la, padded, 5, attention_mask=MASK, check=1)
    raises_exactly(InvalidArgumentError, "attention_mask", la, padded, 5, attention_mask=MASK[:, :3])
    raises_exactly(InvalidArgumentError, "attention_mask", la, padded, 5, attention_mask=MASK * 2)
    raises_exactly(ArgumentTypeError, "tokens=None", la, gpt2, 5)
    raises_exactly(InvalidArgumentError, "tokens=[]", la, gpt2, 5, tokens=[])
    raises_exactly(OutOfRangeError, "batch=2", routes, padded, attention_mask=MASK, batch=2)
    raises_exactly(ArgumentTypeError, "batch=", routes, padded, attention_mask=MASK, batch="0")
    raises_exactly(InvalidArgumentError, "logit_mode='both'", routes, padded, target=5, logit_mode="both")
    raises_exactly(InvalidArgumentError, "contrast=5", routes, padded, attention_mask=MASK, contrast=5)
    raises_exactly(InvalidArgumentError, "dtype=", routes, padded, attention_mask=MASK, dtype=torch.int64)
    text = la(gpt2, 5, tokens=["one two", "three four five"])  # texts are left-padded and masked for the caller
    assert text.attention_mask.tolist()[0][0] == 0 and text.position.tolist()[0] == text.attention_mask.shape[1] - 1


@SWEEP
@given(index=st.integers(-30, 30))
def test_batch_and_layer_sweep(result, index):
    if -2 <= index < 2:
        assert check_index("batch", index, 2) == index % 2
        assert result.top_sources(-1, batch=index, layer=index)
        return
    raises_exactly(OutOfRangeError, f"batch={index}", result.top_sources, -1, batch=index)
    raises_exactly(OutOfRangeError, f"layer={index}", result.top_sources, -1, layer=index)
    for fn in (plotting.token_heatmap, plotting.rollout_heatmap):
        raises_exactly(OutOfRangeError, f"layer={index}", fn, result, index)
        raises_exactly(OutOfRangeError, f"batch={index}", fn, result, batch=index)
    raises_exactly(OutOfRangeError, f"batch={index}", plotting.saliency_bar, result, batch=index)
    raises_exactly(OutOfRangeError, f"batch={index}", plotting.head_heatmap, result, batch=index)


@SWEEP
@given(k=st.one_of(st.integers(-10, 0), NOT_INTS))
def test_k_sweep(result, seq2seq_result, k):
    cls = InvalidArgumentError if isinstance(k, int) and not isinstance(k, bool) else ArgumentTypeError
    raises_exactly(cls, "k=", result.top_sources, -1, k=k)
    raises_exactly(cls, "k=", seq2seq_result.top_sources, -1, k=k)


def test_k_larger_than_the_real_tokens_lists_only_real_sources(result):
    top = result.top_sources(-1, k=50, batch=1)
    assert sorted(i for i, _, _ in top) == [2, 3, 4, 5, 6]


@SWEEP
@given(size=st.one_of(st.integers(max_value=0), NOT_INTS))
def test_max_chunk_bytes_sweep(padded, size):
    cls = InvalidArgumentError if isinstance(size, int) and not isinstance(size, bool) else ArgumentTypeError
    raises_exactly(cls, "max_chunk_bytes=", lens_alti.attribute, padded, attention_mask=MASK, max_chunk_bytes=size)


@SWEEP
@given(ids=st.lists(st.integers(-5, 2000), min_size=1, max_size=4))
def test_metric_token_ids_sweep(ids):
    logits = torch.randn(len(ids), 3, 1000)
    if min(ids) < 0:  # negative ids are refused when the metric is made
        raises_exactly(OutOfRangeError, "target=", ablation.logprob, ids)
        return
    metric = ablation.logprob(ids)
    if max(ids) < 1000:
        assert metric(logits).shape == (len(ids),)
        return
    raises_exactly(OutOfRangeError, "target=", metric, logits)


@SWEEP
@given(line=st.text(alphabet="0123456789-p ¹²³٣x", max_size=12))
def test_parse_talp_sweep(line):
    """Any text either parses into 0-indexed links or raises InvalidArgumentError naming `line`."""
    try:
        gold = alignment.parse_talp(line)
    except InvalidArgumentError as exc:
        assert type(exc) is InvalidArgumentError and "line=" in str(exc)
        return
    assert all(i >= 0 and j >= 0 for i, j in gold.possible) and gold.sure <= gold.possible


@SWEEP
@given(source=st.lists(st.one_of(st.none(), st.integers(-3, 3)), min_size=3, max_size=3))
def test_word_ids_sweep(source):
    m = torch.rand(2, 3)
    if all(w is None or w >= 0 for w in source):
        out = alignment.aggregate_subwords(m, source, [0, 1])
        assert out.shape == (2, 1 + max((w for w in source if w is not None), default=-1))
        return
    raises_exactly(InvalidArgumentError, "source_word_ids", alignment.aggregate_subwords, m, source, [0, 1])


# ------------------------------------------------------------------ issue 12, case by case


def test_result_methods(result, seq2seq_result):
    raises_exactly(OutOfRangeError, "position=999", result.top_sources, 999)
    raises_exactly(InvalidArgumentError, "k=-1", result.top_sources, k=-1)
    raises_exactly(OutOfRangeError, "batch=5", result.top_sources, batch=5)
    raises_exactly(PaddedPositionError, "position=0", result.top_sources, 0, batch=1)
    raises_exactly(InvalidArgumentError, "which='nope'", result.to_dataframe, "nope")
    raises_exactly(OutOfRangeError, "position=99", seq2seq_result.top_sources, 99)
    raises_exactly(OutOfRangeError, "batch=1", seq2seq_result.top_sources, batch=1)


def test_plots(result, seq2seq_result):
    raises_exactly(ArgumentTypeError, "result=", plotting.source_target_split, result)
    raises_exactly(ArgumentTypeError, "result=", plotting.token_heatmap, seq2seq_result)
    raises_exactly(OutOfRangeError, "batch=3", plotting.source_target_split, seq2seq_result, batch=3)
    raises_exactly(PaddedPositionError, "position=1", plotting.saliency_bar, result, 1, batch=1)
    no_heads = lens_alti.AltiResult(**{**result.__dict__, "head_outputs": None})
    raises_exactly(InvalidArgumentError, "heads=True", plotting.head_heatmap, no_heads)
    bar = plotting.saliency_bar(result, -1, batch=1).data[0]  # item 1 is left-padded by two: its real tokens 2-6
    assert list(bar.y) == pytest.approx(result.rollout[1, -1, 6, 2:].tolist())


def test_alignment_cases():
    raises_exactly(InvalidArgumentError, "alignment link", alignment.format_talp, {(-1, 0)})
    raises_exactly(
        InvalidArgumentError, "target_word_ids", alignment.aggregate_subwords, torch.rand(2, 2), [0, 1], [0, -1]
    )
    raises_exactly(InvalidArgumentError, "line=", alignment.parse_talp, "¹-²")
    raises_exactly(ArgumentTypeError, "line=None", alignment.parse_talp, None)
    raises_exactly(ArgumentTypeError, "line=b'1-1'", alignment.parse_talp, b"1-1")
    raises_exactly(InvalidArgumentError, "sure link", alignment.GoldAlignment.from_links, [(0, -2)])
    assert alignment.format_talp({(0, 1)}) == "1-2"


def test_left_padded_refuses_no_texts(gpt2):
    raises_exactly(InvalidArgumentError, "texts=[]", left_padded, gpt2, [])
    raises_exactly(ArgumentTypeError, "texts='hello'", left_padded, gpt2, "hello")


def test_attribute_arguments(padded):
    raises_exactly(
        ArgumentTypeError,
        "max_chunk_bytes=None",
        lens_alti.attribute,
        padded,
        attention_mask=MASK,
        max_chunk_bytes=None,
    )
    raises_exactly(
        InvalidArgumentError, "tokens", lens_alti.attribute, padded, attention_mask=MASK, tokens=TOKENS[:, :5]
    )
    raises_exactly(InvalidArgumentError, "tokens", lens_alti.attribute, padded, attention_mask=MASK, tokens=TOKENS[:1])
    raises_exactly(
        ArgumentTypeError, "tokens='a text'", lens_alti.attribute, padded, attention_mask=MASK, tokens="a text"
    )
    raises_exactly(
        InvalidArgumentError,
        "tokens[1]",
        lens_alti.attribute,
        padded,
        attention_mask=MASK,
        tokens=[list("abcdefg"), list("abc")],
    )
    raises_exactly(
        InvalidArgumentError, "backend='fast'", lens_alti.attribute, padded, attention_mask=MASK, backend="fast"
    )
    raises_exactly(ArgumentTypeError, "heads=", lens_alti.attribute, padded, attention_mask=MASK, heads="yes")
    labelled = lens_alti.attribute(padded, attention_mask=MASK, tokens=[list("abcdefg"), list("hijklmn")])
    assert labelled.top_sources(-1, k=1, batch=1)[0][1] in "jklmn"


# ------------------------------------------------------------------ mask / padding consistency


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_without_its_mask_is_refused(gpt2, side):
    mask = MASK if side == "left" else MASK.flip(-1)
    _, cache = gpt2.run_with_cache(TOKENS, attention_mask=mask)
    err = raises_exactly(MaskMismatchError, "attention_mask", lens_alti.attribute, cache)
    assert "batch item 1" in str(err) and ("0-1" if side == "left" else "5-6") in str(err)
    short = mask.clone()
    short[1, 1 if side == "left" else 5] = 1  # one pad fewer than the cache was run with
    err = raises_exactly(MaskMismatchError, "attention_mask", lens_alti.attribute, cache, attention_mask=short)
    assert ("1 of batch item 1" if side == "left" else "5 of batch item 1") in str(err)
    res = lens_alti.attribute(cache, attention_mask=mask)  # the right mask: no false alarm
    assert float(res.reconstruction_error.max()) < 1e-5


def test_padding_without_its_mask_in_an_encoder():
    bert = build_seq2seq("bert")[1]
    _, cache = bert.run_with_cache(TOKENS, attention_mask=MASK.flip(-1))
    raises_exactly(MaskMismatchError, "attention_mask", lens_alti.attribute, cache)
    assert lens_alti.attribute(cache, attention_mask=MASK.flip(-1)).layers.shape == (2, 2, 7, 7)


def test_padding_without_its_decoder_mask(marian):
    src, tgt = torch.tensor([[5, 6, 7, 2], [5, 6, 7, 2]]), torch.tensor([[1, 9, 10, 11], [1, 9, 3, 3]])
    tgt_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, cache = marian.run_with_cache(src, decoder_input=tgt, decoder_attention_mask=tgt_mask)
    raises_exactly(MaskMismatchError, "decoder_attention_mask", lens_alti.attribute, cache)
    res = lens_alti.attribute(cache, decoder_attention_mask=tgt_mask)
    assert torch.isfinite(res.total).all()


@pytest.mark.parametrize("check", [False, True])
def test_nan_at_padded_positions_never_reaches_real_rows(gpt2, padded, check):
    clean = lens_alti.attribute(padded, attention_mask=MASK, heads=True)
    dirty = type(padded)({k: v.clone() for k, v in padded.cache_dict.items()}, gpt2)
    for layer in range(2):
        dirty.cache_dict[f"blocks.{layer}.attn.hook_v"][1, :2] = float("nan")  # padded keys of item 1
        dirty.cache_dict[f"blocks.{layer}.hook_resid_pre"][1, :2] = float("nan")
        dirty.cache_dict[f"blocks.{layer}.hook_resid_mid"][1, :2] = float("inf")
    res = lens_alti.attribute(dirty, attention_mask=MASK, heads=True, check=check)
    assert torch.isfinite(res.layers).all() and torch.isfinite(res.heads).all()
    torch.testing.assert_close(res.layers, clean.layers)
    torch.testing.assert_close(res.rollout, clean.rollout)
    if check:
        assert float(res.reconstruction_error.max()) < 1e-5


# ------------------------------------------------------------------ encoder-decoder without a target


def test_identity_translation_is_not_mistaken_for_a_missing_target(marian):
    src = torch.tensor([[7, 2]])  # one word and </s>
    shifted = torch.tensor([[1, 7]])  # decoder start + the same word: a one-word identity translation
    _, forgot = marian.run_with_cache(src)  # no decoder_input: TransformerLens shifts the source right
    raises_exactly(MissingTargetError, "allow_shifted_source", lens_alti.attribute, forgot)
    _, cache = marian.run_with_cache(src, decoder_input=shifted)
    assert torch.equal(cache["decoder_embed.hook_in"], shifted)
    with_ids = lens_alti.attribute(cache, tokens=src, decoder_tokens=shifted)  # the ids prove a real target
    forced = lens_alti.attribute(cache, allow_shifted_source=True)
    torch.testing.assert_close(with_ids.total, forced.total)
    raises_exactly(ArgumentTypeError, "allow_shifted_source=", lens_alti.attribute, cache, allow_shifted_source="y")


# ------------------------------------------------------------------ interventions


def test_ablation_metrics():
    logits = torch.randn(2, 4, 1000)
    raises_exactly(InvalidArgumentError, "wrong=", ablation.logit_diff, [5, 6], [7])
    raises_exactly(InvalidArgumentError, "correct=", ablation.logit_diff([5, 6, 7], [1, 2, 3]), logits)
    raises_exactly(OutOfRangeError, "wrong=", ablation.logit_diff([5, 6], [1, 5000]), logits)
    raises_exactly(OutOfRangeError, "correct=", ablation.logit_diff, [5, -1], [1, 2])
    raises_exactly(InvalidArgumentError, "target=", ablation.logprob([5]), logits)
    raises_exactly(ArgumentTypeError, "target=", ablation.logprob, "Mary")
    raises_exactly(OutOfRangeError, "position=9", ablation.logprob([5, 6], position=9), logits)
    raises_exactly(OutOfRangeError, "position=4", ablation.kl_to_clean, logits, 4)
    raises_exactly(InvalidArgumentError, "logits", ablation.kl_to_clean(logits), torch.randn(3, 4, 1000))


def test_head_ablation_arguments(gpt2):
    metric = ablation.logprob([5, 6])
    raises_exactly(OutOfRangeError, "position=999", ablation.head_ablation, gpt2, TOKENS, metric, position=999)
    raises_exactly(
        PaddedPositionError, "position=0", ablation.head_ablation, gpt2, TOKENS, metric, position=0, attention_mask=MASK
    )
    raises_exactly(OutOfRangeError, "tokens=", ablation.head_ablation, gpt2, TOKENS + 1000, metric)
    raises_exactly(ArgumentTypeError, "metric=", ablation.head_ablation, gpt2, TOKENS, "logit diff")
    raises_exactly(ArgumentTypeError, "tokens=", ablation.head_ablation, gpt2, "some text", metric)
    raises_exactly(
        InvalidArgumentError,
        "attention_mask=",
        ablation.head_ablation,
        gpt2,
        TOKENS,
        metric,
        attention_mask=MASK[:, :5],
    )
    raises_exactly(ArgumentTypeError, "model=", ablation.head_ablation, object(), TOKENS, metric)


def test_circuit_comparison_arguments(gpt2):
    raises_exactly(OutOfRangeError, "heads[0] layer=7", ablation.circuit_comparison, gpt2, TOKENS, [(7, 0)])
    raises_exactly(OutOfRangeError, "heads[1] head=4", ablation.circuit_comparison, gpt2, TOKENS, [(0, 0), (1, 4)])
    raises_exactly(ArgumentTypeError, "heads[0]", ablation.circuit_comparison, gpt2, TOKENS, [3])
    raises_exactly(OutOfRangeError, "batch=2", ablation.circuit_comparison, gpt2, TOKENS, [(0, 0)], batch=2)
    raises_exactly(
        PaddedPositionError,
        "position=1",
        ablation.circuit_comparison,
        gpt2,
        TOKENS,
        [(0, 0)],
        batch=1,
        position=1,
        attention_mask=MASK,
    )


def test_circuit_comparison_on_a_bridge_that_ignores_pattern_edits():
    """TransformerLens 4.x's BERT bridge ignores hook_pattern edits: the heads' hook_z is zeroed instead.
    Checked against the float64 reference ALTI of the Hugging Face model whose ablated heads have zero
    value projections (their output is then 0 whatever they attend to), and its own logits."""
    import copy

    from tests.support.reference_seq2seq import reference_encoder

    hf, bert = build_seq2seq("bert")
    heads = [(0, 1), (1, 3)]
    metric = ablation.logprob([5, 6], position=3)
    comp = ablation.circuit_comparison(bert, TOKENS, heads, metric=metric)
    assert comp.ablated_through == "hook_z"
    ablated = copy.deepcopy(hf)
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for layer, h in heads:
            value = ablated.bert.encoder.layer[layer].attention.self.value
            value.weight[h * d_head : (h + 1) * d_head] = 0
            value.bias[h * d_head : (h + 1) * d_head] = 0
    ref = reference_encoder(ablated, TOKENS)
    torch.testing.assert_close(comp.after.rollout.double(), ref["rollout"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp.after.layers.double(), ref["l1"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = metric(ablated(TOKENS).logits)
    assert comp.metric_after == pytest.approx(float(expected.mean()), abs=1e-4)
    assert not torch.allclose(comp.before.rollout, comp.after.rollout)


def test_token_deletion_arguments(gpt2):
    raises_exactly(InvalidArgumentError, "prompts[0]", ablation.token_deletion, gpt2, [torch.tensor([5, 6])])
    report = ablation.token_deletion(gpt2, [torch.tensor([5, 6, 7])], ks=(1,), methods=("random",))
    assert report.auc.method.tolist() == ["random"]
    assert report.auc[["comprehensiveness", "sufficiency"]].notna().all().all()
    raises_exactly(InvalidArgumentError, "prompts=", ablation.token_deletion, gpt2, [])
    raises_exactly(InvalidArgumentError, "ks[0]=0", ablation.token_deletion, gpt2, [TOKENS[0]], ks=(0,))
    raises_exactly(
        InvalidArgumentError, "methods='best'", ablation.token_deletion, gpt2, [TOKENS[0]], methods=("best",)
    )
    raises_exactly(InvalidArgumentError, "targets=", ablation.token_deletion, gpt2, [TOKENS[0]], targets=[1, 2])
    raises_exactly(OutOfRangeError, "baseline_token=", ablation.token_deletion, gpt2, [TOKENS[0]], baseline_token=10**6)
    raises_exactly(InvalidArgumentError, "ks=", ablation.token_deletion, gpt2, [TOKENS[0]], ks=(50,))


@SWEEP
@given(layer=st.integers(-4, 4), chunk=st.one_of(st.integers(-2, 5), st.none()))
def test_head_patching_layers_and_chunk_sweep(gpt2, layer, chunk):
    """Layers index the model's 2 layers (negatives from the end); chunk is a positive count of heads."""
    metric = ablation.logprob([5, 6])
    run = lambda: patching.head_patching(gpt2, TOKENS, TOKENS.flip(-1), metric, layers=[layer], chunk=chunk)  # noqa: E731
    if chunk is not None and chunk < 1:
        raises_exactly(InvalidArgumentError, f"chunk={chunk}", run)
    elif not -2 <= layer < 2:
        raises_exactly(OutOfRangeError, f"layers[0]={layer}", run)
    else:
        table = run()
        assert table.per_prompt[layer % 2].isfinite().all() and table.per_prompt[1 - layer % 2].isnan().all()


@SWEEP
@given(answer=st.integers(-3, 6))
def test_reciprocal_ranks_answer_sweep(answer):
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.4]])
    if 0 <= answer < 4:
        expected = 1.0 / (1 + int((scores[0] > scores[0, answer]).sum()))
        assert float(compare.reciprocal_ranks(scores, [answer])[0]) == pytest.approx(expected)
        return
    raises_exactly(OutOfRangeError, "answer=", compare.reciprocal_ranks, scores, [answer])


def test_study_and_comparison_arguments(gpt2):
    raises_exactly(InvalidArgumentError, "routes[0]='both'", head_ranking_study, gpt2, TOKENS, [5, 5], [6, 6],
                   routes=("both",))
    raises_exactly(InvalidArgumentError, "correct=", head_ranking_study, gpt2, TOKENS, [5], [6, 6], routes=())
    raises_exactly(OutOfRangeError, "late_from=-1", compare.head_ranking_table, {"r": torch.ones(2, 4)},
                   {"t": torch.ones(2, 4)}, late_from=-1)
    raises_exactly(InvalidArgumentError, "prompts=", abc_corruption,
                   [IOIPrompt("When Mary and John left, Mary gave a book to", " Mary", " John")])


# ------------------------------------------------------------------ memory


def test_attribute_refuses_what_cannot_fit(padded, monkeypatch):
    monkeypatch.setattr(memory, "MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    err = raises_exactly(InsufficientMemoryError, "max_chunk_bytes", lens_alti.attribute, padded, attention_mask=MASK)
    assert "positions=" in str(err) and "attribute(model, tokens=...)" in str(err)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: None)  # unknown: no check
    assert lens_alti.attribute(padded, attention_mask=MASK).layers.shape == (2, 2, 7, 7)


def test_ablation_refuses_what_cannot_fit(gpt2, monkeypatch):
    monkeypatch.setattr(memory, "MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    raises_exactly(
        InsufficientMemoryError,
        "fewer or shorter prompts",
        ablation.head_ablation,
        gpt2,
        TOKENS,
        ablation.logprob([5, 6]),
    )


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import transformers

    from tests.support.models import hf_model, tokenizer_dir

    folder = tmp_path_factory.mktemp("cli") / "tiny"
    hf_model("gpt2").save_pretrained(folder)  # n_positions = 128
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(folder)
    return str(folder)


def _cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    from lens_alti.cli import main

    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines(), captured.out


def test_cli_bad_arguments_are_one_line(capsys, tiny_folder):
    rc, err, _ = _cli(capsys, "explain", "t5 t6", "--model", tiny_folder, "--top", "-3")
    assert rc == 2 and len(err) == 1 and "--top" in err[0] and "positive integer" in err[0]
    rc, err, _ = _cli(capsys, "explain", "t5 t6", "--model", tiny_folder, "--position", "40")
    assert rc == 2 and err[-1].startswith("lens-alti: error: --position=40 is out of range")
    assert not any("Traceback" in line for line in err)
    rc, err, _ = _cli(capsys, "explain", "t5 t6", "--model", tiny_folder, "--position", "40", "--debug")
    assert rc == 2 and any("Traceback" in line for line in err) and err[-1].startswith("lens-alti: error: --position")


def test_cli_context_length_before_the_forward_pass(capsys, tiny_folder, monkeypatch):
    import transformer_lens.model_bridge

    calls = []
    original = transformer_lens.model_bridge.TransformerBridge.run_with_cache
    monkeypatch.setattr(
        transformer_lens.model_bridge.TransformerBridge,
        "run_with_cache",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    rc, err, _ = _cli(capsys, "explain", " ".join(f"t{i % 50 + 5}" for i in range(300)), "--model", tiny_folder)
    assert rc == 2 and calls == [] and "Traceback" not in "\n".join(err)
    assert "tokens, this model takes at most 128" in err[-1]


def test_cli_memory_check(capsys, tiny_folder, monkeypatch):
    monkeypatch.setattr(memory, "MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10_000)
    rc, err, _ = _cli(capsys, "explain", "t5 t6 t7", "--model", tiny_folder)
    assert rc == 2 and "more memory" in err[-1] and "max_chunk_bytes" in err[-1]


@pytest.mark.slow
def test_cli_encoder_decoder_position_and_top(capsys):
    from lens_alti.models.toy_translation import MODEL_DIR

    rc, err, out = _cli(
        capsys,
        "explain",
        "--source",
        "the cat sees a dog",
        "--target",
        "die katze",
        "--model",
        str(MODEL_DIR),
        "--position",
        "1",
        "--top",
        "2",
    )
    assert rc == 0, err
    block = out.split("for target position 1")[1].split(":\n", 1)[1].strip().splitlines()
    assert len(block) == 2 and all(line.split()[0] in ("source", "target") for line in block)
    rc, err, _ = _cli(
        capsys, "explain", "--source", "the cat", "--target", "die", "--model", str(MODEL_DIR), "--position", "9"
    )
    assert rc == 2 and err[-1].startswith("lens-alti: error: --position=9 is out of range")


def test_cli_unexpected_errors_are_one_line(capsys, monkeypatch, tiny_folder):
    import lens_alti.models.pretrained as pretrained

    def boom(*args, **kwargs):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(pretrained, "load_pretrained", boom)
    rc, err, _ = _cli(capsys, "explain", "t5", "--model", tiny_folder)
    assert rc == 2 and err[-1] == "lens-alti: error: RuntimeError: first line second line"
    assert math.isfinite(rc)


def test_more_alignment_arguments():
    m = torch.rand(4, 3)
    raises_exactly(InvalidArgumentError, "convention='both'", alignment.target_rows, m, 2, "both")
    raises_exactly(InvalidArgumentError, "n_target_tokens=-1", alignment.target_rows, m, -1, "input")
    raises_exactly(InvalidArgumentError, "n_target_tokens=4", alignment.target_rows, m, 4, "input")
    raises_exactly(InvalidArgumentError, "word_matrix=", alignment.extract_alignment, torch.rand(2, 2, 2))
    raises_exactly(InvalidArgumentError, "n_source_words=-2", alignment.diagonal_alignment, -2, 3)
    raises_exactly(InvalidArgumentError, "hypotheses=", alignment.alignment_scores, [set()], [])
    raises_exactly(InvalidArgumentError, "scheme='wordpiece'", alignment.word_ids_from_pieces, ["a"], "wordpiece")
    raises_exactly(
        InvalidArgumentError,
        "source_reduce='max'",
        alignment.aggregate_subwords,
        m,
        [0, 1, 2],
        [0, 1, 2, 3],
        source_reduce="max",
    )


def test_entry_points_refuse_the_wrong_family(padded, seq2seq_result, marian):
    raises_exactly(
        InvalidArgumentError,
        "decoder_attention_mask=",
        lens_alti.attribute,
        padded,
        attention_mask=MASK,
        decoder_attention_mask=MASK,
    )
    _, cache = marian.run_with_cache(torch.tensor([[5, 6, 2]]), decoder_input=torch.tensor([[1, 9]]))
    raises_exactly(InvalidArgumentError, "cache=", lens_alti.attention_rollout, cache)
    raises_exactly(
        InvalidArgumentError, "attention_mask=", lens_alti.attention_rollout, padded, attention_mask=MASK[:1]
    )
