"""The shipped toy translator: files, corpus, held-out accuracy, ALTI+ reconstruction and alignment quality.

Loads the shipped weights (never retrains); about 15 s on two CPU cores.
"""

from __future__ import annotations

import json

import pytest
import torch

import lens_alti
from lens_alti.analysis.alignment import GoldAlignment, alignment_error_rate
from lens_alti.models.toy_translation import MODEL_DIR, encode_batch, load_tokenizer, load_toy_translator, translate
from lens_alti.models.toy_translation.corpus import (
    generate_corpus,
    source_vocabulary,
    target_vocabulary,
    train_test_split,
)
from lens_alti.models.toy_translation.evaluate import best_single_links, evaluate, held_out_pairs
from tests.support import ROOT


@pytest.fixture(scope="module")
def model():
    return load_toy_translator()


def test_shipped_files():
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "marian" and cfg["d_model"] <= 256
    assert cfg["encoder_layers"] == cfg["decoder_layers"]  # what TransformerLens' Marian adapter needs
    log = json.loads((MODEL_DIR / "training.json").read_text())
    assert log["train_seconds"] <= 15 * 60 and log["held_out_exact_match"] >= 0.95


def test_tokenizer_has_every_word_as_one_token():
    tok = load_tokenizer()
    words = source_vocabulary() + target_vocabulary()
    ids = tok(" ".join(words))["input_ids"]
    assert len(ids) == len(words) + 1 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert len(set(ids)) == len(words) + 1, "the two vocabularies share no word"


def test_corpus_is_deterministic_with_valid_alignments():
    a, b = generate_corpus(50, seed=3), generate_corpus(50, seed=3)
    assert [(p.source, p.target, p.sure, p.possible) for p in a] == [
        (p.source, p.target, p.sure, p.possible) for p in b
    ]
    assert [p.source for p in generate_corpus(50, seed=4)] != [p.source for p in a]
    for p in a:
        assert p.sure <= p.possible
        assert all(0 <= s < len(p.source) and 0 <= t < len(p.target) for s, t in p.possible)
        assert {t for _, t in p.possible} == set(range(len(p.target))), "every target word has a gold link"
    # the alignment is not the diagonal: reordering, one-to-many, many-to-one, unaligned words
    assert any((s, t) in p.sure and s != t for p in a for s, t in p.sure)
    linked_src = [{s for s, _ in p.possible} for p in a]
    assert any(len(ls) < len(p.source) for ls, p in zip(linked_src, a, strict=True)), "an unaligned source word"


def test_held_out_pairs_are_unseen():
    train, test = train_test_split()
    assert not {p.source_text for p in train} & {p.source_text for p in test}


def test_held_out_exact_match(model):
    pairs = held_out_pairs(100)
    hyps = translate(model, [p.source_text for p in pairs])
    accuracy = sum(h.split() == p.target for h, p in zip(hyps, pairs, strict=True)) / len(pairs)
    assert accuracy >= 0.95, accuracy


def test_alti_plus_reconstruction_on_a_padded_batch(model):
    pairs = held_out_pairs(8)
    b = encode_batch(model.tokenizer, [p.source_text for p in pairs], [p.target_text for p in pairs])
    assert not bool(b.source_mask.all()), "a padded batch"
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            b.source, decoder_input=b.decoder_input, attention_mask=b.source_mask, decoder_attention_mask=b.decoder_mask
        )
    # teacher forcing on the reference: the model predicts every reference word
    pred = logits.argmax(-1)
    real = b.labels != -100
    assert bool((pred[real] == b.labels[real]).all())
    res = lens_alti.attribute(cache, attention_mask=b.source_mask, decoder_attention_mask=b.decoder_mask)
    assert res.architecture == "MarianMTModel" and res.weight_processing == "raw"
    for kind, errs in res.reconstruction_error.items():
        assert len(errs) == 3 and float(errs.max()) < 1e-5, (kind, errs)
    valid = b.decoder_mask.bool()
    torch.testing.assert_close(res.total.sum(-1)[:, -1][valid], torch.ones(int(valid.sum())))
    share = res.source_contribution[valid]
    assert 0.2 < float(share.mean()) < 0.95, "both the source and the target prefix matter"


def test_gold_oracle_extraction_scores_its_floor():
    pairs = held_out_pairs(20)
    golds = [GoldAlignment.from_links(p.sure, p.possible) for p in pairs]
    hyps = [best_single_links(g, len(p.target)) for g, p in zip(golds, pairs, strict=True)]
    # > 0: many-to-one words ("will see" → one verb) cannot be fully recalled with one link per word
    assert 0 < alignment_error_rate(hyps, golds) < 0.1


def test_alti_plus_alignment_beats_the_baselines(model):
    res = evaluate(model, n=100)
    aer = res["aer"]
    last = res["n_layers"] - 1
    alti_plus = aer["alti_plus", "output"][last]
    # far better than the monotone baseline, which the verb-final reordering defeats
    assert alti_plus < 0.5 * res["diagonal"].aer, (alti_plus, res["diagonal"].aer)
    # and better than the cross-attention weights of the same layer
    assert alti_plus < aer["attention", "output"][last], (alti_plus, aer["attention", "output"])
    # the position that predicts a word explains it; the one that reads it already looks ahead
    assert aer["alti_plus", "input"][last] > alti_plus


def test_encoder_decoder_notebook_runs_offline():
    """notebooks/encoder_decoder.ipynb top to bottom (needs nbclient and ipykernel, else skipped)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = ROOT / "notebooks" / "encoder_decoder.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs are cleared"
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Seq2SeqAltiResult" in text and "hypothesis (talp)" in text
