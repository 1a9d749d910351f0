"""Linear-recurrent mixer layers (Mamba, Mamba-2, ...) against the independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import lens_alti
from lens_alti.alti.decompose import check_reconstruction, decompose
from lens_alti.reading import model_layout
from tests.support import mixer_models
from tests.support.mixer_models import MIXER_ARCHS, build_mixer_bridge
from tests.support.models import boot
from tests.support.reference import hf_eps
from tests.support.reference_gated import per_head_alti
from tests.support.reference_mixers import reference_mixer_layers

TOL = 1e-5


def _tokens(batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1000, (batch, pos), generator=g)


@pytest.fixture(scope="module", params=MIXER_ARCHS)
def run(request):
    hf, bridge = build_mixer_bridge(request.param)
    tokens = _tokens()
    _, cache = bridge.run_with_cache(tokens)
    return request.param, hf, bridge, tokens, cache, reference_mixer_layers(hf, tokens)


def _attribute(arch: str, cache, **kw):
    return lens_alti.attribute(cache, **kw)


def test_every_mixer_layer_reconstructs_the_real_output(run):
    """Σ_j T_i(x_j) + bias_i equals the real x + mixer(norm(x)) of the cache, layer by layer."""
    arch, _, bridge, _, cache, ref = run
    readers = model_layout(bridge).blocks["self"]
    for layer, want in ref.items():
        block = readers[layer].build(cache)
        assert block.pattern_is_distribution == bool(want["attention"])
        assert block.pattern.shape[-2:] == (cache["blocks.0.hook_resid_pre"].shape[1],) * 2
        rel = check_reconstruction(decompose(block, dtype=torch.float64), block, tolerance=1e-5)
        assert rel < 1e-5


@pytest.mark.parametrize("measure", ["l1", "l2", "koba"])
def test_mixer_layers_match_reference(run, measure):
    """Computed in float64 from the float32 cache (in float32, ‖y‖ − ‖y − T‖ cancels for small T)."""
    arch, _, bridge, _, cache, ref = run
    res = _attribute(arch, cache, measure=measure, dtype=torch.float64)
    assert res.layers.shape[1] == len(bridge.blocks)
    assert ref, f"{arch}: the reference found no mixer layer"
    for layer, want in ref.items():
        torch.testing.assert_close(res.layers[:, layer], want[measure], atol=TOL, rtol=0)
    assert float(res.reconstruction_error.max()) < 1e-5


def test_float32_is_close_and_rows_sum_to_one(run):
    arch, *_, cache, ref = run
    res = _attribute(arch, cache)
    assert res.layers.dtype == torch.float32
    for layer, want in ref.items():
        # Rows whose raw contributions are a tiny fraction of ‖y‖₁ (the bias dominates) are below
        # float32 resolution; they are compared in float64 above.
        ok = want["l1_mass"] > 1e-2
        assert float(ok.double().mean()) > 0.3
        torch.testing.assert_close(res.layers[:, layer].double()[ok], want["l1"][ok], atol=1e-4, rtol=0)
    sums = res.layers.sum(-1)  # 1, or 0 for a row whose bias outweighs every source (docs/spec.md §2)
    assert bool(((sums - 1).abs() < 1e-5).logical_or(sums == 0).all())
    assert float((sums == 0).double().mean()) < 0.1
    assert torch.equal(res.layers, res.layers.tril())  # causal
    # Rollout through every layer, attention and mixer layers alike.
    expect = res.layers[:, 0]
    for layer in range(1, res.layers.shape[1]):
        expect = res.layers[:, layer] @ expect
    torch.testing.assert_close(res.rollout[:, -1], expect, atol=1e-6, rtol=0)


def test_pure_mixer_rollout_matches_reference(run):
    arch, _, bridge, _, cache, ref = run
    if len(ref) != len(bridge.blocks):
        pytest.skip(f"{arch} also has attention layers")
    res = _attribute(arch, cache, dtype=torch.float64)
    expect = ref[0]["l1"]
    for layer in range(1, len(ref)):
        expect = ref[layer]["l1"] @ expect
    torch.testing.assert_close(res.rollout[:, -1], expect, atol=TOL, rtol=0)


def test_corrupted_cache_fails_the_reconstruction_check(run):
    """The check compares with the real layer output: a wrong value must be caught."""
    arch, _, bridge, _, cache, ref = run
    layer = next(iter(ref))
    name = model_layout(bridge).blocks["self"][layer].hooks[1]  # the mixer's source activation
    original = cache.cache_dict[name]
    try:
        bad = original.clone()
        bad[:, 2] += 0.5
        cache.cache_dict[name] = bad
        with pytest.raises(lens_alti.errors.ReconstructionError, match=f"blocks.{layer}"):
            lens_alti.attribute(cache)
    finally:
        cache.cache_dict[name] = original


DELTANET_ARCHS = ("qwen3_next", "qwen3_5", "olmo_hybrid")
# RecurrentGemma's recurrent block ignores the attention mask: left padding enters its convolution and
# recurrence in the model itself, so only right padding can equal single runs.
LEFT_PADDING_MIXES = ("recurrent_gemma",)


def test_right_padded_batch_equals_single_runs(run):
    arch, _, bridge, tokens, _, _ = run
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    _, cache = bridge.run_with_cache(tokens, attention_mask=mask)
    if arch in DELTANET_ARCHS:
        pytest.skip("gated DeltaNet: padded batches are refused (test above)")
    padded = _attribute(arch, cache, attention_mask=mask)
    single = _attribute(arch, bridge.run_with_cache(tokens[1:, :4])[1])
    torch.testing.assert_close(padded.layers[1:, :, :4, :4], single.layers, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.rollout[1:, :, :4, :4], single.rollout, atol=1e-5, rtol=0)
    assert float(padded.layers[1, :, 4:].abs().max()) == 0


def test_left_padded_batch_equals_single_runs(run):
    """The Mamba, Mamba-2 and LFM2 readers see the mask the layer applied (its zeroed input)."""
    arch, _, bridge, tokens, _, _ = run
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    _, cache = bridge.run_with_cache(tokens, attention_mask=mask)
    if arch in DELTANET_ARCHS + LEFT_PADDING_MIXES:  # no masked input recorded / the model mixes the padding
        with pytest.raises(lens_alti.errors.UnsupportedModelError, match="one at a time"):
            _attribute(arch, cache, attention_mask=mask)
        return
    padded = _attribute(arch, cache, attention_mask=mask)
    single = _attribute(arch, bridge.run_with_cache(tokens[1:, 3:])[1])
    torch.testing.assert_close(padded.layers[1:, :, 3:, 3:], single.layers, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.rollout[1:, :, 3:, 3:], single.rollout, atol=1e-5, rtol=0)
    assert float(padded.layers[1, :, :3].abs().max()) == 0 and float(padded.layers[1, :, :, :3].abs().max()) == 0


def _headless(ref) -> bool:
    """A mixer layer whose channels form no heads (Mamba-1, short convolution, an MLP-only layer,
    Falcon-H1's parallel block): the reference gives it no per-head parts."""
    return any("parts" not in want and not bool(want["attention"]) for want in ref.values())


def test_per_head_contributions_are_refused_for_headless_mixer_layers(run):
    arch, *_, cache, ref = run
    if not _headless(ref):
        pytest.skip(f"{arch}: every mixer layer has heads")
    # NemotronH meets its 4-head attention layer after its 8-head Mamba-2 layer, before the MLP-only one.
    with pytest.raises(
        lens_alti.errors.UnsupportedModelError, match="per channel, not per head|one head count for every layer"
    ):
        _attribute(arch, cache, heads=True)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_per_head_contributions_of_mixers_with_heads_match_reference(run, backend):
    """Mamba-2 and gated DeltaNet: a head's part is the sum of its channels' parts (docs/spec-mixers.md §7),
    against the reference's runs with one token's one head switched on."""
    arch, _, bridge, _, cache, ref = run
    if _headless(ref):
        pytest.skip(f"{arch}: a mixer layer without heads")
    counts = {int(w["parts"].shape[1]) for w in ref.values() if "parts" in w}
    counts |= {int(bridge.cfg.n_heads)} if any(bool(w["attention"]) for w in ref.values()) else set()
    attn_heads = {b.attn.W_O.shape[0] for b in bridge.blocks if hasattr(b, "attn") and hasattr(b.attn, "W_O")}
    if len(counts | attn_heads) > 1:  # Bamba, GraniteMoeHybrid: 8 SSM heads, 4 attention heads
        with pytest.raises(lens_alti.errors.UnsupportedModelError, match="one head count for every layer"):
            _attribute(arch, cache, heads=True, backend=backend)
        return
    res = _attribute(arch, cache, heads=True, dtype=torch.float64, backend=backend)
    checked = 0
    for layer, want in ref.items():
        if "parts" not in want:
            continue
        expect = per_head_alti(want["parts"], want["y"], want["x"])
        for key in ("heads", "heads_residual", "head_outputs", "head_outputs_residual"):
            torch.testing.assert_close(getattr(res, key)[:, layer], expect[key], atol=TOL, rtol=0, msg=key)
        checked += 1
    assert checked
    rows = res.heads.sum((2, 4)) + res.heads_residual  # [b, layer, q]
    assert float((rows - 1).abs().max()) < 1e-9


def test_attention_baselines_are_refused_for_mixer_layers(run):
    arch, _, _, _, cache, ref = run
    if all(bool(w["attention"]) for w in ref.values()):
        pytest.skip("no recurrent mixer layer")
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="no attention weights"):
        _attribute(arch, cache, measure="attention")
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="attention rollout needs"):
        lens_alti.attention_rollout(cache)


def test_hook_names_suffice_for_a_padded_batch(run):
    """`hook_names(model)` as names_filter caches everything the mixer readers need, masks included."""
    arch, _, bridge, tokens, _, _ = run
    if arch in DELTANET_ARCHS:
        pytest.skip("gated DeltaNet reads no mask")
    mask = torch.ones_like(tokens)
    if arch in LEFT_PADDING_MIXES:
        mask[0, -2:] = 0
    else:
        mask[0, :2] = 0
    names = set(lens_alti.hook_names(bridge))
    _, full = bridge.run_with_cache(tokens, attention_mask=mask)
    _, small = bridge.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n in names)
    a = _attribute(arch, full, attention_mask=mask)
    b = _attribute(arch, small, attention_mask=mask)
    torch.testing.assert_close(a.layers, b.layers)


def test_per_head_left_padded_batch_equals_single_runs(run):
    """Per-head results of a Mamba-2 model (the layer's own zeroed input shows the padding)."""
    arch, _, bridge, tokens, _, ref = run
    if arch != "mamba2":
        pytest.skip("the pure Mamba-2 model covers the padded per-head path")
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    padded = _attribute(arch, bridge.run_with_cache(tokens, attention_mask=mask)[1], attention_mask=mask, heads=True)
    single = _attribute(arch, bridge.run_with_cache(tokens[1:, 3:])[1], heads=True)
    torch.testing.assert_close(padded.heads[1:, :, :, 3:, 3:], single.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.head_outputs[1:, :, :, 3:], single.head_outputs, atol=1e-5, rtol=0)
    assert float(padded.heads[1, :, :, :3].abs().max()) == 0 and float(padded.heads[1, ..., :3].abs().max()) == 0


def _final_direction(hf, tokens: torch.Tensor, target: int) -> torch.Tensor:
    """w = g / rms(x_N) ⊙ W_U[:, target]: the final RMSNorm linearised at the last position's real input."""
    backbone = getattr(hf, "backbone", None) or hf.model
    norm = getattr(backbone, "norm_f", None) or backbone.norm
    seen = {}

    def grab(_m: torch.nn.Module, args: tuple) -> None:
        seen["x"] = args[0].detach().double()

    handle = norm.register_forward_pre_hook(grab)
    with torch.no_grad():
        hf(input_ids=tokens, use_cache=False)
    handle.remove()
    x_n = seen["x"][0, -1]
    eps = hf_eps(norm)
    return norm.weight.double() / (x_n.pow(2).mean() + eps).sqrt() * hf.lm_head.weight[target].double()


def test_logit_attribution_and_routes_per_mixer_head():
    """Mamba-2: ALTI-Logit's Δ^l[h, k] = T^h_N(x_k)·w per SSM head, against the per-head reference;
    routes' head axis is the 8 SSM heads."""
    hf, bridge = build_mixer_bridge("mamba2")
    tokens, target = _tokens(1, 6), 5
    _, cache = bridge.run_with_cache(tokens)
    attr = lens_alti.logit_attribution(cache, target=target, tokens=tokens, dtype=torch.float64)
    ref = reference_mixer_layers(hf, tokens)
    w = _final_direction(hf, tokens, target)
    for layer, want in ref.items():
        torch.testing.assert_close(attr.heads[0, layer], want["parts"][0, :, -1] @ w, atol=1e-6, rtol=1e-6)
    routes = lens_alti.routes(cache, target=target, tokens=tokens)
    assert routes.head_importance.shape == (len(ref), want["parts"].shape[1])


def test_logit_attribution_and_routes_refuse_mixed_head_counts():
    """Jamba: a Mamba-1 layer (no heads: one part) and a 4-head attention layer."""
    _, bridge = build_mixer_bridge("jamba")
    tokens = _tokens(1, 6)
    _, cache = bridge.run_with_cache(tokens)
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="need one head count"):
        lens_alti.logit_attribution(cache, target=5, tokens=tokens)
    with pytest.raises(lens_alti.errors.UnsupportedModelError, match="different numbers of heads"):
        lens_alti.routes(cache, target=5, tokens=tokens)


def test_recurrent_gemma_check_goes_through_the_real_layer_output(monkeypatch):
    """RecurrentGemma caches no residual between its temporal block and the MLP: the check compares
    r̂ + mlp(norm(r̂)) with the real hook_resid_post. A wrong operator (the RG-LRU decay kernel
    off by 1%) or a corrupted input must fail it."""
    from lens_alti.reading.mixers import griffin

    _, bridge = build_mixer_bridge("recurrent_gemma")
    _, cache = bridge.run_with_cache(_tokens())
    lens_alti.attribute(cache)  # passes as is
    real = griffin.gated_decay
    monkeypatch.setattr(griffin, "gated_decay", lambda log_a, reset: real(log_a, reset) * 1.01)
    with pytest.raises(lens_alti.errors.ReconstructionError, match="blocks.0"):
        lens_alti.attribute(cache)
    monkeypatch.setattr(griffin, "gated_decay", real)
    name = "blocks.1.hook_resid_pre"
    original = cache.cache_dict[name]
    try:
        bad = original.clone()
        bad[:, 3] += 0.5
        cache.cache_dict[name] = bad
        with pytest.raises(lens_alti.errors.ReconstructionError, match="blocks.1"):
            lens_alti.attribute(cache)
    finally:
        cache.cache_dict[name] = original


def test_logit_attribution_needs_the_residual_after_the_mixer():
    """RecurrentGemma layers have no hook_resid_mid in the bridge (nor their temporal block's output): a
    specific refusal, not the 'run without names_filter' advice of a missing hook (no run can record it).
    Mamba layers have none either, but their mixer's hook_out gives the write after it (tested above)."""
    for arch in ("recurrent_gemma",):
        _, bridge = build_mixer_bridge(arch)
        _, cache = bridge.run_with_cache(_tokens())
        with pytest.raises(lens_alti.errors.UnsupportedModelError, match="hook_resid_mid in the bridge"):
            lens_alti.logit_attribution(cache, target=5)


def test_recurrent_gemma_half_precision_cache():
    """A bfloat16 model: recomputed in float64 from the half cache, checked within the half tolerance."""
    hf = mixer_models.hf_mixer_model("recurrent_gemma").to(torch.bfloat16)
    _, cache = boot(hf).run_with_cache(_tokens())
    res = lens_alti.attribute(cache)
    assert float(res.reconstruction_error.max()) < 5e-2
    sums = res.layers.sum(-1)
    assert bool(((sums - 1).abs() < 1e-4).all())
