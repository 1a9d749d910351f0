"""Rank statistics and the head-ranking comparison table, checked against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lens_alti.analysis import compare
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, MissingHooksError, OutOfRangeError
from tests.support.errors import raises_exactly


def _kendall_by_pairs(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b written out: (concordant − discordant) / sqrt((n0 − ties_x)(n0 − ties_y))."""
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx * dy > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def _spearman_no_ties(x: list[float], y: list[float]) -> float:
    """1 − 6 Σ d² / (n (n² − 1)) for data without ties."""
    n = len(x)
    rx = {v: r for r, v in enumerate(sorted(x))}
    ry = {v: r for r, v in enumerate(sorted(y))}
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


def test_rank_agreement_against_hand_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randperm(24, generator=g).double().view(4, 6)
    y = (x.flatten() + 6 * torch.randn(24, generator=g, dtype=torch.float64)).view(4, 6)
    got = compare.rank_agreement(x, y, ks=(3, 5))
    assert got["spearman"] == pytest.approx(_spearman_no_ties(x.flatten().tolist(), y.flatten().tolist()), abs=1e-12)
    assert got["kendall"] == pytest.approx(_kendall_by_pairs(x.flatten().tolist(), y.flatten().tolist()), abs=1e-12)
    top = lambda t, k: set(sorted(range(24), key=lambda i: -float(t.flatten()[i]))[:k])  # noqa: E731
    assert got["top3"] == len(top(x, 3) & top(y, 3)) and got["top5"] == len(top(x, 5) & top(y, 5))
    ties = torch.tensor([[1.0, 1.0, 2.0], [2.0, 3.0, 0.0]])
    other = torch.tensor([[0.0, 1.0, 1.0], [3.0, 2.0, 5.0]])
    assert compare.rank_agreement(ties, other)["kendall"] == pytest.approx(
        _kendall_by_pairs(ties.flatten().tolist(), other.flatten().tolist()), abs=1e-12
    )


def test_top_k_overlap_small_case():
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.7], [0.2, 0.0]])
    truth = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # scores' top 2: (0,0) (1,1); truth's top 2: (2,0) (1,1) → 1 in common; top 3: + (1,0) vs + (0,0) → 2
    assert compare.top_k_overlap(scores, truth, 2) == 1
    assert compare.top_k_overlap(scores, truth, 3) == 2
    assert math.isnan(compare.top_k_overlap(scores, truth, 6)), "k ≥ number of heads says nothing"


def test_head_ranking_table_all_and_late_layers():
    truth = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    # agrees on layers 2-3, reversed on layers 0-1
    good_late = torch.tensor([[8.0, 7.0], [6.0, 5.0], [1.0, 2.0], [3.0, 4.0]])
    table = compare.head_ranking_table({"r": good_late, "same": truth}, {"patching": truth}, ks=(2,))
    assert len(table) == 4 and list(table.columns) == [
        "truth", "truth kind", "ranking", "ranking kind", "matched", "heads", "n", "spearman", "kendall", "top2"
    ]
    assert not table.matched.any()  # unknown names have no kind
    late = table[(table.ranking == "r") & (table.heads == "layers 2-3")].iloc[0]
    assert late.n == 4 and late.top2 == 2
    assert late.spearman == pytest.approx(1.0) and late.kendall == pytest.approx(1.0)
    every = table[(table.ranking == "r") & (table.heads == "all 4 layers")].iloc[0]
    expected = _spearman_no_ties(good_late.flatten().tolist(), truth.flatten().tolist())
    assert every.n == 8 and every.spearman == pytest.approx(expected)
    assert every.top2 == 0
    same = table[table.ranking == "same"]
    assert (same.spearman == 1).all() and (same.kendall == 1).all()
    custom = compare.head_ranking_table({"r": good_late}, {"t": truth}, ks=(2,), late_from=1)
    assert set(custom.heads) == {"all 4 layers", "layers 1-3"}


def test_head_ranking_table_pairs_each_ranking_with_the_truth_of_its_kind():
    """docs/spec.md §11: direct rankings against direct effects, total rankings against total effects."""
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(0))
    table = compare.head_ranking_table(
        {"|ALTI-Logit head total|": x, "routes (logit)": x, "mine": x},
        {"|direct patching|": x, "|patching|": x, "|zero ablation|": x},
        kinds={"mine": "total"},
    )
    matched = table[table.matched & (table.heads == "all 3 layers")]
    pairs = sorted(zip(matched.ranking, matched.truth, strict=True))
    assert pairs == [
        ("mine", "|patching|"), ("mine", "|zero ablation|"), ("routes (logit)", "|patching|"),
        ("routes (logit)", "|zero ablation|"), ("|ALTI-Logit head total|", "|direct patching|"),
    ]
    assert set(table["truth kind"]) == {"direct", "total"}


def test_head_scores_from_a_table():
    import pandas as pd

    frame = pd.DataFrame({"layer": [1, 0, 1, 0], "head": [0, 1, 1, 0], "abs_effect": [3.0, 2.0, 4.0, 1.0]})
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(compare.head_scores(frame, "abs_effect"), expected)
    raises_exactly(InvalidArgumentError, "column='effect'", compare.head_scores, frame, "effect")


def test_reciprocal_ranks_hand_cases():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5], [0.9, 0.3, 0.4, -1.0], [0.0, 0.0, 0.0, 0.0]])
    rr = compare.reciprocal_ranks(scores, [1, 2, 3])
    # prompt 0: tie with position 3 counts against → rank 2; prompt 1: 0.9 beats it → rank 2; constant → rank 4
    torch.testing.assert_close(rr, torch.tensor([0.5, 0.5, 0.25], dtype=torch.float64))
    cand = torch.tensor([[True, True, True, False], [False, True, True, True], [False, False, True, True]])
    torch.testing.assert_close(
        compare.reciprocal_ranks(scores, [1, 2, 3], candidates=cand), torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    )
    err = raises_exactly(OutOfRangeError, "answer=", compare.reciprocal_ranks, scores, [0, 0, 0], candidates=cand)
    assert "candidate" in str(err)
    raises_exactly(InvalidArgumentError, "answer=", compare.reciprocal_ranks, scores, [0, 1])
    raises_exactly(InvalidArgumentError, "scores=", compare.reciprocal_ranks, scores[0], [0])
    rr = compare.reciprocal_ranks
    raises_exactly(InvalidArgumentError, "candidates=", rr, scores, [1, 2, 3], candidates=cand[:2])


def test_attention_head_scores_read_the_patterns():
    from tests.support.models import build_bridge

    model = build_bridge("gpt2", seed=4)[1]
    tokens = torch.randint(4, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    got = compare.attention_head_scores(cache, attention_mask=mask)
    for layer, head in [(0, 0), (1, 3)]:
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]
        off = [1 - float(pat[0, head, 5, 0]), 1 - float(pat[1, head, 5, 2])]
        mx = [float(pat[0, head, 5, 1:].max()), float(pat[1, head, 5, 3:].max())]
        assert float(got["attention off the first token"][layer, head]) == pytest.approx(sum(off) / 2, abs=1e-6)
        assert float(got["max attention (not first)"][layer, head]) == pytest.approx(sum(mx) / 2, abs=1e-6)
    raises_exactly(OutOfRangeError, "position=6", compare.attention_head_scores, cache, attention_mask=mask, position=6)
    raises_exactly(ArgumentTypeError, "cache=", compare.attention_head_scores, object())
    scores_of = compare.attention_head_scores
    raises_exactly(InvalidArgumentError, "attention_mask", scores_of, cache, attention_mask=mask[:1])
    _, partial = model.run_with_cache(tokens, names_filter=lambda n: "blocks.0." in n)
    with pytest.raises(MissingHooksError, match="blocks.1.attn.hook_pattern"):
        compare.attention_head_scores(partial)


def test_comparison_errors():
    t = torch.ones(2, 3)
    table = compare.head_ranking_table
    err = raises_exactly(InvalidArgumentError, "ranking 'r'=", table, {"r": torch.ones(6)}, {"t": t})
    assert "[layer, head]" in str(err)
    err = raises_exactly(InvalidArgumentError, "ranking 'r'=", table, {"r": torch.full((2, 3), float("nan"))}, {"t": t})
    assert "NaN" in str(err)
    raises_exactly(InvalidArgumentError, "'r'=", table, {"r": torch.ones(3, 3)}, {"t": t})
    raises_exactly(InvalidArgumentError, "rankings=", table, {}, {"t": t})
    raises_exactly(InvalidArgumentError, "truths=", table, {"r": t}, {})
    raises_exactly(OutOfRangeError, "late_from=2", table, {"r": t}, {"t": t}, late_from=2)
    raises_exactly(InvalidArgumentError, "truth=", compare.rank_agreement, torch.ones(4), torch.ones(5))
