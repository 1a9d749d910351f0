"""Reading: the only code that knows hook names, model families and TransformerLens versions.

`model_layout(model)` (here, the dispatcher) describes a model as blocks to read; each `BlockReader` turns one
layer's activations and weights into a neutral record (`records.py`). One module per
block-layout feature, composed by the per-family layouts in `bridge.py` (TransformerBridge,
TransformerLens 4.x; every decoder layer goes through `bridge.layer_reader`, the one dispatch
point per kind of token mixer) and `hooked.py` (TransformerLens 3.x):

- `geometry`: value layouts, grouped-query heads, per-layer W_O, shape validation;
- `norms`: norms after attention, their gain read from the module's behaviour;
- `latent`: multi-head latent attention (head-major `hook_v`);
- `value_norm`: a norm on each value after `hook_v` (Gemma-4);
- `head_norm`: a norm on the concatenated heads before W_O (BitNet);
- `gated_output`: receiver-wise per-head gates before W_O (Laguna);
- `multipliers`: residual multipliers (Granite, MiniCPM);
- `types`: the shared types (BlockReader, ModelLayout, CacheView); `cache`: the cache a user passes;
- `spellings`: attribute names transformers and TransformerLens have renamed;
- `layer_kinds`: attention or another mixer, and attention modules without hooks;
- `processing`: which weight processing a bridge's weights went through;
- `blocks`: the record of one attention module from these features.
"""

from __future__ import annotations

from typing import Any

from lens_alti.errors import InvalidArgumentError, NotACacheError
from lens_alti.reading.cache import cache_and_model, check_hooks, is_cache
from lens_alti.reading.records import AttentionBlock, NormAfterAttention
from lens_alti.reading.types import BlockReader, Family, ModelLayout


def _is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - depends on the installed TransformerLens
        return False
    return isinstance(model, TransformerBridge)


def model_layout(model: Any, parallel_mlp: str = "exclude") -> ModelLayout:
    """Describe `model` (a TransformerBridge, or a TransformerLens 3.x Hooked* model) for reading."""
    if parallel_mlp not in ("exclude", "residual"):
        raise InvalidArgumentError("parallel_mlp", parallel_mlp, "'exclude' or 'residual'")
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


__all__ = [
    "AttentionBlock",
    "BlockReader",
    "Family",
    "ModelLayout",
    "NormAfterAttention",
    "cache_and_model",
    "check_hooks",
    "is_cache",
    "model_layout",
]
