"""Normalisations that follow the attention block, linearised at their real scale (docs/spec.md §1b, §1d)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.layer_kinds import original
from lens_alti.reading.records import NormAfterAttention
from lens_alti.reading.spellings import spelled

# How close the module's gain on the probe must be to w or 1 + w (relative to the gain).
_PROBE_RTOL = 1e-3


def _probe(inner: Any, weight: Tensor, bias: Tensor | None, eps: float, name: str) -> tuple[bool, Tensor]:
    """(is RMSNorm, real gain) of a norm, decided by running the module on a probe vector.

    Some families scale by `1 + w` (Gemma-1/2/3, T5Gemma), others by `w` (Gemma-4, LLaMA...);
    class names do not tell them apart reliably, so the module's own output on a fixed
    probe (non-zero mean, so LayerNorm and RMSNorm differ) decides both the kind and the gain.
    Raises UnsupportedModelError when no candidate matches.
    """
    d = weight.shape[-1]
    probe = torch.linspace(-1.0, 1.5, d, dtype=torch.float64, device=weight.device)[None, None, :]
    centred = probe - probe.mean(-1, keepdim=True)
    bases = {
        "RMSNorm": probe / (probe.pow(2).mean(-1, keepdim=True) + eps).sqrt(),
        "LayerNorm": centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt(),
    }
    try:
        with torch.no_grad():
            out = inner(probe.to(weight.dtype))
    except Exception as exc:  # noqa: BLE001 - any failure means the norm cannot be verified
        raise UnsupportedModelError(
            f"{name}: cannot run the normalisation on a probe vector to read its gain ({exc})"
        ) from exc
    out = (out[0] if isinstance(out, tuple) else out).to(torch.float64)
    if bias is not None:
        out = out - bias.to(torch.float64)
    w = weight.to(torch.float64)
    tol = _PROBE_RTOL * max(1.0, float(w.abs().max()), float((1 + w).abs().max()))
    errors = {
        (kind, gain): float((out - base * g).abs().max())
        for kind, base in bases.items()
        for gain, g in (("w", w), ("1 + w", 1.0 + w))
    }
    best = min(errors, key=errors.__getitem__)
    if errors[best] > tol:
        raise UnsupportedModelError(
            f"{name}: the normalisation's output on a probe vector is not x/σ·w or x/σ·(1 + w) of a LayerNorm "
            f"or RMSNorm (closest: {best[0]} with gain {best[1]}, max|Δ| = {errors[best]:.3g}); "
            "lens_alti cannot linearise it"
        )
    return best[0] == "RMSNorm", (weight if best[1] == "w" else 1.0 + weight.float())


def norm_params(
    component: Any, name: str, default_kind: str
) -> tuple[Literal["layernorm", "rmsnorm"], Tensor, Tensor | None, float]:
    """(kind, weight, bias, eps) of a bridge normalisation component."""
    inner = original(component)
    is_rms = "rms" in type(component).__name__.lower() or default_kind == "RMS"
    eps = spelled(inner, "eps", None)
    weight = getattr(inner, "weight", None)
    if eps is None or weight is None:
        raise UnsupportedModelError(f"{name}: cannot read the normalisation's weight and epsilon to linearise it")
    bias = getattr(inner, "bias", None)
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if isinstance(inner, torch.nn.Module):
        is_rms, weight = _probe(inner, weight, bias, float(eps), name)
    return ("rmsnorm" if is_rms else "layernorm"), weight, bias, float(eps)


def post_norm(
    component: Any, z: Tensor, name: str, default_kind: str, placement: Literal["block", "attn_out"] = "block"
) -> NormAfterAttention:
    """The linearised norm that follows the residual sum z (docs/spec.md §1b, §1d).

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
    # Compared where both are finite: NaN/Inf (e.g. at padded positions, which attribute isolates)
    # must not flip the layout; a non-finite real position is reported by attribute's own check.
    finite = torch.isfinite(x) & torch.isfinite(ln_in)
    if not bool(finite.all()):  # (the boolean indexing copies; skipped in the usual all-finite case)
        if not bool(finite.any()):
            return False
        x, ln_in = x[finite], ln_in[finite]
    atol = 1e-6 * float(x.abs().max().clamp(min=1))
    return not torch.allclose(ln_in, x, rtol=1e-5, atol=atol)
