"""A norm on the concatenated heads' output before W_O (BitNet's `attn_sub_norm`).

BitNet computes `o_proj(RMSNorm(concat_h z_h))`: the RMS is taken per receiver over all
heads' outputs z_i = Σ_j A[h,i,j] v_j, so at its real value it is a fixed scale of receiver
i, and the gain w is a fixed per-channel factor that folds into W_O:

    o_proj(RMSNorm(z_i)) = (1 / rms_i) · Σ_h z_{i,h} (w_h ⊙ W_O[h]) + b_O

That is exactly a norm on the attention output (`NormAfterAttention(placement="attn_out")`)
with unit weight, scale rms_i, the gain folded into W_O and b_O moved to the norm's bias
(it is added after the scale). rms_i is computed from the cached pattern and values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.norms import norm_params
from lens_alti.reading.records import NormAfterAttention


def head_norm_module(hf_attn: Any) -> Any | None:
    """The norm applied to the concatenated heads before W_O, or None."""
    norm = getattr(hf_attn, "attn_sub_norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


def fold_head_norm(
    module: Any, name: str, W_O: Tensor, b_O: Tensor | None, pattern: Tensor, values: Tensor
) -> tuple[Tensor, NormAfterAttention]:
    """(W_O with the gain folded in, the per-receiver norm) for a head norm `module`.

    `pattern` `[b, h, q, k]`, `values` `[b, k, h, e]` (one per query head), `W_O` `[h, e, d]`.
    """
    kind, weight, bias, eps = norm_params(module, f"{name} (norm on the concatenated heads)", "RMS")
    h, e, d = W_O.shape
    if kind != "rmsnorm" or bias is not None or weight.shape[-1] != h * e:
        raise UnsupportedModelError(
            f"{name}: a {kind} with {'a bias' if bias is not None else 'no bias'} and {weight.shape[-1]} channels on "
            f"the concatenated heads ({h}·{e} channels) is not supported; only a bias-free RMSNorm over them is"
        )
    z = torch.einsum("bhqk,bkhe->bqhe", pattern.to(torch.float64), values.to(torch.float64))
    rms = (z.flatten(2).pow(2).mean(-1) + eps).sqrt()  # [b, q]
    W = W_O * weight.to(W_O.dtype).view(h, e, 1)
    unit = torch.ones(d, dtype=W_O.dtype, device=W_O.device)
    return W, NormAfterAttention(kind="rmsnorm", placement="attn_out", weight=unit, bias=b_O, scale=rms)
