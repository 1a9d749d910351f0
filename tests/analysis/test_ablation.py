"""Ablation comparisons, plots, reports and the command line, on tiny random models."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.analysis import ablation
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError
from lens_alti.viz import plotting
from lens_alti.viz.report import write_report
from tests.support.errors import raises_exactly
from tests.support.models import build_bridge

TOKENS = torch.randint(4, 1000, (3, 8), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def gpt2():
    return build_bridge("gpt2", seed=2)[1]


def test_rank_correlations_on_hand_made_cases():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ablation.spearman(x, x * 10) == pytest.approx(1.0)
    assert ablation.kendall(x, -x) == pytest.approx(-1.0)
    y = torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert ablation.kendall(x, y) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant pair
    assert ablation.spearman(x, y) == pytest.approx(0.8)  # 1 - 6·2 / (4·15)
    ties = torch.tensor([1.0, 1.0, 2.0, 2.0])
    assert ablation.spearman(x, ties) == pytest.approx(0.894427, abs=1e-6)


def test_head_ablation_matches_ablating_one_head_by_hand(gpt2):
    metric = ablation.logit_diff([5, 6, 7], [8, 9, 10])
    table = ablation.head_ablation(gpt2, TOKENS, metric, ablation="zero")
    assert len(table.table) == 2 * 4
    clean = metric(gpt2(TOKENS))

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 3] = 0
        return z

    ablated = metric(gpt2.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)]))
    t = table.table
    row = t[(t["layer"] == 1) & (t["head"] == 3)].iloc[0]
    assert row.effect == pytest.approx(float((clean - ablated).mean()), abs=1e-5)
    assert row.alti == pytest.approx(float(table.result.head_outputs[:, 1, 3, -1].mean()), abs=1e-7)
    assert -1 <= table.spearman <= 1 and -1 <= table.kendall <= 1


def test_mean_ablation_differs_from_zero(gpt2):
    metric = ablation.logprob([5, 6, 7])
    zero = ablation.head_ablation(gpt2, TOKENS, metric, ablation="zero").table
    mean = ablation.head_ablation(gpt2, TOKENS, metric, ablation="mean").table
    assert not torch.allclose(torch.tensor(zero.effect.values), torch.tensor(mean.effect.values))
    with pytest.raises(ValueError, match="ablation='resample'.*'zero', 'mean'"):
        ablation.head_ablation(gpt2, TOKENS, metric, ablation="resample")


def test_circuit_comparison_recomputes_exact_alti(gpt2):
    metric = ablation.kl_to_clean(gpt2(TOKENS))
    comp = ablation.circuit_comparison(gpt2, TOKENS, [(0, 1), (1, 2)], metric=metric)
    assert comp.metric_before == pytest.approx(0.0, abs=1e-6) and comp.metric_after > 0
    assert float(comp.after.reconstruction_error.max()) < 1e-5, "the ablated run is still decomposed exactly"
    assert not torch.allclose(comp.before.layers, comp.after.layers)
    t = comp.table
    assert set(t.layer) == {0, 1, "rollout"} and len(t) == 3 * 8
    last = t[t.layer == "rollout"]
    assert last.before.sum() == pytest.approx(1.0, abs=1e-5) and last.after.sum() == pytest.approx(1.0, abs=1e-5)
    none = ablation.circuit_comparison(gpt2, TOKENS, [])
    assert torch.equal(none.before.layers, none.after.layers)


def test_token_deletion_report(gpt2):
    prompts = [TOKENS[0], TOKENS[1, :6]]
    rep = ablation.token_deletion(gpt2, prompts, ks=(1, 2))
    assert set(rep.curves.method) == {"alti", "attention_rollout", "random"}
    assert set(rep.curves.k) == {1, 2}
    assert list(rep.auc.columns) == ["method", "comprehensiveness", "sufficiency"]
    # Recompute one number by hand: ALTI's top-1 token deleted from prompt 0.
    toks = TOKENS[0]
    target = int(gpt2(toks[None])[0, -1].argmax())
    p = float(gpt2(toks[None])[0, -1].softmax(-1)[target])
    _, cache = gpt2.run_with_cache(toks[None])
    scores = lens_alti.attribute(cache).rollout[0, -1, -1]
    top = 1 + int(scores[1:-1].argmax())
    kept = torch.cat([toks[:top], toks[top + 1 :]])
    expected = p - float(gpt2(kept[None])[0, -1].softmax(-1)[target])
    one = ablation.token_deletion(gpt2, [toks], ks=(1,), methods=("alti",))
    assert float(one.curves.comprehensiveness.iloc[0]) == pytest.approx(expected, abs=1e-6)


def test_attention_rollout_is_row_stochastic_and_causal(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    r = lens_alti.attention_rollout(cache)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 2, 8))
    assert (r.triu(1) == 0).all()


def test_plots_and_report(gpt2, tmp_path):
    _, cache = gpt2.run_with_cache(TOKENS)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :2] = 0
    _, cache = gpt2.run_with_cache(TOKENS, attention_mask=mask)
    res = lens_alti.attribute(cache, heads=True, tokens=TOKENS, attention_mask=mask)
    figs = [
        plotting.token_heatmap(res, 0, batch=1),
        plotting.rollout_heatmap(res, batch=1),
        plotting.head_heatmap(res, -1, batch=1),
        plotting.saliency_bar(res, -1, batch=1),
    ]
    heat = figs[0].data[0]
    assert len(heat.x) == 6 and len(heat.z) == 6, "padded positions are left out"
    torch.testing.assert_close(torch.tensor(heat.z), res.layers[1, 0, 2:, 2:].double().float(), check_dtype=False)
    assert len(figs[2].data[0].z) == 2 and len(figs[2].data[0].z[0]) == 4
    with pytest.raises(ValueError, match="heads=True"):
        plotting.head_heatmap(lens_alti.attribute(cache, attention_mask=mask))
    with pytest.raises(IndexError, match="out of range"):
        plotting.token_heatmap(res, 5)
    out = write_report(tmp_path / "r.html", "t", [("plots", figs), ("text", ["hello <b>"])])
    text = out.read_text()
    assert text.count("plotly.js v") <= 2 and "hello &lt;b&gt;" in text and text.count('class="plotly-graph-div"') == 4


def test_cli_explain_on_a_local_model(tmp_path, capsys):
    import transformers

    from lens_alti.cli import main
    from tests.support.models import hf_model, tokenizer_dir

    folder = tmp_path / "tiny"
    hf_model("gpt2").save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(folder)
    out = tmp_path / "report.html"
    rc = main(["explain", "t5 t6 t7 t8 t9", "--model", str(folder), "--heads", "--out", str(out), "--top", "3"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "top 3 input tokens" in text and out.exists() and out.stat().st_size > 100_000


def test_cli_errors_are_one_line(capsys):
    from lens_alti.cli import main

    rc = main(["explain", "hello", "--model", "/nonexistent/model/folder"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("lens-alti: error: no model folder at '/nonexistent/model/folder'")


def test_cli_explain_seq2seq_needs_a_target(tmp_path, capsys):
    from lens_alti.cli import main
    from lens_alti.models.toy_translation import MODEL_DIR

    rc = main(["explain", "--source", "the cat sees a dog", "--model", str(MODEL_DIR)])
    assert rc == 2 and "needs --target" in capsys.readouterr().err.strip().splitlines()[-1]


def test_token_deletion_with_alti_logit_rankings(gpt2):
    toks = TOKENS[1]
    rep = ablation.token_deletion(
        gpt2, [toks], ks=(1,), targets=[5], contrasts=[9], methods=("alti_logit", "alti_logit_contrast")
    )
    _, cache = gpt2.run_with_cache(toks[None])
    p = float(gpt2(toks[None])[0, -1].softmax(-1)[5])
    for method, contrast in (("alti_logit", None), ("alti_logit_contrast", 9)):
        scores = lens_alti.logit_attribution(cache, 5, contrast).tokens[0]
        inner = scores[1:-1]
        for column, drop in (("comprehensiveness", 1 + int(inner.argmax())), ("sufficiency", 1 + int(inner.argmin()))):
            kept = torch.cat([toks[:drop], toks[drop + 1 :]])
            expected = p - float(gpt2(kept[None])[0, -1].softmax(-1)[5])
            got = rep.curves[rep.curves.method == method][column].iloc[0]
            assert got == pytest.approx(expected, abs=1e-6), (method, column)
    with pytest.raises(ValueError, match="contrasts="):
        ablation.token_deletion(gpt2, [toks], ks=(1,), targets=[5], methods=("alti_logit_contrast",))


def test_token_deletion_with_given_rankings(gpt2):
    toks = TOKENS[1]
    scores = torch.arange(len(toks), dtype=torch.float64)  # the later the token, the higher
    rep = ablation.token_deletion(gpt2, [toks], ks=(1,), targets=[5], methods=(), rankings={"later first": [scores]})
    p = float(gpt2(toks[None])[0, -1].softmax(-1)[5])
    for column, drop in (("comprehensiveness", len(toks) - 2), ("sufficiency", 1)):  # neither BOS nor the receiver
        kept = torch.cat([toks[:drop], toks[drop + 1 :]])
        expected = p - float(gpt2(kept[None])[0, -1].softmax(-1)[5])
        assert rep.curves[column].iloc[0] == pytest.approx(expected, abs=1e-6), column
    assert list(rep.auc.method) == ["later first"]
    short = [scores[:-1]]
    raises_exactly(InvalidArgumentError, "rankings['x'][0]", ablation.token_deletion, gpt2, [toks],
                   rankings={"x": short})
    raises_exactly(InvalidArgumentError, "rankings['alti']", ablation.token_deletion, gpt2, [toks],
                   rankings={"alti": [scores]})
    raises_exactly(InvalidArgumentError, "rankings['x']", ablation.token_deletion, gpt2, [toks],
                   rankings={"x": [scores, scores]})
    raises_exactly(ArgumentTypeError, "rankings", ablation.token_deletion, gpt2, [toks], rankings=[scores])
