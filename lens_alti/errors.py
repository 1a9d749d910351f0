"""Exceptions and warnings raised by lens_alti.

Every error says what was wrong and what to do about it; none is ever replaced by a
silent wrong number.
"""

from __future__ import annotations


class LensAltiError(Exception):
    """Base class of every lens_alti error."""


class NotACacheError(LensAltiError, TypeError):
    """`attribute` was given something that is not a supported activation cache."""


class MissingHooksError(LensAltiError, KeyError):
    """The cache lacks activations the decomposition needs."""

    def __init__(self, missing: list[str], advice: str) -> None:
        self.missing = list(missing)
        shown = ", ".join(self.missing[:8])
        more = f" (and {len(self.missing) - 8} more)" if len(self.missing) > 8 else ""
        super().__init__(f"the cache is missing {len(self.missing)} hook(s): {shown}{more}. {advice}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class UnsupportedModelError(LensAltiError, NotImplementedError):
    """The model's attention block has a layout lens_alti cannot decompose exactly."""


class ReconstructionError(LensAltiError, ValueError):
    """Σ_j T_i(x_j) + bias_i did not reproduce the real activation of a block."""

    def __init__(self, block: str, max_abs_error: float, max_abs_target: float, tolerance: float, hint: str) -> None:
        self.block = block
        self.max_abs_error = max_abs_error
        self.max_abs_target = max_abs_target
        self.tolerance = tolerance
        rel = max_abs_error / max(max_abs_target, 1e-30)
        super().__init__(
            f"reconstruction check failed for {block}: max|Δ| = {max_abs_error:.3g} "
            f"({rel:.3g} of max|y| = {max_abs_target:.3g}; tolerance {tolerance:.0e}). {hint}"
        )


class NonFiniteError(LensAltiError, ValueError):
    """The cache holds NaN or Inf where the decomposition reads it."""


class WeightProcessingWarning(UserWarning):
    """The model's weights were processed (folded/centred): numbers differ from the raw model."""


class InterventionError(LensAltiError, ValueError):
    """An intervention study (patching, ablation, ranking comparison) got inputs that do not fit together."""


class CompletenessError(LensAltiError, ValueError):
    """The direct parts of a logit attribution did not add up to the real logit (difference)."""

    def __init__(self, gap: float, logit: float, scale: float, tolerance: float, batch: int, hint: str) -> None:
        self.gap = gap
        self.logit = logit
        self.tolerance = tolerance
        super().__init__(
            f"logit attribution is not complete for batch item {batch}: the direct parts miss the real logit "
            f"{logit:.6g} by {gap:.3g} ({abs(gap) / max(scale, 1e-30):.3g} of the largest part or logit, "
            f"{scale:.3g}; tolerance {tolerance:.0e}). {hint}"
        )
