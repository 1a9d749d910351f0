"""Streaming `attribute(model, tokens=...)` gives the cache path's numbers (≤ 1e-6).

The cache path is itself checked against the independent float64 references in
tests/support/reference*.py; here every family the tests cover is run both ways, with and without
padding.
"""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.alti.collect import LayerCollector
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError
from lens_alti.reading import model_layout
from lens_alti.reading.stream import stream_blocks
from tests.support.errors import raises_exactly
from tests.support.models import build_seq2seq

TOL = 1e-6
FIELDS = ("layers", "rollout", "heads", "heads_residual", "head_outputs", "head_outputs_residual")


def _ids(batch: int, pos: int, seed: int, first: int | None = None) -> torch.Tensor:
    ids = torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))
    if first is not None:
        ids[:, 0] = first
    return ids


def _mask(batch: int, pos: int, pad: dict[int, int], left: bool) -> torch.Tensor:
    mask = torch.ones(batch, pos, dtype=torch.long)
    for b, n in pad.items():
        if left:
            mask[b, :n] = 0
        else:
            mask[b, pos - n :] = 0
    return mask


def _same(a, b, fields=FIELDS) -> None:
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert x.shape == y.shape, name
        torch.testing.assert_close(x, y, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("padded", [False, True])
def test_decoders_stream_equals_cache(decoder, padded):
    arch, _, bridge = decoder
    ids = _ids(2, 9, 3)
    kw = {"attention_mask": _mask(2, 9, {0: 3}, left=True)} if padded else {}
    _, cache = bridge.run_with_cache(ids, **kw)
    ref = lens_alti.attribute(cache, heads=True, tokens=ids, **kw)  # tokens: labels only
    got = lens_alti.attribute(bridge, tokens=ids, heads=True, **kw)
    _same(ref, got)
    torch.testing.assert_close(ref.reconstruction_error, got.reconstruction_error)
    labels = [bridge.to_str_tokens(row) for row in ids]  # the model's own token strings, padding included
    assert got.str_tokens == ref.str_tokens == labels


@pytest.mark.parametrize("measure", ["l2", "koba", "attention"])
def test_other_measures_stream_equals_cache(decoder, measure):
    _, _, bridge = decoder
    ids = _ids(1, 7, 4)
    _, cache = bridge.run_with_cache(ids)
    _same(lens_alti.attribute(cache, measure=measure), lens_alti.attribute(bridge, tokens=ids, measure=measure))


@pytest.mark.parametrize("padded", [False, True])
def test_bert_stream_equals_cache(padded):
    _, bridge = build_seq2seq("bert")
    ids = _ids(2, 8, 5)
    kw = {"attention_mask": _mask(2, 8, {1: 3}, left=False)} if padded else {}
    _, cache = bridge.run_with_cache(ids, **kw)
    _same(lens_alti.attribute(cache, heads=True, **kw), lens_alti.attribute(bridge, tokens=ids, heads=True, **kw))


@pytest.mark.parametrize("arch", ["t5", "marian", "bart"])
@pytest.mark.parametrize("padded", [False, True])
def test_seq2seq_stream_equals_cache(arch, padded):
    _, bridge = build_seq2seq(arch)
    src, tgt = _ids(2, 7, 6), _ids(2, 5, 7, first=0 if arch == "t5" else 1)
    kw = {}
    if padded:
        kw = {
            "attention_mask": _mask(2, 7, {1: 2}, left=False),
            "decoder_attention_mask": _mask(2, 5, {1: 1}, left=False),
        }
    _, cache = bridge.run_with_cache(src, decoder_input=tgt, **kw)
    ref = lens_alti.attribute(cache, heads=True, tokens=src, decoder_tokens=tgt, **kw)  # tokens: labels only
    got = lens_alti.attribute(bridge, tokens=src, decoder_tokens=tgt, heads=True, **kw)
    assert got.source_str_tokens == ref.source_str_tokens == [bridge.to_str_tokens(row) for row in src]
    assert got.target_str_tokens == ref.target_str_tokens == [bridge.to_str_tokens(row) for row in tgt]
    _same(ref.encoder, got.encoder)
    fields = ("decoder_self", "cross", "total", "decoder_self_heads", "cross_heads", "cross_heads_residual")
    _same(ref, got, fields)
    for kind, err in ref.reconstruction_error.items():
        torch.testing.assert_close(err, got.reconstruction_error[kind])


def test_texts_are_left_padded_and_masked(decoder):
    _, _, bridge = decoder
    texts = ["a b c d e", "f g"]
    got = lens_alti.attribute(bridge, tokens=texts, heads=True)
    rows = [bridge.to_tokens(t)[0] for t in texts]
    n = max(len(r) for r in rows)
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :], mask[i, n - len(r) :] = r, 1
    _, cache = bridge.run_with_cache(ids, attention_mask=mask)
    _same(lens_alti.attribute(cache, attention_mask=mask, heads=True), got)
    assert got.attention_mask.tolist() == mask.tolist()
    one = lens_alti.attribute(bridge, tokens=texts[1])
    assert one.layers.shape[-1] == len(rows[1])


def test_output_device_gathers_results(decoder):
    _, _, bridge = decoder
    res = lens_alti.attribute(bridge, tokens=_ids(1, 5, 8), heads=True, output_device="cpu")
    assert {t.device.type for t in (res.layers, res.rollout, res.heads, res.attention_mask)} == {"cpu"}


def test_activations_are_dropped_after_each_block(decoder):
    """While block l is measured, no activation of an earlier block is still held."""
    _, _, bridge = decoder
    layout = model_layout(bridge)
    seen: list[tuple[int, int]] = []
    import gc

    def block_dicts() -> list[dict]:
        return [
            obj for obj in gc.get_objects()
            # type(), not isinstance(): gc may hold dead weak proxies, which raise ReferenceError when touched
            if issubclass(type(obj), dict) and obj and all(isinstance(k, str) and k.startswith("blocks.") for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values())
        ]

    # Caches other tests left alive (fixtures) are not this stream's; keep them referenced so ids stay unique.
    earlier = block_dicts()
    earlier_ids = {id(obj) for obj in earlier}

    def live_layers() -> set[int]:
        out = set()
        for obj in block_dicts():
            if id(obj) not in earlier_ids:
                out |= {int(k.split(".")[1]) for k in obj}
        return out

    def on_block(kind: str, layer: int, block) -> None:
        seen.append((layer, min(live_layers() or {layer})))

    stream_blocks(bridge, layout, {"input": _ids(1, 6, 9)}, on_block)
    assert [layer for layer, _ in seen] == list(range(len(layout.blocks["self"])))
    assert all(oldest >= layer for layer, oldest in seen)


def test_errors(decoder):
    _, _, bridge = decoder
    raises_exactly(ArgumentTypeError, "tokens=None", lens_alti.attribute, bridge)
    err = raises_exactly(ArgumentTypeError, "tokens=", lens_alti.attribute, bridge, tokens=torch.rand(1, 4))
    assert "integer token ids" in str(err)
    err = raises_exactly(
        InvalidArgumentError, "attention_mask", lens_alti.attribute, bridge, tokens=["a b", "c"],
        attention_mask=torch.ones(2, 3),
    )
    assert "list of texts" in str(err)
    with pytest.raises(lens_alti.MissingHooksError, match="never appeared") as err:
        # A forward that stops after block 0: block 1's activations never exist.
        stream_blocks(bridge, model_layout(bridge), {"input": _ids(1, 4, 1), "stop_at_layer": 1}, lambda *a: None)
    assert all(name.startswith("blocks.1.") for name in err.value.missing)


def test_seq2seq_needs_target_prefix():
    _, bridge = build_seq2seq("marian")
    err = raises_exactly(InvalidArgumentError, "decoder_tokens=None", lens_alti.attribute, bridge, tokens=_ids(1, 5, 2))
    assert "target prefix" in str(err)


def test_collector_errors():
    valid = torch.ones(1, 3, dtype=torch.bool)
    col = LayerCollector(2, valid, valid, measure="l1", heads=False, max_chunk_bytes=2**20, backend="eager",
                         rollout=True)
    with pytest.raises(lens_alti.LensAltiError, match="never arrived"):
        col.finish()
