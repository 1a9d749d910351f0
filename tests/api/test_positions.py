"""`positions=`: per-head results for the receivers of interest only, exact rollout.

Rows are checked against the independent float64 references (tests/support/reference*.py), and
the per-head kernels are checked to run for those rows only.
"""

from __future__ import annotations

import pytest
import torch

import lens_alti
import lens_alti.alti.contributions as contributions
from lens_alti.alti.contributions import block_contributions, head_output_contributions
from lens_alti.alti.decompose import decompose
from lens_alti.alti.receivers import rollout_rows, select_receivers
from lens_alti.api.inputs import receivers
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError, PaddedPositionError
from lens_alti.reading import model_layout
from tests.support.models import build_seq2seq
from tests.support.reference import reference_decoder_only
from tests.support.reference_seq2seq import reference_encoder

TOL = 1e-5


def _ids(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _rows(t: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """t[b, ..., positions[b, r], ...] along `dim`."""
    return torch.stack([t[b].index_select(dim - 1, positions[b]) for b in range(t.shape[0])])


@pytest.mark.parametrize("padding", ["none", "right"])
def test_rows_match_reference(decoder, padding):
    _, hf, bridge = decoder
    ids = _ids(2, 9, 11)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padding == "right":
        mask[1, 6:] = 0
    kw = {} if padding == "none" else {"attention_mask": mask}
    ref = reference_decoder_only(hf, ids, **kw)
    res = lens_alti.attribute(bridge, tokens=ids, heads=True, positions=[-1, 0], **kw)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # last real token of each item
    assert res.positions[:, 0].tolist() == last.tolist()
    p = res.positions
    assert res.heads.shape == (2, bridge.cfg.n_layers, bridge.cfg.n_heads, 2, 9)
    torch.testing.assert_close(res.rollout.double(), _rows(ref["rollout"], p, 2), atol=TOL, rtol=0)
    torch.testing.assert_close(res.layers.double(), _rows(ref["l1"], p, 2), atol=TOL, rtol=0)
    torch.testing.assert_close(res.heads.double(), _rows(ref["heads"], p, 3), atol=TOL, rtol=0)
    torch.testing.assert_close(res.heads_residual.double(), _rows(ref["heads_residual"], p, 2), atol=TOL, rtol=0)


def test_left_padded_rows_equal_the_full_result(decoder):
    """Left padding (the full cache path is checked against items run alone in test_decoder)."""
    _, _, bridge = decoder
    ids = _ids(2, 8, 12)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    _, cache = bridge.run_with_cache(ids, attention_mask=mask)
    full = lens_alti.attribute(cache, heads=True, attention_mask=mask)
    chosen = torch.zeros(2, 8, dtype=torch.bool)
    chosen[0, [3, 5]] = True
    chosen[1, [1, 7]] = True
    by_mask = lens_alti.attribute(cache, heads=True, positions=chosen, attention_mask=mask)
    by_index = lens_alti.attribute(
        bridge, tokens=ids, heads=True, positions=torch.tensor([[-5, -3], [1, 7]]), attention_mask=mask
    )
    # The rows are computed a chunk of receivers at a time (docs/spec.md §12): each receiver's output
    # y_i is summed over fewer rows than in the all-positions result, a float32 rounding difference
    # (≤ 1e-6 relative in y) that the per-head shares can amplify to a few 1e-6.
    for res in (by_mask, by_index):
        assert res.positions.tolist() == [[3, 5], [1, 7]]
        for name in ("layers", "rollout", "heads_residual", "head_outputs_residual"):
            torch.testing.assert_close(getattr(res, name), _rows(getattr(full, name), res.positions, 2), atol=1e-5,
                                       rtol=0)
        torch.testing.assert_close(res.head_outputs, _rows(full.head_outputs, res.positions, 3), atol=1e-5, rtol=0)


def test_bidirectional_encoder_rollout_is_exact():
    hf, bridge = build_seq2seq("bert")
    ids = _ids(2, 8, 13)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ref = reference_encoder(hf, ids, mask)
    res = lens_alti.attribute(bridge, tokens=ids, attention_mask=mask, positions=[0, -1], heads=True)
    assert res.positions.tolist() == [[0, 7], [0, 4]]
    torch.testing.assert_close(res.rollout.double(), _rows(ref["rollout"], res.positions, 2), atol=TOL, rtol=0)
    torch.testing.assert_close(res.heads.double(), _rows(ref["heads"], res.positions, 3), atol=TOL, rtol=0)


def test_seq2seq_positions_restrict_decoder_heads():
    _, bridge = build_seq2seq("marian")
    src, tgt = _ids(1, 6, 14), _ids(1, 4, 15)
    tgt[:, 0] = 1
    full = lens_alti.attribute(bridge, tokens=src, decoder_tokens=tgt, heads=True)
    res = lens_alti.attribute(bridge, tokens=src, decoder_tokens=tgt, heads=True, positions="last")
    assert res.positions.tolist() == [[3]]
    torch.testing.assert_close(res.cross_heads[:, :, :, 0], full.cross_heads[:, :, :, 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(res.decoder_self_heads[:, :, :, 0], full.decoder_self_heads[:, :, :, 3], atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(res.total, full.total, atol=1e-6, rtol=0)


def test_per_head_kernels_run_for_the_positions_only(decoder, monkeypatch):
    _, _, bridge = decoder
    rows: list[int] = []
    real = contributions.get_kernel

    def counting(name, compiled):
        kernel = real(name, compiled)
        if name != "l1+heads":
            return kernel

        def run(y, s, a, vo):
            rows.append(a.shape[1])
            return kernel(y, s, a, vo)

        return run

    monkeypatch.setattr(contributions, "get_kernel", counting)
    lens_alti.attribute(bridge, tokens=_ids(1, 12, 16), heads=True, positions=[-1], backend="eager")
    assert sum(rows) == bridge.cfg.n_layers  # one receiver row per layer
    rows.clear()
    lens_alti.attribute(bridge, tokens=_ids(1, 12, 16), heads=True, backend="eager")
    assert sum(rows) == 12 * bridge.cfg.n_layers


def test_select_receivers_on_cross_attention():
    """Restricted rows equal the full block's rows for the residual-last (cross) layout too."""
    _, bridge = build_seq2seq("bart")
    src, tgt = _ids(2, 6, 17), _ids(2, 5, 18)
    _, cache = bridge.run_with_cache(src, decoder_input=tgt)
    layout = model_layout(bridge)
    pos = torch.tensor([[4, 1], [0, 3]])
    for kind in ("cross", "decoder_self"):
        tv = decompose(layout.blocks[kind][1].build(cache))
        for measure in ("l1", "l2", "koba", "attention"):
            full = block_contributions(tv, measure, heads=True, backend="eager")
            part = block_contributions(select_receivers(tv, pos), measure, heads=True, backend="eager")
            torch.testing.assert_close(part.tokens, _rows(full.tokens, pos, 1), atol=1e-6, rtol=0)
            torch.testing.assert_close(part.heads, _rows(full.heads, pos, 2), atol=1e-6, rtol=0)
        twice = select_receivers(select_receivers(tv, pos), torch.tensor([[1], [0]]))
        assert twice.receivers.tolist() == [[1], [0]]
        outputs = head_output_contributions(twice)[0]
        torch.testing.assert_close(outputs, _rows(head_output_contributions(tv)[0], twice.receivers, 2))


def test_rollout_rows():
    pos = torch.tensor([[3, 7], [2, 5]])
    assert rollout_rows(pos, 10, causal=True) == 8
    assert rollout_rows(pos, 10, causal=False) == 10


def test_result_methods_use_positions(decoder):
    _, _, bridge = decoder
    ids = _ids(1, 6, 19)
    full = lens_alti.attribute(bridge, tokens=ids)
    res = lens_alti.attribute(bridge, tokens=ids, positions=[2, -1])
    for position, k in ((-1, 3), (2, 2)):  # the same sources; values equal up to float32 rounding
        got, want = res.top_sources(position, k=k), full.top_sources(position, k=k)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        torch.testing.assert_close(torch.tensor([g[2] for g in got]), torch.tensor([w[2] for w in want]))
    with pytest.raises(ValueError, match="was not computed"):
        res.top_sources(3)
    frame = res.to_dataframe("rollout")
    assert sorted(frame["query"].unique().tolist()) == [2, 5]
    merged = frame.merge(full.to_dataframe("rollout"), on=["batch", "layer", "query", "key"])
    assert len(merged) == len(frame)
    torch.testing.assert_close(torch.tensor(merged["value_x"].values), torch.tensor(merged["value_y"].values))
    assert (merged["query_token_x"] == merged["query_token_y"]).all()


@pytest.mark.parametrize(
    ("positions", "cls", "message"),
    [
        ("first", InvalidArgumentError, "'last'"),
        (torch.ones(2, 3, dtype=torch.bool), InvalidArgumentError, r"\[batch, pos\]"),
        (torch.tensor([[True, False, False, False], [True, True, False, False]]), InvalidArgumentError,
         "same, non-zero number"),
        ([0.5], InvalidArgumentError, "list of ints"),
        ([], InvalidArgumentError, "non-empty"),
        ([4], OutOfRangeError, "0..3"),
        ([-4], OutOfRangeError, "counting back"),
        (torch.tensor([[0], [1], [2]]), InvalidArgumentError, "one row per batch item"),
        ([0], PaddedPositionError, "not padding"),
        (torch.tensor([[True, False, False, False], [True, False, False, False]]), PaddedPositionError, "not padding"),
        ({"a": 1}, ArgumentTypeError, "'last'"),
    ],
)
def test_bad_positions(positions, cls, message):
    valid = torch.tensor([[False, True, True, True], [True, True, True, False]])
    with pytest.raises(cls, match=message) as err:
        receivers(positions, valid)
    assert type(err.value) is cls and "positions=" in str(err.value)


def test_negative_positions_count_back_over_real_tokens():
    valid = torch.tensor([[False, True, True, True], [True, True, True, False]])
    assert receivers([-1, -3, 2], valid).tolist() == [[3, 1, 2], [2, 0, 2]]
    assert receivers("last", valid).tolist() == [[3], [2]]
    assert receivers(None, valid) is None
