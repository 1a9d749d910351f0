"""A normalisation of each value vector after `hook_v` (Gemma-4's `v_norm`).

The norm acts on one source token's value alone, so the block stays linear per receiver;
the pattern averages the normalised values, which are computed here from the cached
`hook_v` with the module's own norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def value_norm(hf_attn: Any, name: str) -> Callable[[Tensor], Tensor] | None:
    """The map from cached values to what the pattern averages, or None when there is no value norm."""
    norm = getattr(hf_attn, "v_norm", None)
    if not isinstance(norm, torch.nn.Module):
        return None

    def apply(values: Tensor) -> Tensor:
        with torch.no_grad():
            return norm(values)

    return apply
