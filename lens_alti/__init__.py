"""lens_alti: ALTI and ALTI+ contributions from TransformerLens caches.

    logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache)          # result.layers, result.rollout
"""

from lens_alti.api import attention_rollout, attribute, hook_names
from lens_alti.errors import (
    LensAltiError,
    MissingHooksError,
    NonFiniteError,
    NotACacheError,
    ReconstructionError,
    UnsupportedModelError,
    WeightProcessingWarning,
)
from lens_alti.results import AltiResult, Seq2SeqAltiResult

__all__ = [
    "AltiResult",
    "LensAltiError",
    "MissingHooksError",
    "NonFiniteError",
    "NotACacheError",
    "ReconstructionError",
    "Seq2SeqAltiResult",
    "UnsupportedModelError",
    "WeightProcessingWarning",
    "attention_rollout",
    "attribute",
    "hook_names",
]
__version__ = "0.2.0"
