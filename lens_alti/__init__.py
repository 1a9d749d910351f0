"""lens_alti: ALTI and ALTI+ contributions from TransformerLens caches.

    logits, cache = model.run_with_cache(tokens)
    result = lens_alti.attribute(cache)          # result.layers, result.rollout
"""

from typing import Any

from lens_alti.api import attention_rollout, attribute, hook_names
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
from lens_alti.results import AltiResult, Seq2SeqAltiResult

# Imported on first use (module __getattr__): keeps `import lens_alti` to what `attribute` needs.
_LAZY = {
    "logit_attribution": "lens_alti.prediction",
    "routes": "lens_alti.prediction_routes",
    "LogitAttribution": "lens_alti.results_logit",
    "Routes": "lens_alti.results_logit",
    "load": "lens_alti.saving",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lens_alti' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AltiResult",
    "ArgumentTypeError",
    "CompletenessError",
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
    "hook_names",
    "load",
    "logit_attribution",
    "routes",
]
__version__ = "0.2.0"
