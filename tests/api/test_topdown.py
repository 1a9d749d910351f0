"""Explaining a few positions from the top down (docs/spec.md §12), from a cache or a model's layers run again.

- the rollout rows pushed down as row vectors equal the full rollout's rows: the float64
  reference (tests/support/reference*.py), causal and bidirectional, in chunks of any size;
- every entry point given a model (`attribute(..., positions=)`, `logit_attribution`, `routes`)
  equals the cache path: ≤ 1e-6 with eager attention (the same activations), ≤ 1e-5 with
  recomputed attention (the forward pass runs SDPA, whose float rounding differs);
- every entry point that runs a model refuses a call that cannot fit before its forward pass,
  naming the knob.
"""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.alti import memory
from lens_alti.alti.rows import RowWise
from lens_alti.alti.topdown import RowRollout, chunk_rows
from lens_alti.errors import InsufficientMemoryError
from lens_alti.reading import model_layout
from tests.support.errors import raises_exactly
from tests.support.models import DECODER_ARCHS, build_bridge, build_seq2seq
from tests.support.reference import reference_decoder_only
from tests.support.reference_seq2seq import reference_encoder

N = 9
IDS = torch.randint(4, 1000, (2, N), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[0, 0, 0] + [1] * (N - 3), [1] * N])  # item 0 left-padded by three
ATTRIBUTE = ("layers", "rollout", "heads", "heads_residual", "head_outputs", "head_outputs_residual")
LOGIT = ("by_layer", "tokens", "heads", "head_totals", "mlp", "attn_bias", "embedding", "bias", "logit",
         "completeness_gap")
TOL = {"eager": 1e-6, "recomputed": 1e-5}


def _rows(t: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.stack([t[b].index_select(dim - 1, positions[b]) for b in range(t.shape[0])])


def _same(a, b, fields, tol: float) -> None:
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, atol=tol, rtol=0, msg=name)


@pytest.fixture(scope="module", params=DECODER_ARCHS)
def decoder(request):
    hf, bridge = build_bridge(request.param)
    _, cache = bridge.run_with_cache(IDS, attention_mask=MASK)
    return request.param, hf, bridge, cache


# ------------------------------------------------------------------ the rollout rows


@pytest.mark.parametrize("max_chunk_bytes", [1, 2**28])  # one receiver per chunk, or all at once
def test_rollout_rows_equal_the_reference(decoder, max_chunk_bytes):
    """Right padding (the reference gives left-padded items no shifted position ids)."""
    _, hf, bridge, _ = decoder
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 6:] = 0
    _, cache = bridge.run_with_cache(IDS, attention_mask=mask)
    ref = reference_decoder_only(hf, IDS, attention_mask=mask)
    res = lens_alti.attribute(cache, attention_mask=mask, positions=[-1, 4], max_chunk_bytes=max_chunk_bytes)
    p = res.positions
    assert p.tolist() == [[8, 4], [5, 4]]
    torch.testing.assert_close(res.rollout.double(), _rows(ref["rollout"], p, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.layers.double(), _rows(ref["l1"], p, 2), atol=1e-5, rtol=0)


def test_bidirectional_rollout_rows_equal_the_reference():
    hf, bert = build_seq2seq("bert")
    ids, mask = IDS[:, :8], torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ref = reference_encoder(hf, ids, attention_mask=mask)
    for source in ("cache", "model"):
        if source == "cache":
            _, cache = bert.run_with_cache(ids, attention_mask=mask)
            res = lens_alti.attribute(cache, attention_mask=mask, positions=[0, 2], heads=True, max_chunk_bytes=1)
        else:
            res = lens_alti.attribute(bert, tokens=ids, attention_mask=mask, positions=[0, 2], heads=True)
        torch.testing.assert_close(res.rollout.double(), _rows(ref["rollout"], res.positions, 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(res.heads.double(), _rows(ref["heads"], res.positions, 3), atol=1e-5, rtol=0)


def test_row_vectors_through_a_block_are_the_matrix_product(decoder):
    """`RowRollout.through` is `V @ C` for the block's full contribution matrix, chunked or not, and skips
    the receivers no row vector reaches."""
    _, _, bridge, cache = decoder
    layout = model_layout(bridge)
    block = layout.blocks["self"][1].build(cache)
    valid = MASK.bool()
    full = lens_alti.attribute(cache, attention_mask=MASK).layers[:, 1]  # [b, q, k]
    V = torch.randn(2, 3, N, generator=torch.Generator().manual_seed(0)) * valid[:, None]
    V[:, 0, 5:] = 0
    for budget in (1, 4 * 4 * 4 * N * 2, 2**28):
        roll = RowRollout(2, N, torch.float32, torch.device("cpu"))
        roll.add(V)
        rows, _ = roll.through(RowWise(block, valid, valid, dtype=torch.float32, check=True), "l1",
                               keep=torch.tensor([[3], [6]]), max_chunk_bytes=budget)
        torch.testing.assert_close(roll.vectors, V @ full, atol=1e-6, rtol=0)
        torch.testing.assert_close(rows, _rows(full, torch.tensor([[3], [6]]), 1), atol=1e-6, rtol=0)
    assert chunk_rows(2, 4, N, 4 * 4 * 4 * N * 2) == 1  # two items of four heads: a 2-row budget per item
    calls = []
    roll = RowRollout(2, N, torch.float32, torch.device("cpu"))
    wise = RowWise(block, valid, valid, dtype=torch.float32, check=True)
    for name in ("vectors", "span_vectors"):
        computed = getattr(wise, name)
        setattr(wise, name, lambda positions, computed=computed: calls.append(positions) or computed(positions))
    roll.add(torch.ones(2, 1, N) * valid[:, None])
    roll.through(wise, "l1", max_chunk_bytes=1)
    assert len(calls) == N  # a row vector over every receiver: every receiver computed, one per chunk
    calls.clear()
    roll = RowRollout(2, N, torch.float32, torch.device("cpu"))
    roll.add(torch.zeros(2, 1, N))
    roll.through(wise, "l1", max_chunk_bytes=1)
    assert calls == []  # every row vector is 0: no receiver is computed


# ------------------------------------------------------------------ a model equals its cache


@pytest.mark.parametrize("attention", ["eager", "recomputed"])
def test_attribute_positions_from_a_model_equals_the_cache(decoder, attention):
    _, _, bridge, cache = decoder
    ref = lens_alti.attribute(cache, attention_mask=MASK, heads=True, positions=[-1, 5], tokens=IDS)
    got = lens_alti.attribute(bridge, tokens=IDS, attention_mask=MASK, heads=True, positions=[-1, 5],
                              attention=attention)
    _same(ref, got, ATTRIBUTE, TOL[attention])
    assert got.str_tokens == ref.str_tokens and got.positions.tolist() == ref.positions.tolist()
    torch.testing.assert_close(got.reconstruction_error, ref.reconstruction_error, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["eager", "recomputed"])
def test_logit_attribution_from_a_model_equals_the_cache(decoder, attention):
    _, _, bridge, cache = decoder
    ref = lens_alti.logit_attribution(cache, 5, 7, attention_mask=MASK, tokens=IDS, position=[-1, 4])
    got = lens_alti.logit_attribution(bridge, 5, 7, attention_mask=MASK, tokens=IDS, position=[-1, 4],
                                      attention=attention)
    _same(ref, got, LOGIT, TOL[attention])
    assert got.str_tokens == ref.str_tokens


@pytest.mark.parametrize("attention", ["eager", "recomputed"])
@pytest.mark.parametrize("logit_mode", ["direct", "column"])
def test_routes_from_a_model_equal_the_cache(decoder, attention, logit_mode):
    _, _, bridge, cache = decoder
    kw = {"target": 5, "contrast": 7, "attention_mask": MASK, "tokens": IDS, "logit_mode": logit_mode,
          "threshold": 0.03}
    ref = lens_alti.routes(cache, -1, **kw)
    got = lens_alti.routes(bridge, -1, attention=attention, **kw)
    assert len(ref.edges) == len(got.edges) > 0
    cols = ["layer", "kind", "head", "source", "receiver"]
    assert ref.edges[cols].values.tolist() == got.edges[cols].values.tolist()
    torch.testing.assert_close(torch.tensor(got.edges["weight"].values), torch.tensor(ref.edges["weight"].values),
                               atol=TOL[attention], rtol=0)
    torch.testing.assert_close(got.head_importance, ref.head_importance, atol=TOL[attention], rtol=0)
    assert got.computed_receivers == ref.computed_receivers


def test_routes_read_only_the_layers_the_graph_reaches(monkeypatch):
    """Proximity routes with a high threshold stop early: the layers below are never run again."""
    from lens_alti.reading.replay import LayerReplay

    _, bridge = build_bridge("llama", n_layers=4)
    ran: list[int] = []
    real = LayerReplay.layer
    monkeypatch.setattr(LayerReplay, "layer", lambda self, layer: ran.append(layer) or real(self, layer))
    graph = lens_alti.routes(bridge, -1, tokens=IDS[1:], threshold=0.9)
    reached = {int(layer) for layer in graph.edges["layer"]} if len(graph.edges) else set()
    assert ran[0] == 3 and set(ran) == reached | {3} and len(ran) == len(set(ran))


# ------------------------------------------------------------------ memory is checked before the forward pass


@pytest.fixture
def no_memory(monkeypatch):
    """Nothing fits, and running the model fails the test."""
    monkeypatch.setattr(memory, "MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    from transformer_lens.model_bridge import TransformerBridge

    def forward(*args, **kwargs):
        raise AssertionError("the model ran before its memory was checked")

    monkeypatch.setattr(TransformerBridge, "forward", forward)
    monkeypatch.setattr(TransformerBridge, "run_with_cache", forward)
    monkeypatch.setattr(TransformerBridge, "run_with_hooks", forward)


@pytest.mark.parametrize("attention", ["eager", "recomputed"])
def test_entry_points_refuse_before_the_forward_pass(no_memory, attention):
    _, bridge = build_bridge("llama")
    calls = {
        "attribute": lambda: lens_alti.attribute(bridge, tokens=IDS, positions=[-1], attention=attention),
        "logit_attribution": lambda: lens_alti.logit_attribution(bridge, 5, tokens=IDS, attention=attention),
        "routes": lambda: lens_alti.routes(bridge, tokens=IDS, attention=attention),
    }
    for what, call in calls.items():
        err = raises_exactly(InsufficientMemoryError, what, call)
        assert "shorter text" in str(err) and "max_chunk_bytes" in str(err)
        assert ("[head, n, n]" in str(err)) == (attention == "eager")


def test_streaming_every_position_refuses_before_the_forward_pass(no_memory):
    _, bridge = build_bridge("gpt2")
    err = raises_exactly(InsufficientMemoryError, "attribute", lens_alti.attribute, bridge, tokens=IDS, heads=True)
    assert "positions=" in str(err) and "[head, n, n]" in str(err)


def test_encoder_decoder_logit_attribution_refuses_before_run_with_cache(no_memory):
    _, marian = build_seq2seq("marian")
    src, tgt = torch.tensor([[5, 6, 7, 8, 2]]), torch.tensor([[1, 9, 10, 11]])
    err = raises_exactly(InsufficientMemoryError, "whole cache", lens_alti.logit_attribution, marian, 10,
                         tokens=src, decoder_tokens=tgt)
    assert "shorter text" in str(err)


def test_the_estimate_grows_with_the_input_and_the_eager_scores():
    shape = memory.ModelShape(layers=30, batch=1, pos=8192, heads=9, d_model=576, d_mlp=1536)
    recomputed = memory.replay_bytes(shape, eager=False, max_chunk_bytes=2**28)
    eager = memory.replay_bytes(shape, eager=True, max_chunk_bytes=2**28)
    # the recorded inputs: 30 layers x 8192 positions x 576 floats; eager adds [9 + 9 + 1, n, n] floats
    assert recomputed > 30 * 8192 * 576 * 4
    assert eager - recomputed > 19 * 8192 * 8192 * 4 - 2**27
    half = memory.replay_bytes(memory.ModelShape(30, 1, 4096, 9, 576, 1536), eager=False, max_chunk_bytes=2**28)
    assert half < recomputed < 2.5 * half  # linear in n without the eager scores
