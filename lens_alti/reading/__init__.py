"""Reading: the only code that knows hook names, model families and TransformerLens versions.

`model_layout(model)` describes a model as blocks to read; each `BlockReader` turns one
layer's activations and weights into a neutral record (`records.py`). Feature modules
(`norms`, `blocks`, ...) are composed by the per-family layouts in `bridge.py`
(TransformerBridge, TransformerLens 4.x) and `hooked.py` (TransformerLens 3.x).
"""

from lens_alti.reading.layout import BlockReader, Family, ModelLayout, cache_and_model, check_hooks, model_layout
from lens_alti.reading.records import AttentionBlock, NormAfterAttention

__all__ = [
    "AttentionBlock",
    "BlockReader",
    "Family",
    "ModelLayout",
    "NormAfterAttention",
    "cache_and_model",
    "check_hooks",
    "model_layout",
]
