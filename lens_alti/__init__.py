"""lens_alti: ALTI and ALTI+ contributions from TransformerLens caches.

    logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache)          # result.layers, result.rollout
"""

from lens_alti.api import attention_rollout, attribute, hook_names
from lens_alti.errors import (
    ArgumentTypeError,
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
from lens_alti.results import AltiResult, Seq2SeqAltiResult
from lens_alti.saving import load

__all__ = [
    "AltiResult",
    "ArgumentTypeError",
    "ContextLengthError",
    "InsufficientMemoryError",
    "InterventionNotSupportedError",
    "InvalidArgumentError",
    "LensAltiError",
    "MaskMismatchError",
    "MissingHooksError",
    "MissingTargetError",
    "NonFiniteError",
    "NotACacheError",
    "OutOfRangeError",
    "PaddedPositionError",
    "ReconstructionError",
    "ResultFormatError",
    "Seq2SeqAltiResult",
    "UnsupportedModelError",
    "WeightProcessingWarning",
    "attention_rollout",
    "attribute",
    "hook_names",
    "load",
]
__version__ = "0.1.0"
