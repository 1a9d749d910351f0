"""Which weight processing a TransformerBridge's weights went through, read from the weights.

`enable_compatibility_mode(fold_ln=..., center_writing_weights=..., fold_value_biases=...)`
and `process_weights(...)` do not record which steps they applied, so each step is recognised
from its effect on the weights ALTI reads:
- fold_ln: every norm before attention has weight exactly 1 and bias 0 (its gain moved into
  W_Q/W_K/W_V). Values, W_O and the residual are unchanged, so ALTI's numbers are too;
- center_writing_weights: every W_O has zero mean over d_model (the residual stream is centred);
- fold_value_biases: every b_V is 0 while some b_O is not (Σ_h b_V·W_O moved from the
  sources to the bias term).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

RAW = "raw"
# A writing weight counts as centred when its mean over d_model is this small relative to it.
_CENTRED_RTOL = 1e-5


def _is_centred(w: Tensor) -> bool:
    w = w.detach().to(torch.float64)
    return bool(w.mean(dim=-1).abs().max() <= _CENTRED_RTOL * w.abs().max().clamp(min=1e-30))


def _identity_norm(norm: Any) -> bool:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        return False
    bias = getattr(norm, "bias", None)
    return bool((weight == 1).all()) and (not isinstance(bias, Tensor) or not bool(bias.any()))


def _safe(get: Any) -> Any:
    try:
        return get()
    except Exception:  # noqa: BLE001 - a module without this weight simply lacks the step
        return None


def bridge_weight_processing(model: Any) -> str:
    """"raw", or "processed (...)" naming the steps the weights show were applied."""
    if not (getattr(model, "_weights_processed", False) or getattr(model, "compatibility_mode", False)):
        return RAW
    blocks = [b for stack in ("blocks", "encoder_blocks", "decoder_blocks") for b in getattr(model, stack, [])]
    attns = [getattr(b, n) for b in blocks for n in ("attn", "self_attn", "cross_attn") if hasattr(b, n)]
    W_Os = [w for w in (_safe(lambda a=a: a.W_O) for a in attns) if isinstance(w, Tensor)]
    b_Vs = [w for w in (_safe(lambda a=a: a.b_V) for a in attns) if isinstance(w, Tensor)]
    b_Os = [w for w in (_safe(lambda a=a: a.b_O) for a in attns) if isinstance(w, Tensor)]
    norms = [b.ln1 for b in blocks if hasattr(b, "ln1")]
    steps = []
    if norms and all(_identity_norm(n) for n in norms):
        steps.append("folded norms")
    if W_Os and all(_is_centred(w) for w in W_Os):
        steps.append("centred writing weights")
    if b_Vs and not any(bool(b.any()) for b in b_Vs) and any(bool(b.any()) for b in b_Os):
        steps.append("folded value biases")
    done = ", ".join(steps) if steps else "no change to the weights lens_alti reads was detected"
    return f"processed (enable_compatibility_mode / process_weights: {done})"
