"""Normalisations that follow the attention block, linearised at their real scale (spec 1b, 1d)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.records import NormAfterAttention

# Norms whose scale is (1 + weight) rather than weight.
_OFFSET_WEIGHT_NORMS = ("Gemma",)


def norm_params(
    component: Any, name: str, default_kind: str
) -> tuple[Literal["layernorm", "rmsnorm"], Tensor, Tensor | None, float]:
    """(kind, weight, bias, eps) of a bridge normalisation component."""
    inner = getattr(component, "_original_component", component)
    is_rms = "rms" in type(component).__name__.lower() or default_kind == "RMS"
    eps = getattr(inner, "eps", None)
    if eps is None:
        eps = getattr(inner, "variance_epsilon", None)
    weight = getattr(inner, "weight", None)
    if eps is None or weight is None:
        raise UnsupportedModelError(f"{name}: cannot read the normalisation's weight and epsilon to linearise it")
    bias = getattr(inner, "bias", None)
    weight = weight.detach()
    if any(type(inner).__name__.startswith(p) for p in _OFFSET_WEIGHT_NORMS):
        weight = 1.0 + weight.float()
    return ("rmsnorm" if is_rms else "layernorm"), weight, (None if bias is None else bias.detach()), float(eps)


def post_norm(
    component: Any, z: Tensor, name: str, default_kind: str, placement: Literal["block", "attn_out"] = "block"
) -> NormAfterAttention:
    """The linearised norm that follows the residual sum z (spec 1b, 1d).

    The scale is computed here from the norm's real input: biased variance with eps
    inside the root (LayerNorm) or the RMS (TransformerLens 4.3 reports a mean-centred
    `hook_scale` for T5, so that hook is not used).
    """
    kind, weight, bias, eps = norm_params(component, name, default_kind)
    z32 = z.to(torch.float64)
    if kind == "layernorm":
        scale = (z32.var(dim=-1, unbiased=False) + eps).sqrt()
    else:
        scale = (z32.pow(2).mean(dim=-1) + eps).sqrt()
    return NormAfterAttention(kind=kind, placement=placement, weight=weight, bias=bias, scale=scale)


def is_post_norm(cache: Any, prefix: str) -> bool:
    """Post-norm when the first norm does not read the block input (it reads input + attention)."""
    x, ln_in = cache[f"{prefix}.hook_resid_pre"], cache[f"{prefix}.ln1.hook_in"]
    return not torch.allclose(ln_in, x, rtol=1e-5, atol=1e-6 * float(x.abs().max().clamp(min=1)))
