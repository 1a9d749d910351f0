"""A receiver-wise gate on the heads' output before W_O (Laguna, AFMoE, Qwen3-Next attention layers).

These modules compute `o_proj(g_i ⊙ z_i)` where `z_i,h = Σ_j A[h,i,j] v_j,h` and the gate g_i
is a function of the receiver's own input (sigmoid / softplus of a projection). At its real
value the gate is fixed per receiver, so the block stays linear in the sources:

- a gate per head (one scalar g_i,h per receiver and head, Laguna's default) folds into the
  pattern: `A'[h,i,j] = g_i,h · A[h,i,j]`; the record's pattern is then not a distribution;
- a gate per channel (g_i,h,e) sits between the values and W_O and would make the value
  vectors receiver-dependent, which the factored decomposition cannot hold: refused.

The gate is not recomputed from the module's code: it is read from the cache as the ratio of
what `o_proj` really received (`attn.o.hook_in`) to the ungated `z` rebuilt from the pattern and
values, and the per-head fit is verified before it is used.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError

# How well the per-head gate must reproduce o_proj's real input (relative to its max).
_GATE_RTOL = 1e-4


def has_output_gate(hf_attn: Any, bridge_attn: Any) -> bool:
    """True when the attention module gates its output before W_O (a gate projection exists)."""
    if any(isinstance(getattr(hf_attn, n, None), torch.nn.Module) for n in ("g_proj", "gate_proj", "o_gate")):
        return True
    if getattr(bridge_attn, "gate", None) is not None or hasattr(bridge_attn, "hook_q_gate"):
        return True  # TransformerLens 4.x caches Qwen3-Next / Qwen3.5's query-side gate as hook_q_gate
    # Qwen3-Next / Qwen3.5: q_proj emits queries and gates together (twice the query width).
    # Booting a bridge wraps these projections in place (LinearBridge): unwrap them first.
    q_proj, o_proj = _linear(getattr(hf_attn, "q_proj", None)), _linear(getattr(hf_attn, "o_proj", None))
    if q_proj is not None and o_proj is not None:
        return q_proj.out_features == 2 * o_proj.in_features
    return False


def _linear(module: Any) -> torch.nn.Linear | None:
    """`module` itself if it is a Linear, else the Linear a bridge component wraps, else None."""
    wrapped = (getattr(module, "original_component", None), getattr(module, "_original_component", None))
    for candidate in (module, *wrapped):
        if isinstance(candidate, torch.nn.Linear):
            return candidate
    return None


def gated_pattern(
    pattern: Float[Tensor, "b h q k"],
    values: Float[Tensor, "b k h e"],
    o_in: Tensor,
    name: str,
) -> Float[Tensor, "b h q k"]:
    """The pattern with each receiver's per-head gate folded in (see the module docstring).

    `o_in` is the cached input of o_proj, `[b, q, h·e]` or `[b, q, h, e]`.
    """
    b, h, q, _ = pattern.shape
    e = values.shape[-1]
    if o_in.numel() != b * q * h * e:
        raise UnsupportedModelError(
            f"{name}: o.hook_in has shape {list(o_in.shape)}, expected [batch, query, heads·d_head] = "
            f"[{b}, {q}, {h * e}]"
        )
    o = o_in.reshape(b, q, h, e).to(torch.float64)
    z = torch.einsum("bhqk,bkhe->bqhe", pattern.to(torch.float64), values.to(torch.float64))
    zz = z.pow(2).sum(-1)
    gate = torch.where(zz > 0, (o * z).sum(-1) / zz.clamp(min=1e-300), torch.zeros_like(zz))  # [b, q, h]
    err = float((o - gate[..., None] * z).abs().max())
    if err > _GATE_RTOL * max(float(o.abs().max()), 1e-30):
        raise UnsupportedModelError(
            f"{name}: the attention output is gated per channel (a receiver-dependent gate g_i,h,e between the "
            "values and W_O, as in Qwen3-Next / AFMoE); lens_alti folds receiver-wise gates per head only, so this "
            f"layout is not supported (a per-head gate leaves max|Δ| = {err:.3g} on o_proj's input)"
        )
    return pattern * gate.permute(0, 2, 1)[..., None].to(pattern.dtype)
