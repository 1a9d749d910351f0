"""`lens-alti explain --target/--contrast` (ALTI-Logit, routes, interactive report) and `lens-alti demo`."""

from __future__ import annotations

import re

import pytest

from lens_alti.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import transformers

    from tests.support.models import hf_model, tokenizer_dir

    path = tmp_path_factory.mktemp("tiny")
    hf_model("llama").save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(path)
    return path


def test_explain_target_and_contrast(folder, tmp_path, capsys):
    out = tmp_path / "report.html"
    argv = ["explain", "t5 t6 t7 t8 t9", "--model", str(folder), "--target", "t7", "--contrast", "t8"]
    rc = main([*argv, "--out", str(out), "--top", "3", "--threshold", "0.02"])
    text = capsys.readouterr().out
    assert rc == 0, text
    logit = re.search(r"ALTI-Logit of the logit of 't7' − logit of 't8' at position 5: (-?[\d.]+)", text)
    assert logit, text
    parts = re.search(r"= embedding (-?[\d.]+) \+ heads (-?[\d.]+) \+ MLPs (-?[\d.]+) \+ bias (-?[\d.]+)", text)
    assert abs(sum(float(x) for x in parts.groups()) - float(logit.group(1))) < 5e-3, "the printed parts add up"
    assert "top 3 input tokens by ALTI-Logit" in text
    assert re.search(r"routes \(logit.*? weighting, threshold 0\.02\)", text)
    html = out.read_text()
    for heading in ("ALTI-Logit: which input tokens push", "Heads&#x27; direct logit attribution",
                    "Information-flow routes", "Pick the explained position"):
        assert heading in html, heading
    assert html.count('class="plotly-graph-div"') >= 8 and html.count("plotly.js v") <= 2


def test_explain_without_the_position_picker_for_long_texts(folder, tmp_path, capsys):
    out = tmp_path / "r.html"
    rc = main(["explain", "t5 t6 t7", "--model", str(folder), "--target", "t7", "--max-interactive", "2",
               "--out", str(out)])
    assert rc == 0 and "Pick the explained position" not in out.read_text()
    capsys.readouterr()


def test_explain_never_records_a_cache(folder, tmp_path, capsys, monkeypatch):
    """Every entry point is given the model: a long text is explained at its position, one layer at a time."""
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(*args, **kwargs):
        raise AssertionError("lens-alti explain recorded a whole cache")

    monkeypatch.setattr(TransformerBridge, "run_with_cache", refuse)
    out = tmp_path / "long.html"
    rc = main(["explain", "t5 t6 t7 t8 t9 t10", "--model", str(folder), "--target", "t7", "--heads",
               "--max-interactive", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "predicts" in text and "ALTI-Logit of the logit of 't7'" in text and "routes (logit" in text
    html = out.read_text()
    assert "Rollout for the explained position" in html and "Rollout after the last layer" not in html


def test_explain_prediction_errors_are_one_line(folder, capsys):
    rc = main(["explain", "t5 t6", "--model", str(folder), "--target", "t7 t8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--target 't7 t8' is not a single token" in err
    rc = main(["explain", "t5 t6", "--model", str(folder), "--contrast", "t8"])
    assert rc == 2 and "--contrast needs --target" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_shows_the_head_ranking_comparison(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--prompts", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "each ranking against the ground truth of its kind, over all 270 heads" in text
    for name in ("ALTI head share", "|ALTI-Logit head total|", "routes (logit)", "|patching|", "|zero ablation|",
                 "|direct patching|", "set aside: attention sink 0 '<|im_start|>'"):
        assert name in text, name
    top = text.split("of prompt 0:")[1].splitlines()[1]
    assert "' Mary'" in top  # the IO name leads once the sink is set aside (docs/spec.md §10)
    html = out.read_text()
    assert "Head rankings vs interventions" in html and "Information-flow routes" in html


def test_demo_pipeline_on_a_tiny_model(monkeypatch, tmp_path, capsys):
    """The demo's whole code path, with the tiny model and word-token prompts standing in for
    SmolLM2 and the IOI names (the real demo is the slow test below)."""
    import lens_alti.analysis.ioi as ioi
    import lens_alti.models.pretrained as pretrained
    from tests.support.models import build_bridge

    model = build_bridge("llama", seed=9)[1]
    prompts = [ioi.IOIPrompt("t5 t6 t7 t8 t6 t9 t4", " t5", " t6"), ioi.IOIPrompt("t7 t8 t9 t8 t5", " t7", " t8")]
    monkeypatch.setattr(pretrained, "load_smollm2", lambda: model)
    monkeypatch.setattr(ioi, "ioi_prompts", lambda n: prompts[:n])
    out = tmp_path / "demo.html"
    assert main(["demo", "--prompts", "2", "--out", str(out), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "each ranking against the ground truth of its kind, over all 8 heads" in text
    assert "contrastive ALTI-Logit (' t5' − ' t6') of prompt 0" in text
    for name in ("ALTI head share", "|ALTI-Logit head total|", "routes (logit)", "|patching|", "|zero ablation|",
                 "|direct patching|", "where |ALTI-Logit head total| ranks them"):
        assert name in text, name
    matched = text.split("each ranking against the ground truth of its kind")[1].split("every other pair")[0]
    assert "|ALTI-Logit head total|" in matched and "|direct patching|" in matched  # docs/spec.md §11
    assert "ALTI head share" not in matched
    html = out.read_text()
    for heading in ("Head rankings vs interventions", "Information-flow routes", "Pick a position, scrub"):
        assert heading in html, heading
