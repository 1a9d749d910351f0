"""A forward pass that never forms `[head, n, n]`, and the attention rows recomputed from it (docs/spec.md §9).

`recomputed_attention(model)` runs a TransformerBridge with memory-efficient attention: for the
duration of the context, each decoder layer calls the Hugging Face attention module the bridge
wraps (instead of the bridge's own eager re-implementation), and the model's attention
implementation is `lens_alti_rows`, registered with transformers' `AttentionInterface` and
`AttentionMaskInterface` on first use:

- the mask function returns a `RowsMask`: the model's own mask function (causal, sliding window,
  bidirectional, with the padding mask folded in) kept as a function of (batch, query, key)
  indices and evaluated for a few rows at a time, never as a `[b, 1, n, n]` tensor;
- the attention function receives the queries and keys exactly as the model's eager attention
  would (after rotary embeddings and query/key norms), with the model's scaling and logit
  soft-capping, and returns the attention output computed with torch's
  `scaled_dot_product_attention` (causal without padding: one call; otherwise chunks of query
  rows over the keys their mask lets them see), or, with soft-capping, from the recomputed rows
  in chunks;
- while a layer is recorded (`recording(model, layer, store)`), the function also stores a
  `RecomputedPattern` under the layer's `hook_pattern` name and the values under `hook_v`
  (`[b, pos, kv_head, d_head]`, as the bridge's hook lays them out).

`RecomputedPattern.rows(positions)` is the model's eager softmax for those rows only:
`softmax(mask(softcap(q_i·kᵀ·scaling)))`, masked entries filled with the dtype's minimum as the
eager mask does, computed in float32 and cast to the queries' dtype.

`recomputable(model, layout)` says why a model cannot run this way (None when it can): only
TransformerBridges whose every layer is plain attention (no output gate, head norm, value norm,
sinks or latent values) with a Hugging Face attention class that is tested here against its
eager pattern (`SUPPORTED`). Everything else runs eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.hooks import attention_hook
from lens_alti.reading.types import ModelLayout

NAME = "lens_alti_rows"

# Hugging Face attention classes whose eager attention is `softmax(mask(softcap(q·kᵀ·scaling)))·v` on
# the arguments of the attention interface, checked against the bridge's eager pattern in
# tests/reading/test_efficient.py; the predicate refuses configurations that bypass the interface.
SUPPORTED: dict[str, Callable[[Any], bool]] = {
    "GPT2Attention": lambda m: not getattr(m, "reorder_and_upcast_attn", False),
    "GPTJAttention": lambda m: True,
    "GPTNeoXAttention": lambda m: True,
    "OPTAttention": lambda m: True,
    "LlamaAttention": lambda m: True,
    "MistralAttention": lambda m: True,
    "MixtralAttention": lambda m: True,
    "Qwen2Attention": lambda m: True,
    "Qwen3Attention": lambda m: True,
    "Qwen3MoeAttention": lambda m: True,
    "Gemma2Attention": lambda m: True,
    "Gemma3Attention": lambda m: True,
    "OlmoAttention": lambda m: True,
    "Olmo2Attention": lambda m: True,
    "PhiAttention": lambda m: True,
    "Phi3Attention": lambda m: True,
    "Starcoder2Attention": lambda m: True,
    "GraniteAttention": lambda m: True,
    "CohereAttention": lambda m: True,
    "SmolLM3Attention": lambda m: True,
    "FalconAttention": lambda m: not getattr(getattr(m, "config", None), "alibi", False),
}

# Bytes of one chunk of query rows' scores when the output is computed in chunks.
_OUTPUT_CHUNK_BYTES = 64 * 2**20

_RECORDERS: dict[int, Callable[[RecomputedPattern, Tensor], None]] = {}  # id(HF attention module) -> recorder
_REGISTERED: list[bool] = []


class RowsMask:
    """The model's attention mask as a function of indices, evaluated a few query rows at a time.

    `kind`: "causal" (a plain causal mask, no padding), "full" (bidirectional, no padding) or
    "general" (anything else: sliding windows, padding).
    """

    ndim = 4

    def __init__(
        self, batch: int, q_length: int, kv_length: int, q_offset: int, kv_offset: int,
        mask_function: Callable[..., Any], padding: Tensor | None, kind: str, device: torch.device,
    ) -> None:
        self.batch, self.q_length, self.kv_length = batch, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.mask_function, self.padding, self.kind, self.device = mask_function, padding, kind, device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_length, self.kv_length)

    def at(self, positions: Int[Tensor, "b r"]) -> Bool[Tensor, "b 1 r k"]:
        """Which keys each query row `positions[b, r]` may attend to."""
        positions = positions.to(self.device)
        b, r = positions.shape
        batch_idx = torch.arange(self.batch, device=self.device)[:, None, None, None]
        head_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=self.device)
        q_idx = (positions + self.q_offset)[:, None, :, None]
        kv_idx = (torch.arange(self.kv_length, device=self.device) + self.kv_offset)[None, None, None, :]
        allowed = self.mask_function(batch_idx, head_idx, q_idx, kv_idx)
        if self.padding is not None:
            allowed = allowed & self.padding[batch_idx, kv_idx]
        return allowed.expand(b, 1, r, self.kv_length)


def rows_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None, attention_mask: Tensor | None = None,
    use_vmap: bool = False, device: torch.device | str = "cpu", **_: Any,
) -> RowsMask:
    """The mask interface of `lens_alti_rows` (the arguments of transformers' `sdpa_mask`)."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, prepare_padding_mask

    if use_vmap:
        raise UnsupportedModelError(
            "the model combines its attention mask with a custom mask function (image tokens, blocks): its rows "
            "cannot be recomputed from indices; run with attention='eager'"
        )
    function: Callable[..., Any] = mask_function or causal_mask_function
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None and bool(padding.all()):
        padding = None
    plain = padding is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    kind = "general"
    if plain and function is causal_mask_function:
        kind = "causal"
    elif plain and function is bidirectional_mask_function:
        kind = "full"
    return RowsMask(batch_size, q_length, kv_length, q_offset, kv_offset, function, padding, kind, torch.device(device))


class RecomputedPattern:
    """A layer's attention probabilities, recomputed row by row from its queries and keys (docs/spec.md §9).

    `q[b, H, n, e]`, `k[b, H_kv, n, e]` as the model's attention function received them; query head
    h reads key head `h // (H / H_kv)`. Implements `lens_alti.reading.records.PatternRows`.
    """

    def __init__(
        self, q: Tensor, k: Tensor, mask: RowsMask | Tensor | None, scaling: float, softcap: float | None
    ) -> None:
        self.q, self.k, self.mask, self.scaling, self.softcap = q, k, mask, float(scaling), softcap
        b, h, n, _ = q.shape
        self.shape = (b, h, n, k.shape[2])
        self.dtype, self.device = q.dtype, q.device

    def allowed(self, positions: Int[Tensor, "b r"]) -> Bool[Tensor, "b 1 r k"] | Tensor | None:
        """The mask rows of `positions` (bool), or an additive float mask's rows, or None (no mask)."""
        if isinstance(self.mask, RowsMask):
            return self.mask.at(positions)
        if self.mask is None:
            return None
        dense = self.mask.expand(self.shape[0], -1, -1, -1)
        return dense.gather(2, positions[:, None, :, None].expand(-1, dense.shape[1], -1, dense.shape[-1]))

    def rows(self, positions: Int[Tensor, "b r"]) -> Float[Tensor, "b h r k"]:
        """The attention rows of receivers `positions[b, r]` over every key, as the model's eager attention."""
        probs, lo = self.span_rows(positions)
        n_k = self.k.shape[2]
        if probs.shape[-1] == n_k:
            return probs
        out = probs.new_zeros(*probs.shape[:3], n_k)
        out[..., lo : lo + probs.shape[-1]] = probs
        return out

    def span_rows(self, positions: Int[Tensor, "b r"]) -> tuple[Float[Tensor, "b h r s"], int]:
        """(the rows of `positions[b, r]` over the keys `lo .. lo + s − 1` only, `lo`): every key outside
        the span is masked for every one of these rows (a causal chunk's later keys, a sliding
        window's earlier ones), so its probability is exactly 0 and is never formed."""
        positions = positions.to(self.device, torch.long)
        b, h, _, e = self.q.shape
        h_kv, n_k = self.k.shape[1], self.k.shape[2]
        r = positions.shape[1]
        q = self.q.gather(2, positions[:, None, :, None].expand(b, h, r, e))
        allowed = self.allowed(positions)
        lo, hi = _key_range(allowed, n_k)
        k = self.k[:, :, lo:hi]
        scores = (q.view(b, h_kv, h // h_kv, r, e) @ k[:, :, None].transpose(-1, -2)).view(b, h, r, hi - lo)
        scores.mul_(self.scaling)  # in place: one [b, h, r, k] tensor at a time
        if self.softcap is not None:
            scores = scores.div_(self.softcap).tanh_().mul_(self.softcap)
        if allowed is not None:
            part = allowed[..., lo:hi]
            if part.dtype == torch.bool:
                scores.masked_fill_(~part, torch.finfo(scores.dtype).min)
            else:
                scores.add_(part.to(scores.dtype))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype), lo

    def output(self, v: Float[Tensor, "b h_kv k e"]) -> Float[Tensor, "b h n e"]:
        """The attention output `A @ v` of every query, never forming all rows at once."""
        b, h, n, e = self.q.shape
        groups = h // self.k.shape[1]
        k = self.k.repeat_interleave(groups, 1) if groups > 1 else self.k
        values = v.repeat_interleave(groups, 1) if groups > 1 else v
        kind = self.mask.kind if isinstance(self.mask, RowsMask) else ("full" if self.mask is None else "general")
        if self.softcap is None and kind in ("causal", "full"):
            return F.scaled_dot_product_attention(self.q, k, values, is_causal=kind == "causal", scale=self.scaling)
        out = self.q.new_empty(b, h, n, values.shape[-1])
        step = max(1, _OUTPUT_CHUNK_BYTES // max(1, 4 * b * h * self.shape[-1]))
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            positions = torch.arange(i0, i1, device=self.device).expand(b, i1 - i0)
            if self.softcap is None and isinstance(self.mask, RowsMask):
                allowed = self.mask.at(positions)
                lo, hi = _key_range(allowed, k.shape[2])
                allowed = allowed[..., lo:hi] | ~allowed[..., lo:hi].any(-1, keepdim=True)  # no NaN in padded rows
                out[:, :, i0:i1] = F.scaled_dot_product_attention(
                    self.q[:, :, i0:i1], k[:, :, lo:hi], values[:, :, lo:hi], attn_mask=allowed, scale=self.scaling
                )
            else:
                out[:, :, i0:i1] = self.rows(positions).to(values.dtype) @ values
        return out


def _key_range(allowed: Tensor | None, n_k: int) -> tuple[int, int]:
    """The keys [lo, hi) that some row may attend to (all when a row attends to none: the eager softmax is
    then uniform over every key)."""
    if allowed is None or allowed.dtype != torch.bool:
        return 0, n_k
    rows_any = allowed.any(-1)
    if not bool(rows_any.all()):
        return 0, n_k
    cols = allowed.any(dim=(0, 1, 2)).nonzero().flatten()
    return int(cols[0]), int(cols[-1]) + 1


def rows_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, dropout: float = 0.0,
    scaling: float | None = None, softcap: float | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function of `lens_alti_rows` (the arguments of transformers' eager attention)."""
    for name in ("s_aux", "position_bias", "sinks"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__}: attention with {name} is not recomputed by lens_alti"
            )
    if scaling is None:
        scaling = float(module.head_dim) ** -0.5
    pattern = RecomputedPattern(query, key, attention_mask, scaling, softcap)
    recorder = _RECORDERS.get(id(module))
    if recorder is not None:
        recorder(pattern, value)
    return pattern.output(value).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register `lens_alti_rows` with transformers (once per process, on first use)."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, rows_attention)
    AttentionMaskInterface.register(NAME, rows_mask)
    _REGISTERED.append(True)


def _attention_slots(model: Any) -> list[tuple[Any, str, Any, Any]]:
    """(HF decoder layer, attribute name, the bridge's attention component, the HF attention module) per layer."""
    slots = []
    for block in model.blocks:
        layer = block.original_component
        bridge_attn = block.attn
        name = next((n for n, m in layer._modules.items() if m is bridge_attn), None)
        if name is None:
            raise UnsupportedModelError(
                f"{type(layer).__name__}: the bridge's attention is not a direct child of the decoder layer"
            )
        slots.append((layer, name, bridge_attn, bridge_attn.original_component))
    return slots


def recomputable(model: Any, layout: ModelLayout) -> str | None:
    """Why `model`'s attention rows cannot be recomputed from its queries and keys, or None when they can."""
    if not hasattr(model, "original_model") or not hasattr(model, "blocks"):
        return f"{layout.architecture}: not a TransformerBridge with `blocks`"
    readers = layout.blocks.get("self", [])
    if layout.family != "decoder" or len(readers) != len(model.blocks):
        return f"{layout.architecture}: not a decoder-only model with one attention block per layer"
    if not all(r.plain_attention for r in readers):
        return (
            f"{layout.architecture}: a layer is not plain attention (an output gate, a norm on the heads or values, "
            "sinks, latent values or a mixer)"
        )
    try:
        slots = _attention_slots(model)
    except (UnsupportedModelError, AttributeError) as exc:
        return str(exc)
    for _, _, _, hf_attn in slots:
        cls = type(hf_attn).__name__
        if cls not in SUPPORTED:
            return f"{cls}: its attention is not one lens_alti recomputes (supported: {', '.join(SUPPORTED)})"
        if not SUPPORTED[cls](hf_attn):
            return f"{cls}: this configuration computes its attention outside transformers' attention interface"
    return None


def _configs(model: Any, slots: list[tuple[Any, str, Any, Any]]) -> list[Any]:
    """Every config object whose attention implementation the forward pass reads."""
    found: dict[int, Any] = {}
    for cfg in [getattr(model.original_model, "config", None)] + [getattr(s[3], "config", None) for s in slots]:
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            found[id(cfg)] = cfg
    return list(found.values())


@contextlib.contextmanager
def recomputed_attention(model: Any) -> Iterator[None]:
    """Run `model` (a bridge `recomputable` accepts) with `lens_alti_rows` attention inside the context."""
    _register()
    slots = _attention_slots(model)
    configs = _configs(model, slots)
    before = [cfg._attn_implementation for cfg in configs]
    try:
        for layer, name, _, hf_attn in slots:
            setattr(layer, name, hf_attn)
        for cfg in configs:
            cfg._attn_implementation = NAME
        yield
    finally:
        for cfg, old in zip(configs, before, strict=True):
            cfg._attn_implementation = old
        for layer, name, bridge_attn, _ in slots:
            setattr(layer, name, bridge_attn)


@contextlib.contextmanager
def recording(model: Any, layer: int, store: dict[str, Any]) -> Iterator[None]:
    """Inside `recomputed_attention`: store layer `layer`'s `RecomputedPattern` and values when it runs."""
    hf_attn = model.blocks[layer].attn.original_component
    pattern_name, values_name = attention_hook(layer, "pattern"), attention_hook(layer, "v")

    def record(pattern: RecomputedPattern, value: Tensor) -> None:
        store[pattern_name] = pattern
        store[values_name] = value.transpose(1, 2)  # [b, pos, kv_head, d_head], as hook_v

    _RECORDERS[id(hf_attn)] = record
    try:
        yield
    finally:
        _RECORDERS.pop(id(hf_attn), None)
