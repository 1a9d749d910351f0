"""The cache a user passes: is it one, which model made it, does it hold every hook a layout reads."""

from __future__ import annotations

from typing import Any

from lens_alti.errors import MissingHooksError, NotACacheError
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
