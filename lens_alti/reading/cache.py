"""The cache a user passes: is it one, which model made it, does it hold every hook a layout reads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import MissingHooksError, MissingTargetError, NotACacheError, UnsupportedModelError
from lens_alti.reading.types import ModelLayout

_EAGER_ADVICE = (
    "Patterns are only recorded with eager attention: boot the model with "
    "TransformerBridge.boot_transformers(...) (which forces it) or load the Hugging Face "
    "model with attn_implementation='eager'. If you used names_filter, include these names "
    "(lens_alti.hook_names(model) lists everything attribute() reads). If the model was booted that way "
    "and the hooks are still missing, its attention implementation never fires them (e.g. LongT5's local "
    "attention) and the model is not supported."
)


def is_cache(obj: Any) -> bool:
    """True for a TransformerLens ActivationCache (False when TransformerLens is not installed)."""
    try:
        from transformer_lens import ActivationCache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, ActivationCache)


def cache_and_model(cache: Any) -> tuple[Any, Any]:
    """Check `cache` is an ActivationCache with its model attached; return (cache, model)."""
    try:
        from transformer_lens import ActivationCache
    except ImportError as exc:  # pragma: no cover
        raise NotACacheError("transformer_lens is not installed") from exc
    if not isinstance(cache, ActivationCache):
        raise NotACacheError(
            f"expected the ActivationCache from `logits, cache = model.run_with_cache(tokens)`, "
            f"got {type(cache).__name__}"
        )
    model = getattr(cache, "model", None)
    if model is None:
        raise NotACacheError("this ActivationCache has no model attached (cache.model is None)")
    if not getattr(cache, "has_batch_dim", True):
        raise NotACacheError(
            "the cache has no batch dimension (remove_batch_dim was applied); run attribute on the batched cache"
        )
    return cache, model


def check_hooks(cache: Any, layout: ModelLayout) -> None:
    """Raise MissingHooksError listing every hook the layout needs that the cache lacks."""
    have = set(cache.keys())
    missing = [h for h in layout.hook_names() if h not in have]
    if missing:
        raise MissingHooksError(missing, _EAGER_ADVICE)


def check_decoder_input(cache: Any, decoder_tokens: Any = None) -> None:
    """TransformerLens feeds the source shifted right when decoder_input is missing.

    The decoder input alone cannot tell that from a real identity translation; decoder token
    ids passed to `attribute` and equal to the decoder input can (someone who forgot the
    target has none to pass), and `allow_shifted_source=True` overrides the check.
    """
    if "embed.hook_in" not in cache.keys() or "decoder_embed.hook_in" not in cache.keys():
        return
    src, tgt = cache["embed.hook_in"], cache["decoder_embed.hook_in"]
    if src.dtype.is_floating_point or tgt.shape != src.shape or src.shape[-1] < 2:
        return
    if isinstance(decoder_tokens, Tensor) and decoder_tokens.numel() == tgt.numel():
        if decoder_tokens.reshape(tgt.shape).cpu().equal(tgt.cpu()):
            return  # the caller holds the target ids the cache was run with
    if torch.equal(tgt[:, 1:], src[:, :-1]) and bool((tgt[:, 0] == tgt[0, 0]).all()):
        raise MissingTargetError(
            "this encoder-decoder cache was run without a target: TransformerLens then feeds the "
            "source shifted right as the decoder input. Run "
            "`model.run_with_cache(src_tokens, decoder_input=tgt_tokens)` with the target prefix to explain. "
            "If the target prefix really is the source shifted right (an identity translation), pass "
            "decoder_tokens=tgt_tokens or allow_shifted_source=True."
        )


def layer_patterns(cache: Any, layout: ModelLayout) -> Tensor:
    """Every self-attention layer's attention pattern, stacked: `[batch, layer, head, query, key]`.

    Refuses layers that are not attention with a cached pattern (UnsupportedModelError) and a
    cache without them (MissingHooksError).
    """
    names = [r.hooks[0] for r in layout.blocks["self"]]
    not_attention = [r.name for r in layout.blocks["self"] if not r.hooks[0].endswith("hook_pattern")]
    if not_attention:  # linear-recurrent mixers (reading/mixers) have no attention pattern to roll out
        raise UnsupportedModelError(
            f"{layout.architecture}: attention rollout needs an attention pattern in every layer, but "
            f"{', '.join(not_attention[:4])}{' ...' if len(not_attention) > 4 else ''} are not attention layers "
            "with a cached pattern; use attribute(cache).rollout (ALTI's rollout covers them)"
        )
    missing = [n for n in names if n not in cache.keys()]
    if missing:
        raise MissingHooksError(missing, "attention_rollout reads every layer's hook_pattern.")
    return torch.stack([cache[n] for n in names], dim=1)


def with_heads_switched_off(cache: Any, heads_by_pattern: dict[str, list[int]]) -> Any:
    """A copy of `cache` whose `hook_pattern` entries are 0 for the given heads `{pattern hook: [head, ...]}`.

    For a run whose heads were switched off by zeroing their `hook_z` (their output is then what a
    zero attention pattern gives) on a model that records the pattern it did not use: the copy
    holds the pattern the run effectively computed with, so the run decomposes exactly.
    """
    from transformer_lens import ActivationCache

    tensors = {name: cache[name] for name in cache.keys()}
    for name, heads in heads_by_pattern.items():
        edited = tensors[name].clone()
        edited[:, heads] = 0
        tensors[name] = edited
    return ActivationCache(tensors, cache.model)
