"""What the model and its input say about attention sinks (docs/spec.md §10).

The model-aware half of sink detection: the tokenizer's special ids, the input ids a cache was
run on (`embed.hook_in`).
The decision itself is model-agnostic (`lens_alti.alti.sinks`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_alti.reading.hooks import embedding_hook


def special_ids(model: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (BOS, `<|im_start|>`, [CLS]...), empty without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    ids = getattr(tok, "all_special_ids", None) or []
    bos = getattr(tok, "bos_token_id", None)
    return frozenset(int(i) for i in [*ids, *([] if bos is None else [bos])])


def cached_input_ids(cache: Any) -> Int[Tensor, "b n"] | None:
    """The token ids the cache was run on (`embed.hook_in`), or None when it was not recorded."""
    name = embedding_hook()
    if name not in cache.keys():
        return None
    ids = cache[name]
    return None if ids.dtype.is_floating_point or ids.dim() != 2 else ids


def first_is_special(model: Any, ids: Any, valid: Bool[Tensor, "b n"]) -> Bool[Tensor, " b"] | None:
    """Whether each item's first real token is one of the tokenizer's special tokens.

    None when the ids are unknown (`ids` None or not `[b, n]` integers) or the model has no tokenizer.
    """
    specials = special_ids(model)
    if ids is None or not specials or not isinstance(ids, Tensor) or tuple(ids.shape) != tuple(valid.shape):
        return None
    if ids.dtype.is_floating_point:
        return None
    first = valid.long().argmax(-1)
    rows = torch.arange(valid.shape[0], device=valid.device)
    head = ids.to(valid.device)[rows, first]
    return torch.tensor([int(t) in specials for t in head.tolist()], dtype=torch.bool, device=valid.device)
