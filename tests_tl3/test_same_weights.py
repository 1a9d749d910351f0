"""Same weights, two TransformerLens versions: HookedTransformer (3.x) vs TransformerBridge (4.x).

Tiny random Hugging Face models are converted into HookedTransformer / HookedEncoder /
HookedEncoderDecoder with TransformerLens' own weight converters, loaded as
`from_pretrained_no_processing` loads them. Two checks, both to 1e-5:

1. against the independent float64 references on the Hugging Face modules (`tests/support/reference.py`,
   `tests/support/reference_seq2seq.py`) — the same references the 4.x tests hold the bridge to;
2. directly against the bridge: the models are saved to disk and `tests_tl3/bridge_alti.py` runs
   in the 4.x environment (.venv) on them. Skipped without .venv, except in CI, where it fails.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import warnings

import pytest
import torch

import lens_alti
from tests.support.reference import reference_decoder_only
from tests.support.reference_seq2seq import reference_encoder, reference_seq2seq
from tests_tl3.bridge_alti import result_fields
from tests_tl3.models import DECODER_ARCHS, from_hf, hf_model, tokenizer

TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (*DECODER_ARCHS, "bert", "t5")


def _ids(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


INPUTS = {"ids": _ids(2, 9, 11), "src": _ids(2, 9, 12), "tgt": _ids(2, 6, 13)}


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=0)


@pytest.fixture(scope="module")
def hf_models():
    return {arch: hf_model(arch, seed=3) for arch in ARCHS}


@pytest.fixture(scope="module")
def hooked_caches(hf_models):
    """Caches of the unprocessed HookedTransformer-family models, per architecture."""
    out = {}
    for arch, hf in hf_models.items():
        model = from_hf(hf)
        if arch == "t5":
            _, out[arch] = model.run_with_cache(INPUTS["src"], decoder_input=INPUTS["tgt"])
        else:
            _, out[arch] = model.run_with_cache(INPUTS["ids"])
    return out


@pytest.fixture(scope="module")
def hooked_results(hooked_caches):
    """lens_alti results computed in float64 from the float32 caches: only the caches and the
    reading differ between the sides compared (float32 arithmetic alone moves per-head numbers
    by up to ~3e-5 on these models; that is covered by test_same_numbers_in_float32)."""
    return {arch: lens_alti.attribute(cache, heads=True, dtype=torch.float64) for arch, cache in hooked_caches.items()}


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_decoder_matches_hf_reference(arch, hf_models, hooked_results):
    res, ref = hooked_results[arch], reference_decoder_only(hf_models[arch], INPUTS["ids"])
    assert res.weight_processing == "raw"
    close(res.layers, ref["l1"])
    close(res.rollout, ref["rollout"])
    close(res.heads, ref["heads"])
    close(res.heads_residual, ref["heads_residual"])


def test_bert_matches_hf_reference(hf_models, hooked_results):
    res, ref = hooked_results["bert"], reference_encoder(hf_models["bert"], INPUTS["ids"])
    close(res.layers, ref["l1"])
    close(res.rollout, ref["rollout"])
    close(res.heads, ref["heads"])


def test_t5_matches_hf_reference(hf_models, hooked_results):
    res = hooked_results["t5"]
    ref = reference_seq2seq(hf_models["t5"], INPUTS["src"], INPUTS["tgt"])
    close(res.encoder.layers, ref["encoder_l1"])
    close(res.decoder_self, ref["decoder_self"])
    close(res.cross, ref["cross"])
    close(res.cross_heads, ref["cross_heads"])
    close(res.total, ref["total"])


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_from_pretrained_processing(arch, hf_models, hooked_results):
    """from_pretrained's default processing: still exact; flagged where it changes the numbers.

    GPT-2 and NeoX (LayerNorm, value biases): centred residual stream and b_V folded into b_O,
    so the numbers move. LLaMA (RMSNorm, no biases): only fold_ln applies, the numbers are the
    unprocessed model's and the result says "raw".
    """
    model = from_hf(hf_models[arch], processed=True)
    _, cache = model.run_with_cache(INPUTS["ids"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lens_alti.attribute(cache, heads=True)
    warned = any(issubclass(w.category, lens_alti.WeightProcessingWarning) for w in caught)
    assert float(res.reconstruction_error.max()) < 1e-5
    raw = hooked_results[arch]
    if arch == "llama":
        assert res.weight_processing == "raw" and not warned
        close(res.layers, raw.layers)
        close(res.heads, raw.heads)
    else:
        assert warned and "center_writing_weights, fold_value_biases" in res.weight_processing
        assert float((res.layers - raw.layers).abs().max()) > 1e-3


def _bridge_python() -> pathlib.Path | None:
    python = ROOT / os.environ.get("LENS_ALTI_VENV", ".venv") / "bin" / "python"  # --latest: .venv-latest
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "from transformer_lens.model_bridge import TransformerBridge"], capture_output=True
    )
    return python if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def bridge_results(hf_models, tmp_path_factory):
    python = _bridge_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have the TransformerLens 4.x environment .venv (bash scripts/setup.sh)")
        pytest.skip("no TransformerLens 4.x environment at .venv (bash scripts/setup.sh)")
    folder = tmp_path_factory.mktemp("same_weights")
    tokenizer().save_pretrained(folder / "tokenizer")
    torch.save(INPUTS, folder / "inputs.pt")
    for arch, hf in hf_models.items():
        hf.save_pretrained(folder / arch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [str(python), str(ROOT / "tests_tl3" / "bridge_alti.py"), str(folder)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return torch.load(folder / "bridge.pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_same_numbers_as_transformer_bridge(arch, hooked_results, bridge_results):
    assert str(bridge_results["transformer_lens"]).startswith("4.")
    assert bridge_results[f"{arch}.weight_processing"] == "raw" == hooked_results[arch].weight_processing
    for name, value in result_fields(hooked_results[arch]).items():
        close(value, bridge_results[f"{arch}.{torch.float64}.{name}"])


@pytest.mark.parametrize("arch", ARCHS)
def test_same_numbers_in_float32(arch, hooked_caches, bridge_results):
    """The default float32 computation on both sides: the same arithmetic on caches that differ by
    float32 rounding only."""
    res = lens_alti.attribute(hooked_caches[arch], heads=True)
    for name, value in result_fields(res).items():
        close(value, bridge_results[f"{arch}.{torch.float32}.{name}"])
