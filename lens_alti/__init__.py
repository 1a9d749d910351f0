"""lens_alti: ALTI and ALTI+ contributions from TransformerLens caches.

    logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache)          # result.layers, result.rollout
"""

from lens_alti.api import attention_rollout, attribute, context_attribution, hook_names, logit_attribution, routes
from lens_alti.errors import (
    ArgumentTypeError,
    CompletenessError,
    ContextLengthError,
    InsufficientMemoryError,
    InterventionNotSupportedError,
    InvalidArgumentError,
    LensAltiError,
    MaskMismatchError,
    MissingHooksError,
    MissingTargetError,
    NonFiniteError,
    NotACacheError,
    OutOfRangeError,
    PaddedPositionError,
    ReconstructionError,
    ResultFormatError,
    UnsupportedModelError,
    WeightProcessingWarning,
)
from lens_alti.results import AltiResult, ContextAttribution, LogitAttribution, Routes, Seq2SeqAltiResult, load

__all__ = [
    "AltiResult",
    "ArgumentTypeError",
    "CompletenessError",
    "ContextAttribution",
    "ContextLengthError",
    "InsufficientMemoryError",
    "InterventionNotSupportedError",
    "InvalidArgumentError",
    "LensAltiError",
    "LogitAttribution",
    "MaskMismatchError",
    "MissingHooksError",
    "MissingTargetError",
    "NonFiniteError",
    "NotACacheError",
    "OutOfRangeError",
    "PaddedPositionError",
    "ReconstructionError",
    "ResultFormatError",
    "Routes",
    "Seq2SeqAltiResult",
    "UnsupportedModelError",
    "WeightProcessingWarning",
    "attention_rollout",
    "attribute",
    "context_attribution",
    "hook_names",
    "load",
    "logit_attribution",
    "routes",
]
__version__ = "0.2.0"
