"""Reading: the only code that knows hook names, model families and TransformerLens versions.

`model_layout(model)` describes a model as blocks to read; each `BlockReader` turns one
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
- `layer_kinds`: attention or another mixer, and attention modules without hooks;
- `processing`: which weight processing a bridge's weights went through;
- `blocks`: the record of one attention module from these features.
"""

from lens_alti.reading.layout import (
    BlockReader,
    Family,
    ModelLayout,
    cache_and_model,
    check_hooks,
    is_cache,
    model_layout,
)
from lens_alti.reading.records import AttentionBlock, NormAfterAttention

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
