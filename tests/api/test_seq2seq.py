"""ALTI for encoders (BERT) and ALTI+ for encoder-decoders vs the independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.alti.rollout import encoder_decoder_rollout
from tests.support.models import SEQ2SEQ_ARCHS, build_seq2seq
from tests.support.reference_seq2seq import reference_encoder, reference_seq2seq

TOL = 1e-5


def _ids(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=0)


# ---------------------------------------------------------------- encoder-only (BERT, post-LN)


@pytest.fixture(scope="module")
def bert():
    return build_seq2seq("bert")


@pytest.mark.parametrize("measure", ["l1", "l2", "koba", "attention"])
def test_bert_matches_reference(bert, measure):
    hf, bridge = bert
    ids = _ids(2, 8, 0)
    _, cache = bridge.run_with_cache(ids)
    res = lens_alti.attribute(cache, measure=measure, heads=True)
    ref = reference_encoder(hf, ids)
    assert isinstance(res, lens_alti.AltiResult) and res.architecture == "BertForMaskedLM"
    close(res.layers, ref[measure])
    assert float(res.layers.triu(1).sum()) > 0, "an encoder is not causal"
    if measure == "l1":
        close(res.rollout, ref["rollout"])
        close(res.heads, ref["heads"])
        close(res.heads_residual, ref["heads_residual"])


def test_bert_padding_each_item_equals_running_alone(bert):
    hf, bridge = bert
    lengths = [8, 5]
    ids = torch.full((2, 8), 3)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = _ids(1, n, 10 + b)[0]
        mask[b, :n] = 1
    _, cache = bridge.run_with_cache(ids, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask, heads=True)
    close(res.layers, reference_encoder(hf, ids, mask)["l1"])
    for b, n in enumerate(lengths):
        _, alone = bridge.run_with_cache(ids[b : b + 1, :n])
        single = lens_alti.attribute(alone, heads=True)
        torch.testing.assert_close(res.rollout[b, :, :n, :n], single.rollout[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.heads[b, :, :, :n, :n], single.heads[0], atol=1e-5, rtol=0)
        assert (res.layers[b, :, n:] == 0).all() and (res.layers[b, :, :, n:] == 0).all()


# ---------------------------------------------------------------- encoder-decoders


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHS)
def seq2seq(request):
    hf, bridge = build_seq2seq(request.param)
    src, tgt = _ids(2, 7, 1), _ids(2, 5, 2)
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    return request.param, hf, bridge, src, tgt, cache, reference_seq2seq(hf, src, tgt)


def test_seq2seq_blocks_match_reference(seq2seq):
    arch, _, _, _, _, cache, ref = seq2seq
    res = lens_alti.attribute(cache, heads=True)
    assert isinstance(res, lens_alti.Seq2SeqAltiResult)
    for kind, errs in res.reconstruction_error.items():
        assert len(errs) == 2 and float(errs.max()) < 1e-5, (kind, errs)
    close(res.encoder.layers, ref["encoder_l1"])
    close(res.encoder.rollout, ref["encoder_rollout"])
    close(res.decoder_self, ref["decoder_self"])
    close(res.cross, ref["cross"])
    close(res.encoder.heads, ref["encoder_heads"])
    close(res.encoder.heads_residual, ref["encoder_heads_residual"])
    close(res.decoder_self_heads, ref["decoder_self_heads"])
    close(res.decoder_self_heads_residual, ref["decoder_self_heads_residual"])
    close(res.cross_heads, ref["cross_heads"])
    close(res.cross_heads_residual, ref["cross_heads_residual"])
    assert (res.decoder_self.triu(1) == 0).all()


@pytest.mark.parametrize("measure", ["l2", "koba"])
def test_seq2seq_other_measures_match_reference(seq2seq, measure):
    *_, cache, ref = seq2seq
    res = lens_alti.attribute(cache, measure=measure)
    close(res.encoder.layers, ref[f"encoder_{measure}"])
    close(res.decoder_self, ref[f"decoder_self_{measure}"])
    close(res.cross, ref[f"cross_{measure}"])


def test_attention_measure_has_no_residual_column(seq2seq):
    *_, cache, ref = seq2seq
    res = lens_alti.attribute(cache, measure="attention")
    assert (res.cross[..., -1] == 0).all()
    close(res.cross[..., :-1], ref["cross_attention"])


def test_alti_plus_total_matches_reference_and_block_product(seq2seq):
    arch, *_, cache, ref = seq2seq
    res = lens_alti.attribute(cache)
    close(res.total, ref["total"])
    close(res.total[:, -1], ref["total_blockproduct"])
    close(res.source_contribution, ref["source_contribution"])
    torch.testing.assert_close(res.source_contribution + res.target_contribution, torch.ones(2, 5))
    # The cross-attention path matters in these models (init_std raised): not a residual-only picture.
    assert float(res.source_contribution.mean()) > 0.05, res.source_contribution


def test_seq2seq_padding_each_item_equals_running_alone(seq2seq):
    arch, hf, bridge, *_ = seq2seq
    src_len, tgt_len = [7, 4], [5, 3]
    src, tgt = torch.full((2, 7), 3), torch.full((2, 5), 3)
    smask, tmask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    for b in range(2):
        src[b, : src_len[b]] = _ids(1, src_len[b], 20 + b)[0]
        tgt[b, : tgt_len[b]] = _ids(1, tgt_len[b], 30 + b)[0]
        smask[b, : src_len[b]] = 1
        tmask[b, : tgt_len[b]] = 1
    _, cache = bridge.run_with_cache(src, decoder_input=tgt, attention_mask=smask, decoder_attention_mask=tmask)
    res = lens_alti.attribute(cache, attention_mask=smask, decoder_attention_mask=tmask, heads=True)
    ref = reference_seq2seq(hf, src, tgt, smask, tmask)
    close(res.total, ref["total"])
    close(res.cross_heads, ref["cross_heads"])
    for b in range(2):
        s, t = src_len[b], tgt_len[b]
        _, alone = bridge.run_with_cache(src[b : b + 1, :s], decoder_input=tgt[b : b + 1, :t])
        single = lens_alti.attribute(alone, heads=True)
        torch.testing.assert_close(res.cross[b, :, :t, :s], single.cross[0, :, :, :s], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.cross[b, :, :t, -1], single.cross[0, :, :, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.total[b, :, :t, :s], single.total[0, :, :, :s], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.total[b, :, :t, 7 : 7 + t], single.total[0, :, :, s:], atol=1e-5, rtol=0)
        assert (res.total[b, :, t:] == 0).all(), "padded target rows are 0"
        assert (res.total[b, :, :, s:7] == 0).all(), "padded source columns are 0"


def test_block_product_identity_on_random_matrices():
    g = torch.Generator().manual_seed(0)
    s, t, n_layers = 4, 3, 3

    def stochastic(*shape):
        m = torch.rand(*shape, generator=g, dtype=torch.float64)
        return m / m.sum(-1, keepdim=True)

    r_enc = stochastic(1, s, s)
    cross = stochastic(1, n_layers, t, s + 1)
    dself = stochastic(1, n_layers, t, t).tril()
    dself = dself / dself.sum(-1, keepdim=True)
    total = encoder_decoder_rollout(r_enc, cross, dself)
    prod = torch.eye(s + t, dtype=torch.float64)
    for layer in range(n_layers):
        j = torch.cat([cross[0, layer, :, :s], dself[0, layer] * cross[0, layer, :, s:]], dim=-1)
        m = torch.zeros(s + t, s + t, dtype=torch.float64)
        m[:s, :s] = torch.eye(s)
        m[s:, :s] = j[:, :s] @ r_enc[0]
        m[s:, s:] = j[:, s:]
        prod = m @ prod
    torch.testing.assert_close(total[0, -1], prod[s:])


def test_run_without_decoder_input_is_an_error():
    _, bridge = build_seq2seq("marian", seed=1)
    _, cache = bridge.run_with_cache(_ids(1, 6, 3))
    with pytest.raises(lens_alti.LensAltiError, match="decoder_input="):
        lens_alti.attribute(cache)


def test_missing_cross_patterns_is_an_error(seq2seq):
    *_, bridge, src, tgt, _, _ = seq2seq
    _, cache = bridge.run_with_cache(src, decoder_input=tgt, names_filter=lambda n: "cross_attn.hook_pattern" not in n)
    with pytest.raises(lens_alti.MissingHooksError, match=r"decoder_blocks\.0\.cross_attn\.hook_pattern"):
        lens_alti.attribute(cache)


def test_labels_for_both_sides(seq2seq):
    *_, bridge, src, tgt, cache, _ = seq2seq
    res = lens_alti.attribute(cache, tokens=src, decoder_tokens=tgt)
    top = res.top_sources(-1, k=4, batch=0)
    assert len(top) == 4 and {side for side, *_ in top} <= {"source", "target"}
    assert res.source_str_tokens[0] == list(bridge.to_str_tokens(src[0]))
