"""lens_alti on HookedTransformer / HookedEncoder / HookedEncoderDecoder built from
HookedTransformerConfig with random weights, against the dense float64 reference."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lens_alti
from tests_tl3.models import from_config
from tests_tl3.reference_hooked import reference_hooked, reference_t5

TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
SELF_ARCHS = ("gpt2", "neox", "llama", "attn_only", "bert")


def _ids(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=0)


@pytest.fixture(scope="module", params=SELF_ARCHS)
def run(request):
    model = from_config(request.param)
    ids = _ids(2, 9, 1)
    _, cache = model.run_with_cache(ids)
    return request.param, model, ids, cache, reference_hooked(model, ids)


@pytest.mark.parametrize("measure", ["l1", "l2", "koba", "attention"])
def test_layers_match_reference(run, measure):
    arch, *_, cache, ref = run
    res = lens_alti.attribute(cache, measure=measure)
    assert isinstance(res, lens_alti.AltiResult) and res.weight_processing == "raw"
    close(res.layers, ref[measure])
    assert float(res.reconstruction_error.max()) < 1e-5
    if arch == "bert":
        assert float(res.layers.triu(1).sum()) > 0, "an encoder is not causal"
    else:
        assert float(res.layers.triu(1).abs().max()) == 0


def test_heads_and_rollout_match_reference(run):
    *_, cache, ref = run
    res = lens_alti.attribute(cache, heads=True)
    close(res.rollout, ref["rollout"])
    close(res.heads, ref["heads"])
    close(res.heads_residual, ref["heads_residual"])
    total = res.head_outputs.sum(2) + res.head_outputs_residual
    torch.testing.assert_close(total, torch.ones_like(total))


def test_hook_names_filter_gives_the_same_numbers(run):
    _, model, ids, cache, _ = run
    _, small = model.run_with_cache(ids, names_filter=lens_alti.hook_names(model))
    assert len(small.keys()) < len(cache.keys())
    close(lens_alti.attribute(small).layers, lens_alti.attribute(cache).layers, 0)


def test_missing_hooks_are_listed(run):
    _, model, ids, _, _ = run
    _, cache = model.run_with_cache(ids, names_filter=lambda name: not name.endswith("hook_pattern"))
    with pytest.raises(lens_alti.MissingHooksError, match="blocks.0.attn.hook_pattern"):
        lens_alti.attribute(cache)


def test_labels_from_token_ids():
    model = from_config("gpt2")
    ids = _ids(1, 6, 3)
    _, cache = model.run_with_cache(ids)
    res = lens_alti.attribute(cache, tokens=ids)
    assert res.str_tokens[0] == list(model.to_str_tokens(ids[0]))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_padding_each_item_equals_running_alone(arch):
    """Left padding for the decoders (HookedTransformer offsets positions), right padding for BERT."""
    model = from_config(arch)
    lengths, n = [9, 6], 9
    ids = torch.full((2, n), 3)
    mask = torch.zeros(2, n, dtype=torch.long)
    rows = [_ids(1, k, 20 + b)[0] for b, k in enumerate(lengths)]
    spans = [slice(0, k) if arch == "bert" else slice(n - k, n) for k in lengths]
    for b, span in enumerate(spans):
        ids[b, span] = rows[b]
        mask[b, span] = 1
    kwargs = {"one_zero_attention_mask": mask} if arch == "bert" else {"attention_mask": mask}
    _, cache = model.run_with_cache(ids, **kwargs)
    res = lens_alti.attribute(cache, attention_mask=mask, heads=True)
    for b, span in enumerate(spans):
        _, alone = model.run_with_cache(rows[b][None])
        one = lens_alti.attribute(alone, heads=True)
        close(res.layers[b][:, span, span], one.layers[0])
        close(res.rollout[b][:, span, span], one.rollout[0])
        close(res.heads[b][:, :, span, span], one.heads[0])
        pad = ~mask[b].bool()
        assert float(res.layers[b][:, pad].abs().sum()) == 0 and float(res.layers[b][:, :, pad].abs().sum()) == 0


def test_parallel_residual_mode():
    model = from_config("neox")
    _, cache = model.run_with_cache(_ids(2, 7, 4))
    exclude = lens_alti.attribute(cache)
    residual = lens_alti.attribute(cache, parallel_mlp="residual")
    assert float(residual.reconstruction_error.max()) < 1e-5
    torch.testing.assert_close(residual.layers.sum(-1), torch.ones_like(residual.layers.sum(-1)))
    assert not torch.allclose(exclude.layers, residual.layers, atol=1e-3)


def test_t5_matches_reference():
    model = from_config("t5")
    src, tgt = _ids(2, 9, 5), _ids(2, 6, 6)
    _, cache = model.run_with_cache(src, decoder_input=tgt)
    ref = reference_t5(model, src, tgt)
    res = lens_alti.attribute(cache, heads=True)
    assert isinstance(res, lens_alti.Seq2SeqAltiResult) and res.weight_processing == "raw"
    close(res.encoder.layers, ref["encoder_l1"])
    close(res.encoder.rollout, ref["encoder_rollout"])
    close(res.encoder.heads, ref["encoder_heads"])
    close(res.decoder_self, ref["decoder_self_l1"])
    close(res.decoder_self_heads, ref["decoder_self_heads"])
    close(res.decoder_self_heads_residual, ref["decoder_self_heads_residual"])
    close(res.cross, ref["cross_l1"])
    close(res.cross_heads, ref["cross_heads"])
    close(res.cross_heads_residual, ref["cross_heads_residual"])
    close(res.total, ref["total"])
    for measure in ("l2", "koba"):
        other = lens_alti.attribute(cache, measure=measure)
        close(other.encoder.layers, ref[f"encoder_{measure}"])
        close(other.decoder_self, ref[f"decoder_self_{measure}"])
        close(other.cross, ref[f"cross_{measure}"])
    for errors in res.reconstruction_error.values():
        assert float(errors.max()) < 1e-5


def test_processed_weights_are_detected_and_still_exact():
    """process_weights_ (fold_ln, center_writing_weights, fold_value_biases): exact for the processed
    model, recorded, warned about; the numbers move since the residual stream is centred and b_V moved."""
    raw = from_config("gpt2")
    ids = _ids(2, 8, 7)
    _, raw_cache = raw.run_with_cache(ids)
    processed = from_config("gpt2")
    processed.process_weights_()
    _, cache = processed.run_with_cache(ids)
    with pytest.warns(lens_alti.WeightProcessingWarning):
        res = lens_alti.attribute(cache)
    assert res.weight_processing.startswith("processed")
    for step in ("fold_ln", "center_writing_weights", "fold_value_biases", "from_pretrained_no_processing"):
        assert step in res.weight_processing
    assert float(res.reconstruction_error.max()) < 1e-5
    close(res.layers, reference_hooked(processed, ids)["l1"])
    assert float((res.layers - lens_alti.attribute(raw_cache).layers).abs().max()) > 1e-3


def test_fold_ln_alone_counts_as_raw():
    """fold_ln only moves the norms' weights into W_Q/W_K/W_V, which ALTI never reads: the same
    numbers as unprocessed, "raw", no warning (from_pretrained's default for RMSNorm models
    without value biases, e.g. LLaMA, amounts to this)."""
    raw = from_config("gpt2")
    ids = _ids(2, 8, 8)
    _, raw_cache = raw.run_with_cache(ids)
    folded = from_config("gpt2")
    folded.load_and_process_state_dict(
        folded.state_dict(), fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    assert folded.cfg.normalization_type == "LNPre"
    _, cache = folded.run_with_cache(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lens_alti.WeightProcessingWarning)
        res = lens_alti.attribute(cache)
    assert res.weight_processing == "raw"
    close(res.layers, lens_alti.attribute(raw_cache).layers)


def test_no_value_bias_with_output_bias_is_raw():
    """An unprocessed GPT-Neo (TinyStories) has b_O but no value bias: not mistaken for fold_value_biases."""
    model = from_config("gpt2")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_V.zero_()
    _, cache = model.run_with_cache(_ids(1, 5, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lens_alti.WeightProcessingWarning)
        assert lens_alti.attribute(cache).weight_processing == "raw"


def test_post_attention_norm_is_refused():
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=16, d_vocab=100, act_fn="gelu",
        normalization_type="RMS", use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM",
    )
    model = HookedTransformer(cfg)
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    with pytest.raises(lens_alti.UnsupportedModelError, match="post-attention norm"):
        lens_alti.attribute(cache)


def test_no_model_bridge_import_needed():
    """TransformerLens 3.x releases before the bridge have no transformer_lens.model_bridge: lens_alti
    must import and read HookedTransformer caches without it (3.9 itself imports it, so it is hidden
    after transformer_lens is loaded, before lens_alti is)."""
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "import torch, transformer_lens\n"
        "from tests_tl3.models import from_config\n"
        "for name in [n for n in sys.modules if n.startswith('transformer_lens.model_bridge')]:\n"
        "    sys.modules[name] = None\n"
        "import lens_alti\n"
        "m = from_config('gpt2'); _, cache = m.run_with_cache(torch.tensor([[5, 6, 7, 8]]))\n"
        "print(lens_alti.attribute(cache).layers.shape)\n"
        "try:\n"
        "    lens_alti.attribute(transformer_lens.ActivationCache({}, torch.nn.Linear(2, 2)))\n"
        "except lens_alti.NotACacheError as e:\n"
        "    print('NotACacheError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-2:] == ["torch.Size([1, 2, 4, 4])", "NotACacheError"], out.stdout
