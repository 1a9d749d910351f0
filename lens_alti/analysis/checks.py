"""Argument and model checks shared by the interventions in `lens_alti.analysis`.

Built on `lens_alti.validation`; every helper raises a `LensAltiError` subclass naming the
argument, its value and what is valid, before any forward pass is run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.memory import ATTRIBUTE_ADVICE, BlockShape, attribute_bytes, check_fits, forward_cache_bytes
from lens_alti.api.inputs import valid_mask
from lens_alti.errors import ArgumentTypeError, ContextLengthError, InvalidArgumentError
from lens_alti.validation import check_index, check_position, check_token_ids

__all__ = [
    "check_context",
    "check_metric",
    "check_model",
    "check_prompt_tokens",
    "check_receiver",
    "estimate_ablation_memory",
    "model_dims",
    "pattern_edits_ignored",
]


def check_model(model: Any) -> Any:
    """A TransformerLens model with `cfg` and `run_with_cache` (a TransformerBridge or HookedTransformer)."""
    if not hasattr(model, "run_with_cache") or not hasattr(model, "cfg"):
        raise ArgumentTypeError("model", model, "a TransformerLens model (TransformerBridge or HookedTransformer)")
    return model


def model_dims(model: Any) -> tuple[int, int, int]:
    """(n_layers, n_heads, d_vocab) from the model's config."""
    cfg = model.cfg
    return int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_vocab)


def check_metric(metric: Any) -> Callable[[Tensor], Tensor]:
    """A callable mapping logits `[batch, pos, vocab]` to `[batch]` (e.g. `ablation.logit_diff(...)`)."""
    if not callable(metric):
        raise ArgumentTypeError("metric", metric, "a callable logits [batch, pos, vocab] -> [batch]")
    return metric


def check_context(model: Any, n_tokens: int, name: str = "tokens") -> None:
    """Refuse inputs longer than the model's context (`cfg.n_ctx`) before any forward pass."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and n_tokens > int(n_ctx):
        raise ContextLengthError(name, n_tokens, int(n_ctx))


def check_prompt_tokens(model: Any, tokens: Any, attention_mask: Any) -> tuple[Tensor, Tensor | None]:
    """Token ids `[batch, pos]` inside the vocabulary and context, and a matching 0/1 mask (or None)."""
    _, _, vocab = model_dims(model)
    ids = check_token_ids("tokens", tokens, vocab_size=vocab, dims=(1, 2))
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[1] == 0:
        raise InvalidArgumentError("tokens", tokens, "at least one token per prompt")
    check_context(model, ids.shape[1])
    if attention_mask is None:
        return ids.to(tokens.device) if isinstance(tokens, Tensor) else ids, None
    valid_mask(attention_mask, ids.shape[0], ids.shape[1], torch.device("cpu"), "attention_mask")
    return (ids.to(tokens.device) if isinstance(tokens, Tensor) else ids), attention_mask


def check_receiver(position: Any, tokens: Tensor, attention_mask: Tensor | None) -> int:
    """One receiver position shared by every prompt: an index into `pos` that is real in every prompt."""
    pos = check_index("position", position, tokens.shape[1], what="positions")
    if attention_mask is not None:
        for b in range(tokens.shape[0]):
            check_position("position", pos, attention_mask[b], where=f"prompt {b} (use left padding)")
    return pos


def estimate_ablation_memory(model: Any, tokens: Tensor, *, heads: bool) -> int:
    """Estimated memory of an ablation comparison (cache, ALTI, batched ablated runs), checked now."""
    n_layers, n_heads, vocab = model_dims(model)
    cfg = model.cfg
    d_model = int(getattr(cfg, "d_model", 0) or 0)
    d_mlp = int(getattr(cfg, "d_mlp", 0) or 4 * d_model)
    b, pos = tokens.shape
    cache = forward_cache_bytes(b, pos, n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_mlp=d_mlp, d_vocab=vocab)
    alti = attribute_bytes([BlockShape(n_layers, b, n_heads, pos, pos, d_model)], heads=heads, max_chunk_bytes=0)
    # head_ablation runs n_heads copies of the batch at once (no cache kept): activations of one layer + logits
    ablated = n_heads * b * pos * (4 * d_model + d_mlp + vocab + 2 * n_heads * pos) * 4 if heads else 0
    need = cache * 2 + alti + ablated
    device = getattr(cfg, "device", None)
    check_fits(
        need,
        device if device is not None else "cpu",
        "this ablation comparison",
        ATTRIBUTE_ADVICE.replace("To fit:", "To fit: use fewer or shorter prompts;"),
    )
    return need


def pattern_edits_ignored(clean: Any, edited: Any, heads_by_hook: dict[str, list[int]]) -> bool:
    """Whether zeroing heads' hook_pattern left their hook_z unchanged (the model ignores pattern edits).

    The layers before the first edited one are untouched, so if that layer's pattern edit were
    honoured, the edited heads' outputs `z` would change (to 0) wherever they were not 0
    already. TransformerLens 4.x's BERT bridge records the edited pattern but computes with the
    original one.
    """
    for name, hs in heads_by_hook.items():
        if name not in clean.keys() or name not in edited.keys():
            return False
        before, after = clean[name][:, :, hs], edited[name][:, :, hs]
        return bool(before.ne(0).any()) and torch.equal(before, after)  # only the first edited layer
    return False
