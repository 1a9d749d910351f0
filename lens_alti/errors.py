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


class PatternNotDistributionError(LensAltiError, ValueError):
    """A cached attention pattern is not a probability distribution over the valid keys."""


def _show(value: object) -> str:
    """A short repr of an offending value for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _ArgumentProblem(LensAltiError):
    """An argument of a public function is wrong: names the argument, its value and what is valid.

    Attributes: `argument` (the parameter's name), `value` (what was passed), `expected`
    (the valid range or kind, in words).
    """

    problem = "is not valid"

    def __init__(self, argument: str, value: object, expected: str, hint: str = "") -> None:
        self.argument = argument
        self.value = value
        self.expected = expected
        self.hint = hint
        msg = f"{argument}={_show(value)} {self.problem}: expected {expected}"
        super().__init__(f"{msg}. {hint}" if hint else msg)

    def __reduce__(self) -> tuple[object, ...]:  # picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.argument, self.value, self.expected, self.hint))


class InvalidArgumentError(_ArgumentProblem, ValueError):
    """An argument has the right type but a value that is not allowed (a negative size, an unknown choice...)."""


class OutOfRangeError(_ArgumentProblem, IndexError, ValueError):
    """An index argument (position, batch item, layer, head, token id) is outside its valid range.

    Also a ValueError, so code that caught the ValueError of earlier releases still catches it.
    """

    problem = "is out of range"


class ArgumentTypeError(_ArgumentProblem, TypeError):
    """An argument has the wrong type (a string where token ids are expected, None for a size...)."""

    problem = "has the wrong type"


class PaddedPositionError(InvalidArgumentError):
    """A position that is padding in this batch item was asked for; the message lists the real positions."""

    problem = "is a padded position"


class ContextLengthError(InvalidArgumentError):
    """The input has more tokens than the model's context takes: `argument`, `value` (tokens), `limit`."""

    def __init__(self, argument: str, n_tokens: int, limit: int) -> None:
        self.limit = int(limit)
        super().__init__(argument, int(n_tokens), f"at most {limit} tokens")
        self.args = (
            f"{argument} is too long: {n_tokens} tokens, this model takes at most {limit}. "
            "Shorten it, or explain it in pieces.",
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.argument, self.value, self.limit))


class MaskMismatchError(LensAltiError, ValueError):
    """The attention mask given to `attribute` is not the one the cache was produced with."""


class MissingTargetError(LensAltiError, ValueError):
    """An encoder-decoder cache was run without a target (TransformerLens fed the source shifted right)."""


class InterventionNotSupportedError(UnsupportedModelError):
    """The model ignores the hook edit an intervention relies on (e.g. hook_pattern on TransformerLens 4.x BERT)."""


class InsufficientMemoryError(LensAltiError, MemoryError):
    """The estimated memory of a call exceeds what is available; the message says which knob to turn."""


class ResultFormatError(LensAltiError, ValueError):
    """A saved result cannot be read: not a lens_alti file, or written by an incompatible version."""


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
