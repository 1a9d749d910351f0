"""`lens-alti run`: shards, errors.jsonl, resume, refusing changed options, torchrun (gloo)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lens_alti
import lens_alti.cli.corpus as corpus
from lens_alti.cli.corpus import CorpusOptionsError, RunOptions, load_item, read_corpus, read_table, run_corpus
from lens_alti.models.pretrained import load_pretrained
from tests.support import ROOT
from tests.support.models import hf_model
from tests.support.tokenizer import tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    hf_model("gpt2").save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_pretrained(model_dir)


def _texts(n: int = 14) -> list[str]:
    return [" ".join(f"w{(i * 5 + j) % 50}" for j in range(2 + (i * 3) % 7)) for i in range(n)]


def _data(folder: pathlib.Path, texts: list[str]) -> pathlib.Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": f"doc{i}"}) + "\n" for i, t in enumerate(texts)))
    return path


def _shards(out: pathlib.Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(out.glob("shard-*.safetensors"))}


def _same_shards(a: pathlib.Path, b: pathlib.Path) -> None:
    sa, sb = _shards(a), _shards(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for k in sa[name]:
            torch.testing.assert_close(sa[name][k], sb[name][k], atol=1e-6, rtol=0, equal_nan=True)
        assert corpus.shard_corpus(a / name) == corpus.shard_corpus(b / name)


def test_run_writes_shards_table_and_errors(model, model_dir, tmp_path, monkeypatch):
    texts = _texts()
    texts[2] = "   "
    texts[9] = " ".join(["w1"] * 30)
    data = _data(tmp_path, texts)
    real = corpus._attribute

    def failing(model_, batch, opts, pad):  # a reconstruction failure for one row
        if any(r.row == 6 for r, _ in batch):
            raise lens_alti.ReconstructionError("blocks.0.attn", 1.0, 1.0, 1e-4, "injected")
        return real(model_, batch, opts, pad)

    monkeypatch.setattr(corpus, "_attribute", failing)
    opts = RunOptions(model=str(model_dir), data=str(data), heads=True, batch_size=4, max_length=12)
    manifest = run_corpus(opts, tmp_path / "out", model=model, progress=False)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [2, 6, 9]
    assert errors[0]["reason"] == "empty text" and "max-length 12" in errors[2]["reason"]
    assert "ReconstructionError" in errors[1]["reason"] and errors[1]["id"] == "doc6"
    assert manifest["attributed"] == len(texts) - 3 and manifest["errors"] == 3
    rows = sorted(r for s in manifest["shards"] for r in s["rows"])
    assert rows == [i for i in range(len(texts)) if i not in (2, 6, 9)]

    # Every item equals attribute() on that text alone (no padding).
    table = read_table(tmp_path / "out")
    for row in (0, 5, 13):
        ids = model.to_tokens(texts[row])
        alone = lens_alti.attribute(model, tokens=ids, heads=True, positions=[-1])
        got = table[table["row"] == row].sort_values("key")
        assert got["id"].iloc[0] == f"doc{row}"
        assert got["query"].tolist() == [ids.shape[1] - 1] * ids.shape[1]
        torch.testing.assert_close(torch.tensor(got["value"].values), alone.rollout[0, -1, 0], atol=1e-5,
                                   rtol=0)
        item = load_item(tmp_path / "out", row)
        real_keys = item.attention_mask[0].bool()
        torch.testing.assert_close(item.heads[0][..., real_keys], alone.heads[0], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="errors.jsonl"):
        load_item(tmp_path / "out", 6)


def test_interrupted_run_resumes_to_the_same_result(model, model_dir, tmp_path, monkeypatch):
    data = _data(tmp_path, _texts())
    opts = RunOptions(model=str(model_dir), data=str(data), batch_size=3, max_length=64)
    run_corpus(opts, tmp_path / "clean", model=model, progress=False)

    real = corpus._write_shard
    calls = {"n": 0}

    def interrupted(path, result, info):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C while the third shard is being written
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real(path, result, info)

    monkeypatch.setattr(corpus, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_corpus(opts, tmp_path / "resumed", model=model, progress=False)
    assert len(list((tmp_path / "resumed").glob("shard-*.safetensors"))) == 2
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    monkeypatch.setattr(corpus, "_write_shard", real)
    written = []
    monkeypatch.setattr(corpus, "_write_shard", lambda p, r, i: (written.append(p.name), real(p, r, i)))
    manifest = run_corpus(opts, tmp_path / "resumed", model=model, progress=False)
    assert written == [f"shard-{b:06d}.safetensors" for b in range(2, len(manifest["shards"]))]  # done ones skipped
    assert not list((tmp_path / "resumed").glob(".shard-*"))
    _same_shards(tmp_path / "clean", tmp_path / "resumed")


def test_changed_options_are_refused(model, model_dir, tmp_path):
    data = _data(tmp_path, _texts(4))
    opts = RunOptions(model=str(model_dir), data=str(data), batch_size=2)
    run_corpus(opts, tmp_path / "out", model=model, progress=False)
    with pytest.raises(CorpusOptionsError, match=r"batch_size: 2 -> 3.*new --out"):
        run_corpus(RunOptions(model=str(model_dir), data=str(data), batch_size=3), tmp_path / "out", model=model)
    with pytest.raises(CorpusOptionsError, match="--positions"):
        run_corpus(RunOptions(model=str(model_dir), data=str(data), positions="first"), tmp_path / "x", model=model)
    with pytest.raises(CorpusOptionsError, match="at least 1"):
        run_corpus(RunOptions(model=str(model_dir), data=str(data), batch_size=0), tmp_path / "y", model=model)


def test_data_formats(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2\n\nw3\n")
    assert [(r.row, r.text) for r in read_corpus(tmp_path / "a.txt")] == [(0, "w1 w2"), (1, ""), (2, "w3")]
    (tmp_path / "b.jsonl").write_text('{"body": "w1", "id": 7}\n')
    assert read_corpus(tmp_path / "b.jsonl", "body")[0].id == 7
    with pytest.raises(CorpusOptionsError, match="--text-field"):
        read_corpus(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusOptionsError, match="line 1: not JSON"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("x\n")
    with pytest.raises(CorpusOptionsError, match="unknown data format"):
        read_corpus(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="no data"):
        read_corpus(tmp_path / "missing.jsonl")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["w1 w2", "w3"], "id": ["a", "b"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [(r.id, r.text) for r in read_corpus(tmp_path / "ds")] == [("a", "w1 w2"), ("b", "w3")]
    with pytest.raises(CorpusOptionsError, match="no 'body'"):
        read_corpus(tmp_path / "ds", "body")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusOptionsError, match="one split"):
        read_corpus(tmp_path / "dd")


def test_unfinished_run_has_no_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="not finished"):
        read_table(tmp_path)


def test_shard_replaced_by_an_encoder_decoder_result_is_refused(model, model_dir, tmp_path):
    from tests.support.models import build_seq2seq

    opts = RunOptions(model=str(model_dir), data=str(_data(tmp_path, _texts(3))), batch_size=4, max_length=12)
    manifest = run_corpus(opts, tmp_path / "out", model=model, progress=False)
    _, bridge = build_seq2seq("marian")
    s2s = lens_alti.attribute(bridge, tokens=torch.tensor([[5, 6, 7]]), decoder_tokens=torch.tensor([[1, 10]]))
    s2s.save(tmp_path / "out" / manifest["shards"][0]["file"])
    with pytest.raises(lens_alti.ResultFormatError, match="Seq2SeqAltiResult, not the AltiResult"):
        read_table(tmp_path / "out")


def test_encoder_decoder_is_refused(tmp_path):
    from tests.support.models import build_seq2seq

    data = _data(tmp_path, _texts(2))
    with pytest.raises(CorpusOptionsError, match="encoder-decoder"):
        run_corpus(RunOptions(model="m", data=str(data)), tmp_path / "o", model=build_seq2seq("marian")[1])


@pytest.mark.slow
def test_cli_and_two_process_torchrun_equal_one_process(model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m lens_alti run ...` (gloo) writes the shards of a one-process run."""
    data = _data(tmp_path, _texts(10))
    common = ["run", "--model", str(model_dir), "--data", str(data), "--batch-size", "2", "--heads", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lens_alti", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "10 of 10 rows attributed" in one.stdout
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "lens_alti", *common, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    _same_shards(tmp_path / "one", tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["attributed"] == 10
    a, b = read_table(tmp_path / "one"), read_table(tmp_path / "two")
    assert a.equals(b)


def test_batch_whose_rows_all_fail_leaves_an_empty_shard(model, model_dir, tmp_path, monkeypatch):
    data = _data(tmp_path, _texts(4))

    def failing(model_, batch, opts, pad):
        raise lens_alti.NonFiniteError("injected NaN")

    monkeypatch.setattr(corpus, "_attribute", failing)
    opts = RunOptions(model=str(model_dir), data=str(data), batch_size=2)
    manifest = run_corpus(opts, tmp_path / "out", model=model, progress=False)
    assert manifest["attributed"] == 0 and manifest["errors"] == 4 and len(manifest["shards"]) == 2
    assert all(corpus.shard_corpus(tmp_path / "out" / s["file"])["rows"] == [] for s in manifest["shards"])
    assert read_table(tmp_path / "out").empty
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert reasons == ["NonFiniteError: injected NaN"] * 4
