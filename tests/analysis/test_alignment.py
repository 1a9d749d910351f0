"""lens_alti.analysis.alignment: talp I/O, subword aggregation, extraction conventions and AER on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from lens_alti.analysis.alignment import (
    GoldAlignment,
    aer_per_layer,
    aggregate_subwords,
    align,
    alignment_error_rate,
    alignment_scores,
    diagonal_alignment,
    extract_alignment,
    format_talp,
    parse_talp,
    read_talp,
    target_rows,
    word_ids_from_pieces,
    write_talp,
)

GOLD = GoldAlignment.from_links(sure=[(0, 0), (1, 2), (2, 1)], possible=[(3, 1)])


# ---------------------------------------------------------------- AER


def test_perfect_alignment_is_zero():
    assert alignment_error_rate([GOLD.sure], [GOLD]) == 0.0
    s = alignment_scores([GOLD.sure], [GOLD])
    assert (s.precision, s.recall) == (1.0, 1.0)


def test_fully_wrong_alignment_is_one():
    assert alignment_error_rate([{(0, 1), (1, 0), (2, 2)}], [GOLD]) == 1.0


def test_possible_links_count_for_precision_not_recall():
    # A = {(0,0), (3,1)}: |A∩S| = 1, |A∩P| = 2, |A| = 2, |S| = 3 → 1 − 3/5
    assert alignment_error_rate([{(0, 0), (3, 1)}], [GOLD]) == pytest.approx(1 - 3 / 5)
    # only a possible link: precision 1, recall 0, AER = 1 − 1/(1+3)
    s = alignment_scores([{(3, 1)}], [GOLD])
    assert (s.precision, s.recall, s.aer) == (1.0, 0.0, pytest.approx(0.75))
    # sure + extra possible links never hurt: A = P gives 1 − (3+4)/(4+3) = 0
    assert alignment_error_rate([GOLD.possible], [GOLD]) == 0.0


def test_sure_links_are_always_possible():
    g = GoldAlignment.from_links(sure=[(0, 0)], possible=[])
    assert g.possible == {(0, 0)}
    # even a GoldAlignment built by hand without S ⊆ P is scored as if S ⊆ P
    raw = GoldAlignment(frozenset({(0, 0)}), frozenset())
    assert alignment_error_rate([{(0, 0)}], [raw]) == 0.0


def test_aer_is_corpus_level_not_a_mean_of_sentences():
    g1 = GoldAlignment.from_links([(0, 0)])
    g2 = GoldAlignment.from_links([(0, 0), (1, 1), (2, 2)])
    hyps = [{(0, 0)}, {(1, 0), (0, 1), (2, 2)}]  # sentence AERs 0 and 2/3; corpus 1 − 4/8
    assert alignment_error_rate(hyps, [g1, g2]) == pytest.approx(0.5)


def test_empty_cases():
    assert math.isnan(alignment_error_rate([set()], [GoldAlignment.from_links([])]))
    assert alignment_error_rate([set()], [GOLD]) == 1.0
    with pytest.raises(ValueError, match="hypotheses"):
        alignment_error_rate([set()], [GOLD, GOLD])


# ---------------------------------------------------------------- talp


def test_talp_parse_is_one_indexed_with_sure_and_possible():
    g = parse_talp("1-1 3-2 2p3 4p2")
    assert g.sure == {(0, 0), (2, 1)}
    assert g.possible == {(0, 0), (2, 1), (1, 2), (3, 1)}


def test_talp_round_trip(tmp_path):
    golds = [GOLD, GoldAlignment.from_links([]), GoldAlignment.from_links([(4, 0)], [(0, 4)])]
    path = tmp_path / "gold.talp"
    write_talp(path, golds)
    lines = path.read_text().splitlines()
    assert lines[0] == "1-1 3-2 4p2 2-3" and lines[1] == ""
    assert read_talp(path) == golds
    # plain link sets are written as sure links
    assert format_talp({(1, 0), (0, 1)}) == "2-1 1-2"


@pytest.mark.parametrize("bad", ["1-", "0-1", "a-b", "1x2", "1-2-3"])
def test_talp_rejects_malformed_links(bad):
    with pytest.raises(ValueError, match="talp"):
        parse_talp(bad)


# ---------------------------------------------------------------- subwords


def test_word_ids_from_pieces():
    assert word_ids_from_pieces(["▁the", "▁wal", "king", "▁dog", "</s>"]) == [0, 1, 1, 2, None]
    assert word_ids_from_pieces(["the", "wal@@", "king", "dog", "</s>"], scheme="bpe") == [0, 1, 1, 2, None]
    assert word_ids_from_pieces(["a", "b", "</s>"], scheme="whole") == [0, 1, None]
    with pytest.raises(ValueError, match="scheme"):
        word_ids_from_pieces(["a"], scheme="wordpiece")


def test_aggregate_subwords_sums_sources_and_averages_targets():
    # target tokens: [w0, w1a, w1b], source tokens: [v0a, v0b, v1, </s>]
    m = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.5, 0.1, 0.2, 0.2],
            [0.3, 0.3, 0.0, 0.4],
        ]
    )
    agg = aggregate_subwords(m, source_word_ids=[0, 0, 1, None], target_word_ids=[0, 1, 1])
    expected = torch.tensor([[0.3, 0.3], [(0.6 + 0.6) / 2, (0.2 + 0.0) / 2]])
    torch.testing.assert_close(agg, expected)
    mean_src = aggregate_subwords(m, [0, 0, 1, None], [0, 1, 1], source_reduce="mean", target_reduce="sum")
    torch.testing.assert_close(mean_src, torch.tensor([[0.15, 0.3], [0.6, 0.2]]))
    # leading layer dimension
    stacked = aggregate_subwords(torch.stack([m, 2 * m]), [0, 0, 1, None], [0, 1, 1])
    torch.testing.assert_close(stacked, torch.stack([expected, 2 * expected]))
    with pytest.raises(ValueError, match="source_word_ids"):
        aggregate_subwords(m, [0, 1], [0, 1, 1])


# ---------------------------------------------------------------- extraction


def test_extract_alignment_argmax_per_target_word():
    m = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.0, 0.0, 0.0]])
    assert extract_alignment(m) == {(1, 0), (0, 1)}  # the all-zero row gives no link
    assert extract_alignment(torch.zeros(2, 0)) == set()


def test_conventions_pick_the_reading_or_the_predicting_row():
    # decoder input: [start, t0, t1]; rows are decoder positions, columns source words + </s>
    m = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # start: predicts t0
            [0.1, 0.9, 0.0],  # reads t0, predicts t1
            [0.5, 0.2, 0.3],  # reads t1
        ]
    )
    torch.testing.assert_close(target_rows(m, 2, "output"), m[:2])
    torch.testing.assert_close(target_rows(m, 2, "input"), m[1:])
    assert align(m, [0, 1, None], [0, 1], "output") == {(0, 0), (1, 1)}
    assert align(m, [0, 1, None], [0, 1], "input") == {(1, 0), (0, 1)}
    with pytest.raises(ValueError, match="convention"):
        target_rows(m, 2, "middle")
    with pytest.raises(ValueError, match="decoder positions"):
        target_rows(m, 3, "input")


def test_eos_column_is_never_chosen():
    m = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.1, 0.6]])  # </s> holds the most, but is not a word
    assert align(m, [0, 1, None], [0], "output") == {(1, 0)}


def test_aer_per_layer():
    gold = GoldAlignment.from_links([(0, 1), (1, 0)])
    good = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.5, 0.5, 0.0]])  # output convention: crossed
    diag = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]])
    aers = aer_per_layer([torch.stack([diag, good])], [gold], [[0, 1, None]], [[0, 1]], "output")
    assert aers == [1.0, 0.0]


def test_diagonal_alignment():
    assert diagonal_alignment(3, 3) == {(0, 0), (1, 1), (2, 2)}
    assert diagonal_alignment(5, 3) == {(0, 0), (2, 1), (4, 2)}
    assert diagonal_alignment(2, 1) == {(0, 0)}
    assert diagonal_alignment(0, 2) == set()
