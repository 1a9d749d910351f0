"""The head-ranking study (every ranking vs ablation and patching) on a tiny random model."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.analysis import ablation, compare, patching
from lens_alti.analysis.study import head_ranking_study
from lens_alti.errors import InvalidArgumentError, OutOfRangeError
from tests.support.errors import raises_exactly
from tests.support.models import build_bridge

GEN = torch.Generator().manual_seed(8)
TOKENS = torch.randint(4, 1000, (3, 7), generator=GEN)
CORRUPT = TOKENS.clone()
CORRUPT[:, 1] = torch.randint(4, 1000, (3,), generator=GEN)
MASK = torch.ones_like(TOKENS)
MASK[2, :2] = 0
CORRECT, WRONG = [5, 6, 7], [8, 9, 10]


@pytest.fixture(scope="module")
def model():
    return build_bridge("llama", seed=6)[1]


@pytest.fixture(scope="module")
def study(model):
    return head_ranking_study(
        model, TOKENS, CORRECT, WRONG, corrupted_tokens=CORRUPT, attention_mask=MASK, ks=(2, 4), threshold=0.02
    )


def test_study_table_has_every_ranking_against_every_truth(study):
    assert list(study.truths) == ["|zero ablation|", "|mean ablation|", "|patching|", "|direct patching|"]
    assert list(study.rankings) == [
        "ALTI head share", "|ALTI-Logit head total|", "routes (logit)", "routes (proximity)",
        "attention off the first token", "max attention (not first)",
    ]
    t = study.table
    assert len(t) == 4 * 6 * 2 and set(t.heads) == {"all 2 layers", "layers 1-1"}
    assert t.spearman.between(-1, 1).all() and t.top2.between(0, 2).all()
    assert all(r.shape == (2, 4) for r in [*study.rankings.values(), *study.truths.values()])


def test_study_numbers_come_from_the_methods(model, study):
    _, cache = model.run_with_cache(TOKENS, attention_mask=MASK)
    attr = lens_alti.logit_attribution(cache, CORRECT, WRONG, attention_mask=MASK)
    torch.testing.assert_close(study.rankings["|ALTI-Logit head total|"], attr.head_totals.double().abs().mean(0))
    g = lens_alti.routes(cache, -1, target=CORRECT[2], contrast=WRONG[2], batch=2, attention_mask=MASK, threshold=0.02)
    per = [
        lens_alti.routes(cache, -1, target=CORRECT[i], contrast=WRONG[i], batch=i, attention_mask=MASK, threshold=0.02)
        for i in range(3)
    ]
    torch.testing.assert_close(study.routes["logit"][2].head_importance, g.head_importance)
    torch.testing.assert_close(
        study.rankings["routes (logit)"], torch.stack([p.head_importance.double() for p in per]).mean(0)
    )
    metric = ablation.logit_diff(CORRECT, WRONG)
    patched = patching.head_patching(model, TOKENS, CORRUPT, metric, attention_mask=MASK)
    torch.testing.assert_close(study.truths["|patching|"], patched.effects("abs_effect"))
    torch.testing.assert_close(study.truths["|direct patching|"], patched.effects("abs_direct_effect"))
    t = study.table
    row = t[(t.truth == "|patching|") & (t.ranking == "routes (logit)") & (t.heads == "all 2 layers")].iloc[0]
    expected = compare.rank_agreement(study.rankings["routes (logit)"], patched.effects("abs_effect"), ks=(2, 4))
    assert row.spearman == pytest.approx(expected["spearman"]) and row.top4 == expected["top4"]
    assert study.clean_metric == pytest.approx(float(metric(model(TOKENS, attention_mask=MASK)).mean()), abs=1e-5)


def test_misses_lists_the_truth_top_k_with_their_ranks(study):
    m = study.misses("|ALTI-Logit head total|", "|patching|", k=3)
    assert len(m) == 3 and m["|patching|"].is_monotonic_decreasing
    r = study.rankings["|ALTI-Logit head total|"].flatten()
    for row in m.itertuples(index=False):
        layer, head = (int(x) for x in row.head[1:].split("H"))
        assert row._2 == 1 + int((r > r[layer * 4 + head]).sum())
    raises_exactly(InvalidArgumentError, "ranking='nope'", study.misses, "nope", "|patching|")
    raises_exactly(InvalidArgumentError, "truth='nope'", study.misses, "|ALTI-Logit head total|", "nope")


def test_study_errors(model):
    hrs = head_ranking_study
    raises_exactly(InvalidArgumentError, "routes[0]='exact'", hrs, model, TOKENS, CORRECT, WRONG, routes=("exact",))
    raises_exactly(InvalidArgumentError, "ablations=()", hrs, model, TOKENS, CORRECT, WRONG, ablations=(), routes=())
    raises_exactly(InvalidArgumentError, "correct=", hrs, model, TOKENS, CORRECT[:2], WRONG, routes=())
    raises_exactly(OutOfRangeError, "wrong=", hrs, model, TOKENS, CORRECT, [10**6] * len(CORRECT), routes=())
    raises_exactly(InvalidArgumentError, "tokens=", hrs, model, TOKENS[0], CORRECT, WRONG, routes=())
