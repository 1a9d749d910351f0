"""Recomputed attention rows (docs/spec.md §9): exact against the eager pattern, and never `[head, n, n]`.

The eager pattern is the bridge's own `hook_pattern` from `run_with_cache` (the bridge forces
eager attention); the recomputed rows come from the same layers run again with
`lens_alti_rows` attention (`reading.replay` + `reading.efficient`), on a left-padded batch, with
sliding windows shorter than the input where the family has them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lens_alti
from lens_alti.alti.rows import pattern_at
from lens_alti.errors import InvalidArgumentError, UnsupportedModelError
from lens_alti.reading import efficient, model_layout
from lens_alti.reading.efficient import SUPPORTED, recomputable, recomputed_attention
from lens_alti.reading.hooks import pattern_hook
from lens_alti.reading.replay import LayerReplay
from lens_alti.reading.stream import forward_inputs
from tests.support.architecture_sweep import build_tiny
from tests.support.errors import raises_exactly
from tests.support.models import build_bridge, build_seq2seq

N = 9
IDS = torch.randint(4, 1000, (2, N), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[0, 0, 0] + [1] * (N - 3), [1] * N])  # item 0 left-padded by three

# Every class of SUPPORTED, by a tiny model of its family (window 4 < N where the family has one).
FAMILIES = {
    "GPT2Attention": ("GPT2LMHeadModel", {}),
    "GPTJAttention": ("GPTJForCausalLM", {}),
    "GPTNeoXAttention": ("GPTNeoXForCausalLM", {}),
    "OPTAttention": ("OPTForCausalLM", {}),
    "LlamaAttention": ("LlamaForCausalLM", {}),
    "MistralAttention": ("MistralForCausalLM", {"sliding_window": 4}),
    "MixtralAttention": ("MixtralForCausalLM", {"sliding_window": 4}),
    "Qwen2Attention": ("Qwen2ForCausalLM", {}),
    "Qwen3Attention": ("Qwen3ForCausalLM", {}),
    "Qwen3MoeAttention": ("Qwen3MoeForCausalLM", {}),
    "Gemma2Attention": ("Gemma2ForCausalLM", {"sliding_window": 4}),
    "Gemma3Attention": ("Gemma3ForCausalLM", {"sliding_window": 4}),
    "OlmoAttention": ("OlmoForCausalLM", {}),
    "Olmo2Attention": ("Olmo2ForCausalLM", {}),
    "PhiAttention": ("PhiForCausalLM", {}),
    "Phi3Attention": ("Phi3ForCausalLM", {"sliding_window": 4}),
    "Starcoder2Attention": ("Starcoder2ForCausalLM", {"sliding_window": 4}),
    "GraniteAttention": ("GraniteForCausalLM", {}),
    "CohereAttention": ("CohereForCausalLM", {}),
    "SmolLM3Attention": ("SmolLM3ForCausalLM", {}),
    "FalconAttention": ("FalconForCausalLM", {}),
}


def test_every_supported_class_has_a_family_here():
    assert set(FAMILIES) == set(SUPPORTED)


def _tiny(cls_name: str):
    name, overrides = FAMILIES[cls_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny(name, **overrides)[1]


def _replay(bridge, efficient_attention: bool) -> LayerReplay:
    layout = model_layout(bridge)
    replay = LayerReplay(bridge, layout, efficient=efficient_attention, extra_hooks={})
    replay.record(forward_inputs(bridge, layout, IDS, MASK, None, None))
    return replay


@pytest.mark.parametrize("cls_name", sorted(FAMILIES))
def test_recomputed_rows_equal_the_eager_pattern(cls_name):
    bridge = _tiny(cls_name)
    layout = model_layout(bridge)
    assert recomputable(bridge, layout) is None
    assert type(bridge.blocks[0].attn.original_component).__name__ == cls_name
    _, cache = bridge.run_with_cache(IDS, attention_mask=MASK)
    replay = _replay(bridge, efficient_attention=True)
    every = torch.arange(N).expand(2, N)
    for layer, reader in enumerate(layout.blocks["self"]):
        block = reader.build(replay.layer(layer))
        assert block.pattern_rows is not None  # recomputed, not read from a hook
        got, want = pattern_at(block, every), cache[pattern_hook(layer)]
        # Layer 0 reads the same embeddings: the same numbers up to the order of float sums. Later
        # layers read activations of the SDPA forward pass, which round differently from eager ones.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert bool((got[0, :, 3:, :3] == 0).all())  # real rows give padding exactly 0


WINDOWED = ["Gemma2Attention", "MistralAttention"]  # the windowed families the float64 reference reads


@pytest.mark.parametrize("cls_name", WINDOWED)
def test_top_down_rows_over_the_window_only_equal_the_reference(cls_name, monkeypatch):
    """The top-down rollout reads each chunk's rows over the keys they reach only (docs/spec.md §12a): a
    sliding window of 4 < N gives chunks of one receiver at most 4 sources, and the rollout rows still
    equal the dense float64 reference's (right padding: the reference shifts no position ids)."""
    import lens_alti.alti.topdown as topdown
    from tests.support.reference import reference_decoder_only

    name, overrides = FAMILIES[cls_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, bridge = build_tiny(name, **overrides)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 7:] = 0
    widths: list[int] = []
    contributions = topdown.block_contributions
    monkeypatch.setattr(topdown, "block_contributions",
                        lambda tv, *a, **k: widths.append(tv.weights.shape[-1]) or contributions(tv, *a, **k))
    ref = reference_decoder_only(hf, IDS, attention_mask=mask)
    for budget in (1, 2**28):  # one receiver per chunk, or all at once
        widths.clear()
        res = lens_alti.attribute(bridge, tokens=IDS, attention_mask=mask, positions=[-1, 5], attention="recomputed",
                                  max_chunk_bytes=budget)
        p = res.positions
        want = torch.stack([ref["rollout"][b][:, p[b]] for b in range(2)])
        torch.testing.assert_close(res.rollout.double(), want, atol=1e-5, rtol=0)
        if budget == 1:
            assert min(widths) <= 4 < N, widths  # a window's chunk: its 4 keys, not all N
        else:
            assert max(widths) <= N


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_forward_pass_with_recomputed_attention_equals_eager(arch):
    _, bridge = build_bridge(arch)
    with torch.no_grad():
        want = bridge(IDS, attention_mask=MASK)
        with recomputed_attention(bridge):
            got = bridge(IDS, attention_mask=MASK)
        again = bridge(IDS, attention_mask=MASK)
    torch.testing.assert_close(got[:, 3:][1:], want[:, 3:][1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, 3:], want[0, 3:], rtol=1e-5, atol=1e-5)
    assert torch.equal(again, want)  # the context restores the bridge's own attention


def test_rows_mask_equals_the_model_mask():
    """`RowsMask` evaluated row by row is transformers' own boolean mask (causal, sliding window, padding)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    padding = MASK.bool()
    for function in (causal_mask_function, sliding_window_causal_mask_function(4)):
        lazy = efficient.rows_mask(2, N, N, mask_function=function, attention_mask=padding)
        dense = sdpa_mask(2, N, N, mask_function=function, attention_mask=padding, allow_is_causal_skip=False)
        rows = torch.tensor([[0, 4, 8], [8, 2, 5]])
        assert torch.equal(lazy.at(rows), torch.stack([dense[b, :, rows[b]] for b in range(2)]))
    assert efficient.rows_mask(1, N, N, mask_function=causal_mask_function).kind == "causal"
    assert efficient.rows_mask(2, N, N, mask_function=causal_mask_function, attention_mask=padding).kind == "general"


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns that holds memory of its own size (views of a
    single expanded number, such as a recomputed block's pattern placeholder, are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= t.numel() * t.element_size():
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize(("arch", "padded"), [("llama", False), ("llama", True), ("gemma2", True)])
def test_explaining_a_position_never_forms_a_square_pattern(arch, padded, monkeypatch):
    """No op of `logit_attribution(model)` or `attribute(model, positions=[-1])` returns `[..., n, n]`:
    chunks of a few receivers (soft-capped Gemma-2 and padded inputs: the forward pass too)."""
    _, bridge = build_bridge(arch)
    n = 24
    ids = torch.randint(4, 1000, (1, n), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, n, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    monkeypatch.setattr(efficient, "_OUTPUT_CHUNK_BYTES", 4 * 4 * n * 5)  # five query rows per chunk
    small = 4 * 4 * 4 * n * 5  # five receivers per chunk: 4 copies of [1, 4 heads, 5, n] floats
    with _Shapes() as seen:
        lens_alti.logit_attribution(bridge, 5, tokens=ids, attention_mask=mask, attention="recomputed",
                                    max_chunk_bytes=small)
        lens_alti.attribute(bridge, tokens=ids, attention_mask=mask, positions=[-1], heads=True,
                            attention="recomputed", max_chunk_bytes=small)
    square = [(op, s) for op, s in seen.shapes if len(s) >= 3 and s[-2:] == (n, n)]
    assert not square, square[:5]
    assert any(s[-2:] == (5, n) for _, s in seen.shapes)  # the rows were recomputed in chunks


def test_eager_attention_does_form_it():
    """The same check sees the eager pattern when attention='eager' (so the test above can fail)."""
    _, bridge = build_bridge("llama")
    ids = torch.randint(4, 1000, (1, 24), generator=torch.Generator().manual_seed(5))
    with _Shapes() as seen:
        lens_alti.logit_attribution(bridge, 5, tokens=ids, attention="eager")
    assert any(len(s) == 4 and s[-2:] == (24, 24) for _, s in seen.shapes)


def test_models_that_cannot_be_recomputed_are_refused_or_run_eagerly(monkeypatch):
    _, bert = build_seq2seq("bert")
    why = recomputable(bert, model_layout(bert))
    assert why is not None and "decoder-only" in why
    raises_exactly(UnsupportedModelError, "attention='recomputed'", lens_alti.attribute, bert, tokens=IDS,
                   positions=[2], attention="recomputed")
    _, llama = build_bridge("llama")
    monkeypatch.delitem(SUPPORTED, "LlamaAttention")
    err = raises_exactly(UnsupportedModelError, "LlamaAttention", lens_alti.logit_attribution, llama, 5,
                         tokens=IDS, attention="recomputed")
    assert "attention='eager'" in str(err)
    _, cache = llama.run_with_cache(IDS)
    auto = lens_alti.logit_attribution(llama, 5, tokens=IDS)  # "auto": eager, the cache path's numbers
    torch.testing.assert_close(auto.by_layer, lens_alti.logit_attribution(cache, 5, tokens=IDS).by_layer,
                               atol=1e-6, rtol=0)


def test_bad_attention_argument():
    _, bridge = build_bridge("gpt2")
    for call in (lens_alti.attribute, lens_alti.routes):
        raises_exactly(InvalidArgumentError, "attention='flash'", call, bridge, tokens=IDS, attention="flash")
    raises_exactly(InvalidArgumentError, "attention='flash'", lens_alti.logit_attribution, bridge, 5, tokens=IDS,
                   attention="flash")


def test_attention_with_sinks_is_not_recomputed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, bridge = build_tiny("GptOssForCausalLM")
    why = recomputable(bridge, model_layout(bridge))
    assert why is not None and "not plain attention" in why


def test_a_layer_that_runs_differently_again_is_refused():
    """The layer run again must reproduce the next layer's recorded input."""
    _, bridge = build_bridge("llama")
    replay = _replay(bridge, efficient_attention=False)
    replay.layer(1)  # the last layer has no successor to check
    handle = bridge.blocks[0].register_forward_hook(lambda m, a, out: (out[0] + 1e-2, *out[1:])
                                                   if isinstance(out, tuple) else out + 1e-2)
    try:
        raises_exactly(UnsupportedModelError, "run again on its recorded input", replay.layer, 0)
    finally:
        handle.remove()
