"""Banded Longformer attention (LED's encoder): expansion to dense keys and its refusals.

The numbers of a whole LED model are checked against the independent float64 reference in
tests/api/test_seq2seq.py (the "led" entry of SEQ2SEQ_ARCHS: the reference recomputes the
sliding-window attention from the query/key weights); these tests cover the expansion itself
and every error path of `lens_alti.reading.banded`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lens_alti
from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.banded import BandedEncoderCache, dense_from_band, source_length
from lens_alti.reading.bridge import _encoder_readers
from tests.support.models import build_seq2seq


def _band(b: int, length: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A random band whose columns outside [0, length) are 0 (as Hugging Face's masking leaves them)."""
    band = torch.rand(b, length, h, 2 * w + 1, generator=torch.Generator().manual_seed(seed))
    for i in range(length):
        for c in range(2 * w + 1):
            if not 0 <= i - w + c < length:
                band[:, i, :, c] = 0
    return band


def test_dense_from_band_places_each_column_on_its_key():
    w, n = 2, 6
    band = _band(2, n, 3, w)
    dense = dense_from_band(band, w, n, "x")
    want = torch.zeros(2, 3, n, n)
    for i in range(n):
        for j in range(n):
            if abs(i - j) <= w:
                want[:, :, i, j] = band[:, i, :, j - i + w]
    assert torch.equal(dense, want)
    assert torch.allclose(dense.sum(-1), band[:, :n].sum(-1).transpose(1, 2))


def test_dense_from_band_crops_window_padding():
    w, length, n = 2, 8, 6
    band = _band(1, length, 2, w)
    for i in range(n):  # real receivers put no weight on the window padding (positions n..length-1)
        for c in range(2 * w + 1):
            if i - w + c >= n:
                band[:, i, :, c] = 0
    dense = dense_from_band(band, w, n, "x")
    assert dense.shape == (1, 2, n, n)
    torch.testing.assert_close(dense.sum(-1), band[:, :n].sum(-1).transpose(1, 2))


def test_weight_on_a_cropped_position_is_refused():
    band = _band(1, 8, 2, 2)  # receiver 5 attends to position 6, beyond n = 6
    with pytest.raises(UnsupportedModelError, match="outside them"):
        dense_from_band(band, 2, 6, "encoder_blocks.0.attn")


def test_band_of_wrong_width_is_refused():
    with pytest.raises(UnsupportedModelError, match="needs"):
        dense_from_band(torch.zeros(1, 8, 2, 3), 2, 6, "encoder_blocks.0.attn")


def test_values_of_the_wrong_layout_are_refused():
    cache = {"e.0.attn.hook_pattern": _band(2, 8, 4, 2), "e.0.attn.hook_v": torch.zeros(2, 8, 4, 16)}
    view = BandedEncoderCache(cache, "e.0", "e.0.attn", 2, 6)
    with pytest.raises(UnsupportedModelError, match="sequence-first"):
        view["e.0.attn.hook_v"]
    cache["e.0.attn.hook_v"] = torch.zeros(8, 2, 4, 16)
    assert view["e.0.attn.hook_v"].shape == (2, 6, 4, 16)


def test_missing_source_length_is_refused():
    with pytest.raises(UnsupportedModelError, match="cache lacks"):
        source_length({}, "decoder_blocks.0.cross_attn.hook_pattern", "encoder_blocks.0.attn")


def test_banded_attention_outside_an_encoder_decoder_is_refused():
    inner = SimpleNamespace(one_sided_attn_window_size=2)
    block = SimpleNamespace(attn=SimpleNamespace(_original_component=SimpleNamespace(longformer_self_attn=inner)))
    with pytest.raises(UnsupportedModelError, match="outside an encoder-decoder"):
        _encoder_readers(SimpleNamespace(), [block], "blocks", "LongformerModel")


@pytest.fixture(scope="module")
def led():
    return build_seq2seq("led")


def test_global_attention_is_refused(led):
    _, bridge = led
    src, tgt = torch.randint(4, 1000, (2, 7)), torch.randint(4, 1000, (2, 5))
    glob = torch.zeros(2, 7, dtype=torch.long)
    glob[:, 0] = 1
    _, cache = bridge.run_with_cache(src, decoder_input=tgt, global_attention_mask=glob)
    with pytest.raises(UnsupportedModelError, match="global-attention column"):
        lens_alti.attribute(cache)


def test_led_encoder_is_padded_to_the_window_and_read_at_the_source_length(led):
    _, bridge = led
    src, tgt = torch.randint(4, 1000, (1, 7)), torch.randint(4, 1000, (1, 5))
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    assert cache["encoder_blocks.0.attn.hook_pattern"].shape == (1, 8, 4, 5)  # padded to 8, band of 2·2+1
    res = lens_alti.attribute(cache)
    assert res.encoder.layers.shape == (1, 2, 7, 7)
    assert float(res.encoder.layers[0, 0].triu(3).abs().max()) < 1e-6  # nothing beyond the window in layer 0
    assert float(res.encoder.layers[0, 0].triu(1).abs().max()) > 1e-3


def test_led_streaming_equals_the_cache(led):
    _, bridge = led
    src, tgt = torch.randint(4, 1000, (1, 7)), torch.randint(4, 1000, (1, 5))
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    streamed = lens_alti.attribute(bridge, tokens=src, decoder_tokens=tgt)
    torch.testing.assert_close(streamed.total, lens_alti.attribute(cache).total, atol=1e-6, rtol=0)
