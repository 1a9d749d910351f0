"""`result.save(path)` / `lens_alti.load(path)`: same class, same numbers, same methods."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lens_alti
from lens_alti.results.saving import FORMAT_VERSION, read_header
from tests.support.models import build_bridge, build_seq2seq


@pytest.fixture(scope="module")
def gpt2():
    return build_bridge("gpt2")[1]


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and other.shape == value.shape, name
            torch.testing.assert_close(other, value, equal_nan=True, atol=0, rtol=0, msg=name)
        elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), torch.Tensor):
            assert value.keys() == other.keys()
            for k in value:
                torch.testing.assert_close(other[k], value[k], equal_nan=True, atol=0, rtol=0)
        elif isinstance(value, lens_alti.AltiResult):
            _assert_same(value, other)
        else:
            assert other == value, name


def test_round_trip_decoder(gpt2, tmp_path):
    ids = torch.randint(4, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    res = lens_alti.attribute(gpt2, tokens=ids, attention_mask=mask, heads=True, positions=[-1, -2], check=False)
    res.extra["note"] = {"corpus_rows": [3, 4]}
    path = res.save(tmp_path / "r.safetensors")
    back = lens_alti.load(path)
    _assert_same(res, back)
    assert torch.isnan(back.reconstruction_error).all()  # check=False is kept as NaN
    assert back.top_sources(-1, k=3, batch=1) == res.top_sources(-1, k=3, batch=1)
    assert back.sinks is not None and back.sinks.dtype == torch.bool  # docs/spec.md §10: sinks travel too
    torch.testing.assert_close(back.sink_share, res.sink_share)
    assert back.to_dataframe("heads").equals(res.to_dataframe("heads"))
    header = read_header(path)
    assert header["versions"]["lens_alti"] == lens_alti.__version__
    assert header["versions"]["transformer_lens"]
    assert header["fields"]["architecture"] == res.architecture


def test_round_trip_seq2seq(tmp_path):
    _, bridge = build_seq2seq("marian")
    src = torch.randint(4, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    tgt = torch.tensor([[1, 10, 11, 12]])
    res = lens_alti.attribute(bridge, tokens=src, decoder_tokens=tgt, heads=True)
    back = lens_alti.load(res.save(tmp_path / "s2s.safetensors"))
    _assert_same(res, back)
    assert back.top_sources(-1) == res.top_sources(-1)
    torch.testing.assert_close(back.source_contribution, res.source_contribution)


def test_incompatible_version_is_refused(gpt2, tmp_path):
    res = lens_alti.attribute(gpt2, tokens=torch.tensor([[5, 6, 7]]))
    path = res.save(tmp_path / "r.safetensors")
    header = read_header(path)
    header["format_version"] = FORMAT_VERSION + 1
    header["versions"]["lens_alti"] = "99.0"
    newer = tmp_path / "newer.safetensors"
    save_file({"layers": res.layers}, str(newer), metadata={"lens_alti": json.dumps(header)})
    with pytest.raises(lens_alti.ResultFormatError, match=r"lens_alti 99.0 .* Upgrade lens_alti"):
        lens_alti.load(newer)


def test_not_a_result(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(lens_alti.ResultFormatError, match="not a lens_alti result"):
        lens_alti.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(lens_alti.ResultFormatError, match="not a safetensors file"):
        lens_alti.load(junk)
    with pytest.raises(FileNotFoundError, match="no saved result"):
        lens_alti.load(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="AltiResult"):
        lens_alti.results.saving.save({"layers": torch.zeros(1)}, tmp_path / "x.safetensors")


def test_unserialisable_extra_is_refused(gpt2, tmp_path):
    res = lens_alti.attribute(gpt2, tokens=torch.tensor([[5, 6, 7]]))
    res.extra["model"] = object()
    with pytest.raises(lens_alti.ResultFormatError, match="neither a tensor nor JSON"):
        res.save(tmp_path / "r.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_to_dataframe_matches_a_cell_by_cell_listing(gpt2):
    ids = torch.randint(4, 1000, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    res = lens_alti.attribute(gpt2, tokens=ids, attention_mask=mask, heads=True)
    frame = res.to_dataframe("heads")
    expected = [
        (b, l, h, q, k, res.str_tokens[b][q], res.str_tokens[b][k], float(res.heads[b, l, h, q, k]))
        for b in range(2) for l in range(res.n_layers) for h in range(res.heads.shape[2])
        for q in range(6) for k in range(6) if mask[b, q] and mask[b, k]
    ]
    cols = ["batch", "layer", "head", "query", "key", "query_token", "key_token", "value"]
    got = list(frame[cols].itertuples(index=False, name=None))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g[:7] == e[:7] and g[7] == pytest.approx(e[7])
