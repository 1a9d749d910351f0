"""Batching helpers."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lens_alti.api.inputs import left_pad, pad_token_id
from lens_alti.errors import InvalidArgumentError
from lens_alti.validation import check_type


def left_padded(model: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Token ids `[batch, pos]` of `texts`, left-padded, and the `[batch, pos]` attention mask.

    Each text is tokenised alone (with the model's default BOS), so the mask never confuses
    a pad token that doubles as BOS with padding.
    """
    check_type("texts", texts, (list, tuple), "a non-empty list of strings")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidArgumentError("texts", texts, "a non-empty list of strings (one prompt per batch item)")
    ids, mask = left_pad([model.to_tokens(t)[0].cpu() for t in texts], pad_token_id(model))
    return ids, mask
