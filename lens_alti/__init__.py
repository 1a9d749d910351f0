"""lens_alti: ALTI and ALTI+ contributions from TransformerLens caches.

    logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache)          # result.layers, result.rollout
"""

from lens_alti.api import attention_rollout, attribute, hook_names, logit_attribution, routes
from lens_alti.errors import (
    CompletenessError,
    LensAltiError,
    MissingHooksError,
    NonFiniteError,
    NotACacheError,
    ReconstructionError,
    UnsupportedModelError,
    WeightProcessingWarning,
)
from lens_alti.results import AltiResult, Seq2SeqAltiResult
from lens_alti.results_logit import LogitAttribution, Routes

__all__ = [
    "AltiResult",
    "CompletenessError",
    "LogitAttribution",
    "Routes",
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
    "logit_attribution",
    "routes",
]
__version__ = "0.1.0"
