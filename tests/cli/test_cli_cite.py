"""`lens-alti cite FILE --query ...` (context attribution) on the hand-built copying model."""

from __future__ import annotations

import re

import pytest

import lens_alti
from lens_alti.cli import main

CONTEXT = "w1 w2 w3 . w4 w5 .\n\nw6 w7 paris w8 . w9 w10 .\n\nw11 w12 w13 . w14 ."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import transformers

    from tests.support.context_model import copy_model, word_tokenizer_dir

    path = tmp_path_factory.mktemp("copy")
    copy_model().save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(word_tokenizer_dir()).save_pretrained(path)
    return path


def test_cite_prints_the_top_units_and_writes_the_report(folder, tmp_path, capsys):
    text = tmp_path / "context.txt"
    text.write_text(CONTEXT)
    out, saved = tmp_path / "cite.html", tmp_path / "cite.safetensors"
    rc = main(["cite", str(text), "--query", "where is it ?", "--model", str(folder), "--units", "paragraph",
               "--max-new-tokens", "1", "--top", "2", "--out", str(out), "--save", str(saved)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "response (generated): 'paris'" in printed and "3 paragraph units" in printed
    first = re.search(r"top 2 units.*?\n\s+(\d+)\s+([+-][\d.]+)\s+(.*)", printed)
    assert first and first.group(1) == "1" and first.group(3).startswith("w6 w7 paris"), printed
    html = out.read_text()
    assert "The context, shaded by score" in html and html.count("<span style=") == 3
    assert 'class="plotly-graph-div"' in html
    assert lens_alti.load(saved).response == "paris"


def test_cite_with_a_given_response_and_sentences(folder, tmp_path, capsys):
    text = tmp_path / "c.txt"
    text.write_text(CONTEXT)
    rc = main(["cite", str(text), "--query", "where is it ?", "--model", str(folder), "--response", "paris"])
    printed = capsys.readouterr().out
    assert rc == 0 and "response: 'paris'" in printed and "6 sentence units" in printed


def test_cite_errors_are_one_line(folder, tmp_path, capsys):
    rc = main(["cite", str(tmp_path / "missing.txt"), "--query", "q", "--model", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "missing.txt" in err
    rc = main(["cite", str(tmp_path / "x.txt")])
    assert rc == 2 and "--query" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    rc = main(["cite", str(empty), "--query", "q", "--model", str(folder)])
    assert rc == 2 and "context=" in capsys.readouterr().err
