"""ALTI-Logit (lens_alti.logit_attribution) vs the independent float64 reference, completeness and errors."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.errors import (
    ArgumentTypeError,
    CompletenessError,
    InvalidArgumentError,
    LensAltiError,
    MissingHooksError,
    OutOfRangeError,
    UnsupportedModelError,
)
from tests.support.errors import raises_exactly
from tests.support.models import build_seq2seq
from tests.support.reference_logit import close, reference_logit_decoder, reference_logit_marian
from tests.support.tokenizer import tokenizer


def _ids(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run(decoder):
    arch, hf, bridge = decoder
    tokens = _ids(2, 9, 1)
    _, cache = bridge.run_with_cache(tokens)
    return arch, hf, bridge, tokens, cache


@pytest.mark.parametrize("contrast", [None, [17, 23]])
def test_matches_reference(run, contrast):
    arch, hf, _, tokens, cache = run
    target = [5, 11]
    res = lens_alti.logit_attribution(cache, target, contrast, position=[-1, 4])
    ref = reference_logit_decoder(hf, tokens, target, contrast, [8, 4])
    for name in ("heads", "head_totals", "mlp", "attn_bias", "embedding", "bias", "logit", "by_layer", "tokens"):
        close(getattr(res, name), ref[name])
    assert res.heads.abs().max() > 1e-3, "the parts must not be trivially zero"
    assert (res.softcap is not None) == (arch == "gemma2")


def test_float64_is_tighter(run):
    _, hf, _, tokens, cache = run
    res = lens_alti.logit_attribution(cache, 7, 8, dtype=torch.float64)
    ref = reference_logit_decoder(hf, tokens, [7, 7], [8, 8], [8, 8])
    close(res.heads, ref["heads"], 1e-6)
    close(res.tokens, ref["tokens"], 1e-6)


def test_completeness_and_token_sum(run):
    *_, cache = run
    res = lens_alti.logit_attribution(cache, 3, 4)
    # embedding + heads + MLPs + biases = the real logit difference (checked inside, shown here)
    torch.testing.assert_close(res.direct_total, res.logit, atol=1e-4 * float(res.logit.abs().max()), rtol=0)
    assert float(res.completeness_gap.abs().max()) <= 1e-4 * max(1.0, float(res.logit.abs().max()))
    # the tokens' share is the attention and embedding part: Σ tokens = Σ heads + embedding
    torch.testing.assert_close(res.tokens.sum(-1), res.head_totals.sum((1, 2)) + res.embedding, atol=1e-5, rtol=1e-4)
    assert res.heads is not None and res.heads.shape[:3] == res.head_totals.shape


def test_contrast_is_difference_of_targets(run):
    *_, cache = run
    a = lens_alti.logit_attribution(cache, 5)
    b = lens_alti.logit_attribution(cache, 9)
    d = lens_alti.logit_attribution(cache, 5, 9)
    for name in ("tokens", "by_layer", "head_totals", "mlp", "logit", "embedding"):
        torch.testing.assert_close(getattr(d, name), getattr(a, name) - getattr(b, name), atol=1e-5, rtol=1e-4)


def test_padded_batch_equals_single_runs(decoder):
    arch, hf, bridge = decoder
    lengths = [9, 6]
    ids = torch.full((2, 9), 3)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, n in enumerate(lengths):  # left padding
        ids[b, 9 - n :] = _ids(1, n, 20 + b)[0]
        mask[b, 9 - n :] = 1
    _, cache = bridge.run_with_cache(ids, attention_mask=mask)
    res = lens_alti.logit_attribution(cache, [5, 6], [7, 8], attention_mask=mask)
    assert res.position.tolist() == [8, 8]
    for b, n in enumerate(lengths):
        alone_ids = ids[b : b + 1, 9 - n :]
        _, c1 = bridge.run_with_cache(alone_ids)
        one = lens_alti.logit_attribution(c1, [5 + b], [7 + b])
        torch.testing.assert_close(res.tokens[b, 9 - n :], one.tokens[0], atol=1e-4, rtol=1e-4)
        assert float(res.tokens[b, : 9 - n].abs().sum()) == 0
        torch.testing.assert_close(res.logit[b], one.logit[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(res.head_totals[b], one.head_totals[0], atol=1e-4, rtol=1e-4)


def test_token_strings_and_model_input(decoder):
    _, _, bridge = decoder
    ids = _ids(1, 6, 3)
    _, cache = bridge.run_with_cache(ids)
    by_id = lens_alti.logit_attribution(cache, 12, 13)
    by_str = lens_alti.logit_attribution(cache, "t12", "t13", tokens=ids)
    from_model = lens_alti.logit_attribution(bridge, 12, 13, tokens=ids)
    torch.testing.assert_close(by_str.tokens, by_id.tokens)
    torch.testing.assert_close(from_model.tokens, by_id.tokens)
    assert by_str.target_str == ["t12"]
    assert by_str.str_tokens[0][0] == tokenizer().convert_ids_to_tokens([int(ids[0, 0])])[0]
    assert by_str.top_tokens(2)[0][1] in by_str.str_tokens[0]


# ---------------------------------------------------------------- encoder-decoders


@pytest.fixture(scope="module")
def marian():
    hf, bridge = build_seq2seq("marian")
    return hf, bridge


def test_marian_matches_reference(marian):
    hf, bridge = marian
    src, tgt = _ids(2, 6, 5), _ids(2, 5, 6)
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    res = lens_alti.logit_attribution(cache, [9, 10], [11, 12], position=[-1, 2])
    ref = reference_logit_marian(hf, src, tgt, [9, 10], [11, 12], [4, 2])
    assert res.n_source == 6 and res.tokens.shape == (2, 11)
    for name in ("heads", "cross_heads", "head_totals", "cross_head_totals", "mlp", "embedding", "bias", "logit"):
        close(getattr(res, name), ref[name])
    close(res.by_layer, ref["by_layer"])
    close(res.tokens, ref["tokens"])
    assert float(res.tokens[:, :6].abs().sum()) > 0 and float(res.tokens[:, 6:].abs().sum()) > 0
    # sinks are not examined for encoder-decoders (docs/spec.md §10a); top_tokens ranks source then target
    assert res.sinks is None and float(res.sink.abs().sum()) == 0
    top = res.top_tokens(11, batch=0)
    assert sorted(p for p, _, _ in top) == list(range(11))
    assert [v for _, _, v in top] == sorted(res.tokens[0].tolist(), reverse=True)


@pytest.mark.parametrize("arch", ["marian", "bart", "m2m100", "mbart", "t5"])
def test_seq2seq_completeness(arch):
    _, bridge = build_seq2seq(arch)
    src, tgt = _ids(2, 5, 7), _ids(2, 4, 8)
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    res = lens_alti.logit_attribution(cache, 9, 10)
    torch.testing.assert_close(res.direct_total, res.logit, atol=1e-4 * float(res.logit.abs().max()), rtol=0)
    if arch == "marian":  # given the model, it runs it with only the hooks it reads
        direct = lens_alti.logit_attribution(bridge, 9, 10, tokens=src, decoder_tokens=tgt)
        torch.testing.assert_close(direct.tokens, res.tokens)
    # tokens carry exactly the attention and embedding parts
    total = res.head_totals.sum((1, 2)) + res.cross_head_totals.sum((1, 2)) + res.embedding
    torch.testing.assert_close(res.tokens.sum(-1), total, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- errors


def test_completeness_error_names_the_gap(run, monkeypatch):
    *_, cache = run
    import lens_alti.api.logit as prediction

    real = prediction.readout_direction

    def broken(*args, **kwargs):
        w, bias = real(*args, **kwargs)
        return w, bias + 1.0  # a readout bias the model does not have

    monkeypatch.setattr(prediction, "readout_direction", broken)
    with pytest.raises(CompletenessError, match="miss the real logit .* by -1"):
        lens_alti.logit_attribution(cache, 5, 6)
    res = lens_alti.logit_attribution(cache, 5, 6, check=False)
    assert float(res.completeness_gap.abs().min()) > 0.99


def test_argument_errors(run):
    """Each bad argument gets the taxonomy's class, naming the argument and its value."""
    _, _, bridge, tokens, cache = run
    la = lens_alti.logit_attribution
    assert "exactly one token" in str(raises_exactly(InvalidArgumentError, "target='t5 t6'", la, cache, "t5 t6"))
    raises_exactly(OutOfRangeError, f"target={10**6}", la, cache, 10**6)
    raises_exactly(OutOfRangeError, "contrast=-5", la, cache, 1, -5)
    assert "one token per batch item (2)" in str(raises_exactly(InvalidArgumentError, "target=", la, cache, [1, 2, 3]))
    raises_exactly(OutOfRangeError, "position=40", la, cache, 1, position=40)
    raises_exactly(OutOfRangeError, "position=-40", la, cache, 1, position=-40)
    raises_exactly(InvalidArgumentError, "position=", la, cache, 1, position=[1, 2, 3])
    raises_exactly(InvalidArgumentError, "dtype=torch.float16", la, cache, 1, dtype=torch.float16)
    raises_exactly(ArgumentTypeError, "heads='yes'", la, cache, 1, heads="yes")
    raises_exactly(
        InvalidArgumentError, "decoder_attention_mask", la, cache, 1, decoder_attention_mask=torch.ones(2, 9)
    )
    raises_exactly(InvalidArgumentError, "attention_mask", la, cache, 1, attention_mask=torch.ones(2, 5))
    raises_exactly(ArgumentTypeError, "tokens=None", la, bridge, 1)
    _, small = bridge.run_with_cache(tokens, names_filter=lambda n: "hook_pattern" in n)
    with pytest.raises(MissingHooksError, match="logit_attribution reads"):
        la(small, 1)


def test_mask_mismatch_is_refused(run):
    *_, cache = run
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # the cache was run without padding: real attention to these positions
    with pytest.raises(LensAltiError, match="padding"):
        lens_alti.logit_attribution(cache, 1, attention_mask=mask)


def test_encoder_is_refused():
    _, bert = build_seq2seq("bert")
    _, cache = bert.run_with_cache(_ids(1, 5, 0))
    with pytest.raises(UnsupportedModelError, match="no next-token logits"):
        lens_alti.logit_attribution(cache, 1)


def test_final_norm_read_from_behaviour(decoder):
    """Gemma's 1 + w, LayerNorm's β and RMSNorm's gain come out of the probes, whatever the class."""
    from lens_alti.reading.logit import apply_norm, probe_norm

    arch, _, bridge = decoder
    norm = probe_norm(bridge.ln_final, 64, "ln_final")
    inner = bridge.ln_final._original_component
    want_gain = inner.weight.detach().double() + (1.0 if arch == "gemma2" else 0.0)
    torch.testing.assert_close(norm.gain, want_gain, atol=1e-5, rtol=1e-5)
    assert norm.kind == ("layernorm" if arch in ("gpt2", "neox") else "rmsnorm")
    x = torch.randn(3, 64)
    torch.testing.assert_close(apply_norm(norm, x), bridge.ln_final(x[None])[0].double(), atol=1e-5, rtol=1e-5)


def test_norm_errors(run, monkeypatch):
    import lens_alti.reading.logit as unembed
    from lens_alti.reading.logit import FinalNorm, probe_norm

    *_, cache = run
    with pytest.raises(UnsupportedModelError, match="epsilon"):
        probe_norm(torch.nn.Identity(), 64, "ln_final")
    real = unembed.probe_norm
    monkeypatch.setattr(
        unembed, "probe_norm", lambda *a: FinalNorm("rmsnorm", 2 * real(*a).gain, None, real(*a).eps)
    )
    with pytest.raises(UnsupportedModelError, match="does not behave as a rmsnorm"):
        lens_alti.logit_attribution(cache, 1)
    monkeypatch.setattr(unembed, "probe_norm", real)
    original = cache.cache_dict["unembed.hook_in"]
    cache.cache_dict["unembed.hook_in"] = original + torch.randn_like(original)
    try:
        with pytest.raises(UnsupportedModelError, match="does not read the final norm"):
            lens_alti.logit_attribution(cache, 1)
    finally:
        cache.cache_dict["unembed.hook_in"] = original


def test_model_without_unembedding_is_refused(run):
    from types import SimpleNamespace

    from lens_alti.reading import model_layout
    from lens_alti.reading.logit import logit_layout

    _, _, bridge, _, _ = run
    layout = model_layout(bridge)
    with pytest.raises(UnsupportedModelError, match="no unembedding"):
        logit_layout(SimpleNamespace(cfg=bridge.cfg), layout)


def test_layout_without_attention_is_refused(run, monkeypatch):
    *_, cache = run
    import dataclasses

    import lens_alti.api.logit as prediction

    real = prediction.logit_layout

    def writes_only(model, layout):
        out = real(model, layout)
        return dataclasses.replace(out, steps=[s for s in out.steps if s.kind == "write"])

    monkeypatch.setattr(prediction, "logit_layout", writes_only)
    with pytest.raises(UnsupportedModelError, match="no attention"):
        lens_alti.logit_attribution(cache, 5, 6, check=False)
