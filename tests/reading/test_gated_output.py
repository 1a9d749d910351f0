"""Attention whose output is gated per receiver and channel before o_proj (Qwen3-Next, Qwen3.5,
Qwen3.5-MoE, AFMoE) against the independent dense float64 reference (tests/support/reference_gated.py).

The gate `σ(g_i,h,e)` is fixed per receiver, so the block is linear in the sources with
receiver-dependent value vectors; the record holds one channel per (head, d_head index) and
per-head results sum each head's channels (docs/spec-mixers.md §7).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lens_alti
from lens_alti.alti.decompose import decompose
from lens_alti.errors import LensAltiError, UnsupportedModelError
from lens_alti.reading import model_layout
from lens_alti.reading.gated_output import gated_output, has_output_gate
from lens_alti.reading.layer_kinds import original
from tests.support.architecture_sweep import build_tiny
from tests.support.mixer_models import build_mixer_bridge
from tests.support.reference import hf_eps
from tests.support.reference_gated import reference_gated_layers

TOL = 1e-5
# (how to build it, name): Qwen3-Next / Qwen3.5 as hybrids (layer 0 gated DeltaNet, layer 1 gated
# attention), Qwen3.5-MoE and AFMoE as the architecture sweep builds them.
MODELS = {
    "qwen3_next": lambda: build_mixer_bridge("qwen3_next"),
    "qwen3_5": lambda: build_mixer_bridge("qwen3_5"),
    "qwen3_5_moe": lambda: build_tiny("Qwen3_5MoeForCausalLM"),
    "afmoe": lambda: build_tiny("AfmoeForCausalLM"),
    "laguna_per_element": lambda: build_tiny("LagunaForCausalLM", gating="per-element"),  # softplus gate
}


def _tokens(batch: int = 2, pos: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(MODELS))
def run(request):
    hf, bridge = MODELS[request.param]()
    tokens = _tokens()
    _, cache = bridge.run_with_cache(tokens)
    ref = reference_gated_layers(hf, tokens)
    assert ref, f"{request.param}: the reference found no gated attention layer"
    return request.param, bridge, tokens, cache, ref


def test_gate_is_detected_through_bridge_wrappers():
    bridge = build_mixer_bridge("qwen3_next")[1]
    attn = bridge.blocks[1].attn
    assert not isinstance(original(attn).q_proj, torch.nn.Linear)  # the bridge wrapped it
    assert has_output_gate(original(attn), attn)


def test_record_holds_one_channel_per_head_and_d_head(run):
    name, bridge, _, cache, ref = run
    readers = model_layout(bridge).blocks["self"]
    for layer in ref:
        block = readers[layer].build(cache)
        H, e = ref[layer]["parts"].shape[1], bridge.cfg.d_head
        assert block.channels_per_head == e and block.pattern.shape[1] == H * e and block.output_gated
        assert any(h.endswith(("hook_q_gate", "gate.hook_out")) for h in readers[layer].hooks)  # read from the cache


@pytest.mark.parametrize("backend", ["eager", "native", pytest.param("compiled", marks=pytest.mark.slow)])
def test_tokens_and_heads_match_dense_reference(run, backend):
    name, _, _, cache, ref = run
    res = lens_alti.attribute(cache, heads=True, dtype=torch.float64, backend=backend)
    assert float(res.reconstruction_error.max()) < 1e-5
    for layer, want in ref.items():
        torch.testing.assert_close(res.layers[:, layer], want["l1"], atol=TOL, rtol=0)
        for key in ("heads", "heads_residual", "head_outputs", "head_outputs_residual"):
            torch.testing.assert_close(getattr(res, key)[:, layer], want[key], atol=TOL, rtol=0, msg=key)
    assert res.heads.shape[2] == next(iter(ref.values()))["parts"].shape[1]  # real heads, not channels


def test_float32_rows_sum_to_one(run):
    *_, cache, ref = run
    res = lens_alti.attribute(cache, heads=True)
    assert res.layers.dtype == torch.float32
    assert float((res.layers.sum(-1) - 1).abs().max()) < 1e-5
    for layer, want in ref.items():
        torch.testing.assert_close(res.layers[:, layer].double(), want["l1"], atol=1e-4, rtol=0)
    assert float((res.heads.sum((2, 4)) + res.heads_residual - 1).abs().max()) < 1e-5


def test_gate_from_the_ratio_equals_the_cached_gate(run):
    """Without the cached gate, o_proj's input / z gives the same record (to float rounding)."""
    name, bridge, _, cache, ref = run
    layer = next(iter(ref))
    p = f"blocks.{layer}.attn"
    gate_hook = next(h for h in (f"{p}.hook_q_gate", f"{p}.gate.hook_out") if h in cache.keys())
    W_O = bridge.blocks[layer].attn.W_O.detach()
    H = W_O.shape[0]
    values = cache[f"{p}.hook_v"].repeat_interleave(H // cache[f"{p}.hook_v"].shape[2], dim=2)
    args = (cache[f"{p}.hook_pattern"], values, W_O, cache[f"{p}.o.hook_in"], p)
    cached, ratio = gated_output(*args, gate_pre=cache[gate_hook]), gated_output(*args)
    assert cached[3] == ratio[3] == W_O.shape[1]
    torch.testing.assert_close(cached[0], ratio[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(cached[1], ratio[1]) and torch.equal(cached[2], ratio[2])


def test_attention_measure_is_refused(run):
    """The pattern is the gated operator g_i·A, not attention weights (hybrids meet a mixer layer first)."""
    name, *_, cache, _ = run
    all_attention = name in ("afmoe", "laguna_per_element")
    match = "gates its heads' output per receiver" if all_attention else "no attention weights"
    with pytest.raises(UnsupportedModelError, match=match):
        lens_alti.attribute(cache, measure="attention")


def test_left_padded_batch_equals_single_runs():
    """AFMoE (every layer attention): padded batch rows equal single runs, per head too."""
    _, bridge = MODELS["afmoe"]()
    tokens = _tokens()
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    padded = lens_alti.attribute(bridge.run_with_cache(tokens, attention_mask=mask)[1], attention_mask=mask, heads=True)
    single = lens_alti.attribute(bridge.run_with_cache(tokens[1:, 3:])[1], heads=True)
    torch.testing.assert_close(padded.layers[1:, :, 3:, 3:], single.layers, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.rollout[1:, :, 3:, 3:], single.rollout, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.heads[1:, :, :, 3:, 3:], single.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.head_outputs[1:, :, :, 3:], single.head_outputs, atol=1e-5, rtol=0)
    assert float(padded.layers[1, :, :3].abs().max()) == 0 and float(padded.heads[1, ..., :3].abs().max()) == 0


def test_logit_attribution_and_routes_see_real_heads():
    """ALTI-Logit's Δ^l[h, k] = T^h_N(x_k)·w (docs/spec.md §7) per real head, against the dense parts.

    AFMoE is pre-norm (its post-attention norm is on the attention output only), so every
    layer's direction is the final RMSNorm linearised at x_N: w = g / rms(x_N) ⊙ W_U[:, t].
    """
    hf, bridge = MODELS["afmoe"]()
    tokens, target = _tokens(1), 5
    _, cache = bridge.run_with_cache(tokens)
    attr = lens_alti.logit_attribution(cache, target=target, tokens=tokens, dtype=torch.float64)
    ref = reference_gated_layers(hf, tokens)
    final = {}
    def grab(_m: torch.nn.Module, args: tuple) -> None:
        final["x"] = args[0].detach().double()

    handle = hf.model.norm.register_forward_pre_hook(grab)
    with torch.no_grad():
        hf(input_ids=tokens, use_cache=False)
    handle.remove()
    x_n = final["x"][0, -1]
    norm = hf.model.norm
    eps = hf_eps(norm)
    w = norm.weight.double() / (x_n.pow(2).mean() + eps).sqrt() * hf.lm_head.weight[target].double()
    assert attr.heads.shape[2] == bridge.cfg.n_heads and len(ref) == bridge.cfg.n_layers
    for layer, want in ref.items():
        expect = want["parts"][0, :, -1] @ w  # [H, k]
        torch.testing.assert_close(attr.heads[0, layer], expect, atol=1e-6, rtol=1e-6)
    rt = lens_alti.routes(cache, target=target, tokens=tokens)
    assert rt.head_importance.shape == (bridge.cfg.n_layers, bridge.cfg.n_heads)
    heads = rt.edges[rt.edges["kind"] == "head"]["head"].astype(int)
    assert len(heads) and int(heads.max()) < bridge.cfg.n_heads


def test_per_head_gate_still_folds_into_heads():
    """Laguna's per-head gate keeps the cheap record: H heads, no channels."""
    _, bridge = build_tiny("LagunaForCausalLM")
    _, cache = bridge.run_with_cache(_tokens(1))
    block = model_layout(bridge).blocks["self"][0].build(cache)
    assert block.channels_per_head == 1 and block.output_gated and block.pattern.shape[1] == bridge.cfg.n_heads


def _synthetic(h: int = 2, e: int = 3, n: int = 4, d: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(1, h, n, n, generator=g).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    values = torch.randn(1, n, h, e, generator=g)
    W_O = torch.randn(h, e, d, generator=g)
    gate = torch.rand(1, n, h, e, generator=g)
    o = gate * torch.einsum("bhqk,bkhe->bqhe", pattern, values)
    return pattern, values, W_O, o


def test_o_proj_input_that_no_gate_reproduces_is_refused():
    pattern, values, W_O, o = _synthetic()
    values[..., 0, 1] = 0  # head 0, channel 1: z = 0 at every receiver...
    o[..., 0, 1] = 1.0  # ... but o_proj received something
    with pytest.raises(UnsupportedModelError, match="not a receiver-wise gate times the attention output"):
        gated_output(pattern, values, W_O, o, "attn")


def test_o_proj_input_of_the_wrong_shape_is_refused():
    pattern, values, W_O, o = _synthetic()
    with pytest.raises(UnsupportedModelError, match=r"o.hook_in has shape \[1, 4, 5\]"):
        gated_output(pattern, values, W_O, o.reshape(1, 4, 6)[..., :5], "attn")
    with pytest.raises(UnsupportedModelError, match="the cached gate has shape"):
        gated_output(pattern, values, W_O, o, "attn", gate_pre=torch.zeros(1, 4, 7))


def test_channel_grouping_that_does_not_divide_is_a_reader_error():
    pattern, values, W_O, o = _synthetic()
    channels, v, W, G = gated_output(pattern, values, W_O, o, "attn")
    from lens_alti.reading.records import AttentionBlock

    x = torch.randn(1, 4, 5)
    block = AttentionBlock("attn", 0, channels, v, W, None, x, x, channels_per_head=G)
    decompose(block)  # 6 channels, 3 per head: fine
    with pytest.raises(LensAltiError, match="channels_per_head = 4 does not divide"):
        decompose(replace(block, channels_per_head=4))


def test_head_ablation_on_gated_heads_and_refusal_on_mixer_heads():
    """AFMoE's hook_z is the gated z (o_proj's input): zeroing head h removes exactly head h's output.
    Mamba-2 has per-head ALTI now, but no hook_z to ablate: a clear refusal, not a KeyError."""
    from lens_alti.analysis.ablation import head_ablation, logit_diff

    _, bridge = MODELS["afmoe"]()
    tokens = _tokens(1)
    table = head_ablation(bridge, tokens, logit_diff([5], [6]))
    assert len(table.table) == bridge.cfg.n_layers * bridge.cfg.n_heads
    _, mamba = build_mixer_bridge("mamba2")
    with pytest.raises(UnsupportedModelError, match="has no attention hook_z"):
        head_ablation(mamba, tokens, logit_diff([5], [6]))
    from lens_alti.analysis.patching import head_patching

    corrupted = _tokens(1, seed=3)
    patched = head_patching(bridge, tokens, corrupted, logit_diff([5], [6]))
    assert len(patched.table) == bridge.cfg.n_layers * bridge.cfg.n_heads
    with pytest.raises(UnsupportedModelError, match="head_patching patches attention heads' hook_z"):
        head_patching(mamba, tokens, corrupted, logit_diff([5], [6]))


def test_memory_estimate_counts_the_channels():
    """The up-front estimate sees H·d_head channels for per-channel gates and H for per-head ones."""
    bridge = MODELS["afmoe"]()[1]
    readers = model_layout(bridge).blocks["self"]
    assert {r.channels_per_head for r in readers} == {bridge.cfg.d_head} and bridge.cfg.d_head > 1
    readers = model_layout(build_tiny("LagunaForCausalLM")[1]).blocks["self"]
    assert {r.channels_per_head for r in readers} == {1}


def test_restricted_receivers_and_streaming_equal_the_full_result(run):
    """positions= (per-head rows of chosen receivers) and attribute(model, tokens=) keep the channel grouping."""
    name, bridge, tokens, cache, _ = run
    full = lens_alti.attribute(cache, heads=True)
    pos = torch.tensor([[3, 6], [6, 2]])
    part = lens_alti.attribute(cache, heads=True, positions=pos)
    for b in range(2):
        torch.testing.assert_close(part.heads[b], full.heads[b][:, :, pos[b]], atol=1e-6, rtol=0)
        torch.testing.assert_close(part.head_outputs[b], full.head_outputs[b][:, :, pos[b]], atol=1e-6, rtol=0)
    streamed = lens_alti.attribute(bridge, tokens=tokens, heads=True)
    torch.testing.assert_close(streamed.heads, full.heads, atol=1e-6, rtol=0)


def test_ratio_gate_where_the_attention_output_cancels_is_refused():
    """No cached gate and z = Σ_j A v_j cancels at a receiver although its values are large: the
    ratio o / z would be rounding noise there, and a gate of 0 would drop real contributions."""
    pattern, values, W_O, _ = _synthetic()
    a = pattern[0, 0, 1]  # receiver 1 of head 0 attends keys 0 and 1
    values[0, 1, 0, 1] = -a[0] / a[1] * values[0, 0, 0, 1]  # z[1, head 0, channel 1] = 0
    z = torch.einsum("bhqk,bkhe->bqhe", pattern, values)
    assert float(z[0, 1, 0, 1].abs()) < 1e-6
    o = torch.rand(z.shape, generator=torch.Generator().manual_seed(1)) * z
    with pytest.raises(UnsupportedModelError, match="cannot recover it where the attention output cancels"):
        gated_output(pattern, values, W_O, o, "attn")


def test_backend_cost_model_counts_the_channels():
    """`backend="auto"` weighs a per-channel gated layer as H·d_head channels (the work it really does)."""
    from lens_alti.alti.backend import call_work

    bridge = MODELS["afmoe"]()[1]
    _, cache = bridge.run_with_cache(_tokens(batch=1, pos=6))
    layout = model_layout(bridge)
    work = call_work(cache, layout, heads=False, dtype=torch.float32)
    cfg = bridge.cfg
    pairs = 6 * 7 // 2  # causal
    expected = len(layout.blocks["self"]) * cfg.n_heads * cfg.d_head * pairs * cfg.d_model
    assert work.elements == expected
