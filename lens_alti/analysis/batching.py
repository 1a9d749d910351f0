"""Batching helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def left_padded(model: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Token ids `[batch, pos]` of `texts`, left-padded, and the `[batch, pos]` attention mask.

    Each text is tokenised alone (with the model's default BOS), so the mask never confuses
    a pad token that doubles as BOS with padding.
    """
    import torch

    from lens_alti.validation import check_type

    check_type("texts", texts, (list, tuple), "a non-empty list of strings")
    if not texts or not all(isinstance(t, str) for t in texts):
        from lens_alti.errors import InvalidArgumentError

        raise InvalidArgumentError("texts", texts, "a non-empty list of strings (one prompt per batch item)")
    rows = [model.to_tokens(t)[0] for t in texts]
    n = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    tokens = torch.full((len(rows), n), pad, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return tokens, mask
