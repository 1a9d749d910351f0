"""ALTI / ALTI+ through inseq's own API ("alti", "alti_plus") equal lens_alti's result for the same inputs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("inseq", reason="inseq is an optional extra (see README: ALTI+ for inseq users)")
import inseq  # noqa: E402
import transformers  # noqa: E402

import lens_alti  # noqa: E402
import lens_alti.interop.inseq as lens_inseq  # noqa: E402
from lens_alti.errors import UnsupportedModelError  # noqa: E402
from tests.support.models import boot, hf_model, hf_seq2seq  # noqa: E402
from tests.support.tokenizer import tokenizer_dir  # noqa: E402


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A fresh tokenizer per model: inseq sets padding sides on the tokenizer it is given."""
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir())


# Single-digit word tokens: the test tokenizer maps each to one id.
PROMPTS = ["t4 t5 t6 t7", "t8 t9"]
TARGETS = ["t5 t6 t7", "t4 t9"]


def _close_where_defined(got: torch.Tensor, want: torch.Tensor) -> None:
    """inseq fills key positions after the query with NaN; compare the rest."""
    defined = ~torch.isnan(got)
    assert defined.any()
    torch.testing.assert_close(got[defined], want[defined].to(got.dtype), atol=1e-6, rtol=0)


def test_methods_are_registered():
    assert lens_inseq.register() == ["alti", "alti_plus"]
    assert {"alti", "alti_plus"} <= set(inseq.list_feature_attribution_methods())


def test_alti_for_decoder_only_equals_lens_alti():
    hf = hf_model("gpt2")
    own = boot(copy.deepcopy(hf))
    model = inseq.load_model(hf, "alti", tokenizer=tokenizer())
    out = model.attribute(PROMPTS, generation_args={"max_new_tokens": 3, "do_sample": False}, show_progress=False)
    assert len(out.sequence_attributions) == 2
    for seq in out.sequence_attributions:
        ids = torch.tensor([[t.id for t in seq.target]])
        _, cache = own.run_with_cache(ids)
        rollout = lens_alti.attribute(cache).rollout[0, -1]  # [query, key]
        steps = range(seq.attr_pos_start, seq.attr_pos_end)
        # inseq: target_attributions[key, step]; the step that generates token t is explained at query t - 1.
        want = torch.stack([rollout[t - 1, : len(seq.target)] for t in steps], dim=1)
        assert seq.target_attributions.shape == want.shape
        _close_where_defined(seq.target_attributions, want)
        sums = seq.target_attributions.nan_to_num().sum(0)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_alti_plus_for_encoder_decoder_equals_lens_alti(tmp_path):
    hf = hf_seq2seq("marian")
    own = boot(copy.deepcopy(hf))
    model = inseq.load_model(hf, "alti_plus", tokenizer=tokenizer())
    out = model.attribute(PROMPTS, TARGETS, attribute_target=True, show_progress=False)
    assert len(out.sequence_attributions) == 2
    for seq in out.sequence_attributions:
        src = torch.tensor([[t.id for t in seq.source]])
        tgt = torch.tensor([[t.id for t in seq.target]])
        _, cache = own.run_with_cache(src, decoder_input=tgt[:, :-1])
        total = lens_alti.attribute(cache).total[0, -1]  # [tgt - 1, src + tgt - 1]
        s, steps = src.shape[1], range(seq.attr_pos_start, seq.attr_pos_end)
        want_src = torch.stack([total[t - 1, :s] for t in steps], dim=1)
        want_tgt = torch.stack(
            [torch.cat([total[t - 1, s:], total.new_zeros(1)])[: tgt.shape[1]] for t in steps], dim=1
        )
        _close_where_defined(seq.source_attributions, want_src)
        _close_where_defined(seq.target_attributions, want_tgt)
        both = seq.source_attributions.sum(0) + seq.target_attributions.nan_to_num().sum(0)
        torch.testing.assert_close(both, torch.ones_like(both), atol=1e-5, rtol=0)
    # inseq's own tools work on the output
    assert isinstance(out.show(return_html=True, display=False), str)
    out.aggregate()
    out.save(tmp_path / "alti_plus.json")
    assert (tmp_path / "alti_plus.json").stat().st_size > 0


def test_source_only_alti_plus_drops_the_target_side():
    model = inseq.load_model(hf_seq2seq("marian"), "alti_plus", tokenizer=tokenizer())
    out = model.attribute(PROMPTS[:1], TARGETS[:1], show_progress=False)
    seq = out.sequence_attributions[0]
    assert seq.target_attributions is None and seq.source_attributions is not None


def test_wrong_family_is_refused_clearly():
    model = inseq.load_model(hf_seq2seq("marian"), "alti", tokenizer=tokenizer())
    with pytest.raises(UnsupportedModelError, match="alti_plus"):
        model.attribute(PROMPTS[:1], TARGETS[:1], show_progress=False)
    dec = inseq.load_model(hf_model("gpt2"), "alti_plus", tokenizer=tokenizer())
    with pytest.raises(UnsupportedModelError, match="'alti'"):
        dec.attribute(PROMPTS[:1], generation_args={"max_new_tokens": 1}, show_progress=False)


def test_bad_measure_is_refused():
    model = inseq.load_model(hf_model("gpt2"), "alti", tokenizer=tokenizer())
    with pytest.raises(lens_alti.LensAltiError, match="measure"):
        model.attribute(PROMPTS[:1], generation_args={"max_new_tokens": 1}, measure="cosine", show_progress=False)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_stepwise_mode_gives_the_same_scores_and_step_functions_work(family):
    """stepwise=True: inseq's per-step loop (batched and padded), so step_scores work; same numbers."""
    if family == "decoder":
        hf, method, args = hf_model("gpt2"), "alti", {"generation_args": {"max_new_tokens": 3, "do_sample": False}}
        call = (PROMPTS,)
    else:
        hf, method, args = hf_seq2seq("marian"), "alti_plus", {"attribute_target": True}
        call = (PROMPTS, TARGETS)
    stepwise = inseq.load_model(hf, method, tokenizer=tokenizer(), stepwise=True)
    whole = inseq.load_model(hf, method, tokenizer=tokenizer())
    a = stepwise.attribute(*call, step_scores=["probability"], show_progress=False, **args)
    b = whole.attribute(*call, show_progress=False, **args)
    for sa, sb in zip(a.sequence_attributions, b.sequence_attributions, strict=True):
        assert sa.step_scores["probability"].shape == (sa.attr_pos_end - sa.attr_pos_start,)
        for name in ("source_attributions", "target_attributions"):
            x, y = getattr(sa, name), getattr(sb, name)
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(torch.isnan(x), torch.isnan(y))
                torch.testing.assert_close(x.nan_to_num(), y.nan_to_num(), atol=1e-6, rtol=0)
