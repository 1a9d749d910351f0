"""What a model looks like to lens_alti, and which layout reads it.

Requirements this design meets: the readers are the only code that knows hook names,
model families and TransformerLens versions; each layout lists every hook it needs up front
(so missing ones are reported together); `model_layout` picks the layout that claims the model
and explains clearly when none does; TransformerLens 3.x classes are only touched when the
model is one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lens_alti.errors import MissingHooksError, NotACacheError
from lens_alti.reading.records import AttentionBlock

Family = Literal["decoder", "encoder", "encoder_decoder"]

_EAGER_ADVICE = (
    "Patterns are only recorded with eager attention: boot the model with "
    "TransformerBridge.boot_transformers(...) (which forces it) or load the Hugging Face "
    "model with attn_implementation='eager'. If you used names_filter, include these names "
    "(lens_alti.hook_names(model) lists everything attribute() reads). If the model was booted that way "
    "and the hooks are still missing, its attention implementation never fires them (e.g. LongT5's local "
    "attention) and the model is not supported."
)


@dataclass(frozen=True)
class BlockReader:
    """One attention block to read: its hook names and how to build its record.

    `channels_per_head`: how many record channels each cached head is expected to become
    (d_head for a per-channel output gate, see `gated_output`), for the up-front memory estimate.
    """

    name: str
    hooks: tuple[str, ...]
    build: Callable[[Any], AttentionBlock]
    channels_per_head: int = 1
    # The record's pattern shape [batch, head, query, key] when hooks[0] does not have it (LED's band).
    shape: Callable[[Any], tuple[int, ...]] | None = None

    def pattern_shape(self, cache: Any) -> tuple[int, ...]:
        """The shape of the record's pattern, `[batch, head, query, key]` for attention, read from the cache."""
        return tuple(self.shape(cache)) if self.shape is not None else tuple(cache[self.hooks[0]].shape)


class CacheView:
    """A read-only view of a cache that replaces some of its hooks (subclasses override `__getitem__`)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def keys(self) -> Any:
        return self._cache.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._cache.keys()

    def __getitem__(self, key: str) -> Tensor:
        return self._cache[key]


@dataclass(frozen=True)
class ModelLayout:
    """What a model looks like to lens_alti: family, blocks to read, weight processing."""

    family: Family
    architecture: str
    weight_processing: str
    blocks: dict[str, list[BlockReader]]

    def hook_names(self) -> list[str]:
        return [h for readers in self.blocks.values() for r in readers for h in r.hooks]


def weight_processing(model: Any) -> str:
    """"raw", or "processed (...)" with the steps the bridge's weights show (see `processing`)."""
    from lens_alti.reading.processing import bridge_weight_processing

    return bridge_weight_processing(model)


def _is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - depends on the installed TransformerLens
        return False
    return isinstance(model, TransformerBridge)


def model_layout(model: Any, parallel_mlp: str = "exclude") -> ModelLayout:
    """Describe `model` (a TransformerBridge, or a TransformerLens 3.x Hooked* model) for reading."""
    if parallel_mlp not in ("exclude", "residual"):
        raise ValueError(f"parallel_mlp must be 'exclude' or 'residual', got {parallel_mlp!r}")
    from lens_alti.reading.bridge import bridge_layout
    from lens_alti.reading.hooked import hooked_class, hooked_layout

    if hooked_class(model) is not None:
        return hooked_layout(model, parallel_mlp)
    if not _is_bridge(model):
        raise NotACacheError(
            f"the cache's model is a {type(model).__name__}; lens_alti reads caches of "
            "transformer_lens TransformerBridge models, or of HookedTransformer, HookedEncoder and "
            "HookedEncoderDecoder models of TransformerLens 3.x (model.run_with_cache(tokens))"
        )
    return bridge_layout(model, parallel_mlp)


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
