"""Residual and attention multipliers (Granite, MiniCPM-style scaled residual branches).

Granite adds `residual_multiplier · attn_out` to the residual stream (its `attention_multiplier`
replaces 1/√d_head inside the softmax, so it is already in the cached pattern). Scaling the
branch is the same as scaling `W_O` and `b_O`, so the record carries the scaled weights.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lens_alti.reading.geometry import output_weights


def residual_multiplier(model: Any) -> float:
    """The factor the attention branch is multiplied by before joining the residual stream (1 if none)."""
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    m = getattr(hf_cfg, "residual_multiplier", None)
    if m is None:
        scale_depth = getattr(hf_cfg, "scale_depth", None)  # MiniCPM: scale_depth / √n_layers
        n = getattr(hf_cfg, "num_hidden_layers", None)
        if scale_depth is not None and n:
            m = float(scale_depth) / float(n) ** 0.5
    return 1.0 if m is None else float(m)


def scaled_output(attn: Any, factor: float, name: str = "attn") -> tuple[Tensor, Tensor | None]:
    """(W_O, b_O) of a bridge attention module (read per layer, see `geometry.output_weights`) times `factor`."""
    W_O, b_O = output_weights(attn, name)
    if factor == 1.0:
        return W_O, b_O
    return W_O * factor, (None if b_O is None else b_O * factor)
