"""A receiver-wise gate on the heads' output before W_O (Laguna, AFMoE, Qwen3-Next / Qwen3.5 attention).

These modules compute `o_proj(g_i ⊙ z_i)` where `z_i,h = Σ_j A[h,i,j] v_j,h` and the gate g_i
is a function of the receiver's own input (sigmoid / softplus of a projection). At its real
value the gate is fixed per receiver, so the block stays linear in the sources,
`T_i(x_j) = Σ_h A[h,i,j] (g_i,h ⊙ v_j,h) W_O[h]` (docs/spec-mixers.md §7):

- a gate per head (one scalar g_i,h per receiver and head, Laguna's default) folds into the
  pattern: `A'[h,i,j] = g_i,h · A[h,i,j]` (cheap: the record keeps H heads);
- a gate per channel (g_i,h,e: Qwen3-Next, Qwen3.5, Qwen3.5-MoE, AFMoE, Laguna with
  `gating="per-element"`) makes each value
  vector receiver-dependent, so the record holds one "channel" per (head, d_head index)
  c = h·E + e, exactly like the linear-recurrent mixers: `A'[c,i,j] = g_i,h,e · A[h,i,j]`,
  `v'[j,c] = v[j,h,e]` (one number), `W_O'[c] = W_O[h,e]`, `channels_per_head = E`.
  Per-head results sum each head's E channels. Cost: the pattern grows from `H·n²` to
  `H·E·n²` numbers per batch item (Qwen3-Next-80B's attention layers: 16 heads · 256 = 4096
  channels, 16 GB in float32 at n = 1024), and `VO` to `H·E·n·d`.

Where the gate comes from: the cached pre-activation when the bridge records it
(TransformerLens 4.3: `attn.hook_q_gate` for Qwen3-Next / Qwen3.5, `attn.gate.hook_out` for
AFMoE and Laguna, all `[b, q, H·E]` before the sigmoid, or Laguna's softplus), else the ratio
of what `o_proj` really received (`attn.o.hook_in`) to the ungated `z` rebuilt from the
pattern and values. The ratio is only formed where z does not cancel (|z| > 1e-4·Σ_j A|v_j|,
so float32 rounding cannot distort it); elsewhere the gate is 0 when the channel carries
nothing there (Σ_j A|v_j| ≤ 1e-3 of its largest entry), and the layer is refused otherwise.
Whichever gate is used must reproduce o_proj's real input to 1e-4 of its largest entry before
it is folded in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.layer_kinds import original

# How well a gate must reproduce o_proj's real input (relative to its max).
_GATE_RTOL = 1e-4
# The ratio o / z is formed where |z| > _CONDITION · Σ_j A|v_j| (float32 z then known to ~1e-3 of
# itself); elsewhere the gate is set to 0, which is allowed only where Σ_j A|v_j| is below
# _NEGLIGIBLE of its largest entry (what the channel could carry there is negligible).
_CONDITION = 1e-4
_NEGLIGIBLE = 1e-3
# Hooks under the attention module that hold the gate's pre-activation (TransformerLens 4.3).
GATE_HOOKS = ("hook_q_gate", "gate.hook_out")


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


def gate_channels(hf_attn: Any, d_head: int) -> int:
    """`d_head` when the gate has one entry per (head, channel) — o_proj's input width — else 1."""
    o_proj = _linear(getattr(hf_attn, "o_proj", None))
    width = None if o_proj is None else o_proj.in_features
    for child in ("g_proj", "gate_proj", "o_gate"):
        gate = _linear(getattr(hf_attn, child, None))
        if gate is not None:
            return d_head if gate.out_features == width else 1
    q_proj = _linear(getattr(hf_attn, "q_proj", None))
    return d_head if q_proj is not None and width is not None and q_proj.out_features == 2 * width else 1


def gate_hook(hook_dict: Any, prefix: str) -> str | None:
    """The hook holding the gate's pre-activation under attention `prefix`, if the bridge has one."""
    for suffix in GATE_HOOKS:
        if f"{prefix}.{suffix}" in hook_dict:
            return f"{prefix}.{suffix}"
    return None


def _linear(module: Any) -> torch.nn.Linear | None:
    """`module` itself if it is a Linear, else the Linear a bridge component wraps, else None."""
    inner = original(module)
    return inner if isinstance(inner, torch.nn.Linear) else None


def _flat(t: Tensor, b: int, q: int, h: int, e: int, what: str, name: str) -> Tensor:
    if t.numel() != b * q * h * e or t.shape[0] != b or t.shape[1] != q:
        raise UnsupportedModelError(
            f"{name}: {what} has shape {list(t.shape)}, expected [batch, query, heads·d_head] = [{b}, {q}, {h * e}]"
        )
    return t.reshape(b, q, h, e).to(torch.float64)


def gated_output(
    pattern: Float[Tensor, "b h q k"],
    values: Float[Tensor, "b k h e"],
    W_O: Float[Tensor, "h e d"],
    o_in: Tensor,
    name: str,
    gate_pre: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """(pattern, values, W_O, channels_per_head) with the receiver's gate folded in (module docstring).

    `o_in` is the cached input of o_proj, `[b, q, h·e]` or `[b, q, h, e]`; `gate_pre` the
    cached pre-sigmoid gate `[b, q, h·e]`, or None. A per-head gate gives the gated pattern
    `[b, h, q, k]` with the values and W_O unchanged (channels_per_head 1); a per-channel gate
    gives `[b, h·e, q, k]`, values `[b, k, h·e, 1]`, W_O `[h·e, 1, d]` (channels_per_head e).
    """
    b, h, q, k = pattern.shape
    e = values.shape[-1]
    o = _flat(o_in, b, q, h, e, "o.hook_in", name)
    z = torch.einsum("bhqk,bkhe->bqhe", pattern.to(torch.float64), values.to(torch.float64))
    bound = _GATE_RTOL * max(float(o.abs().max()), 1e-30)

    zz = z.pow(2).sum(-1)
    head_gate = torch.where(zz > 0, (o * z).sum(-1) / zz.clamp(min=1e-300), torch.zeros_like(zz))  # [b, q, h]
    head_err = float((o - head_gate[..., None] * z).abs().max())
    if head_err <= bound:
        return pattern * head_gate.permute(0, 2, 1)[..., None].to(pattern.dtype), values, W_O, 1

    gate = None
    if gate_pre is not None:
        pre = _flat(gate_pre, b, q, h, e, "the cached gate", name)
        for activation in (torch.sigmoid, F.softplus):  # Qwen3-Next / Qwen3.5 / AFMoE; Laguna
            cached = activation(pre)
            if float((o - cached * z).abs().max()) <= bound:
                gate = cached
                break
    if gate is None:  # the ratio of o_proj's real input to the ungated z
        # Σ_j A|v_j|: z's size before cancellation. Where |z| is far below it, the float32 z the
        # model gated differs from the rebuilt one by more than the ratio can tolerate.
        zabs = torch.einsum("bhqk,bkhe->bqhe", pattern.abs().to(torch.float64), values.abs().to(torch.float64))
        good = z.abs() > _CONDITION * zabs
        gate = torch.where(good, o / torch.where(good, z, 1.0), torch.zeros_like(o))
        lost = torch.where(good, torch.zeros_like(zabs), zabs)  # what a gate of 0 drops there
        if float(lost.max()) > _NEGLIGIBLE * float(zabs.max()):
            raise UnsupportedModelError(
                f"{name}: the bridge caches no usable gate for this per-channel gated output, and o_proj's input "
                "divided by the attention output cannot recover it where the attention output cancels (|z| below "
                f"{_CONDITION:g} of Σ_j A|v_j| at {int((~good & (zabs > _NEGLIGIBLE * zabs.max())).sum())} "
                "receiver·channel entries); a gate of 0 there would drop real contributions"
            )
        err = float((o - gate * z).abs().max())
        if err > bound:
            raise UnsupportedModelError(
                f"{name}: o_proj's input is not a receiver-wise gate times the attention output: no per-head or "
                f"per-channel gate reproduces it (max|Δ| = {err:.3g} where the attention output is 0 but o_proj's "
                "input is not), so this gated layout is not supported"
            )
    dtype = pattern.dtype
    g = gate.permute(0, 2, 3, 1).to(dtype)  # [b, h, e, q]
    channels = (pattern[:, :, None] * g[..., None]).reshape(b, h * e, q, k)
    return channels, values.reshape(b, k, h * e, 1), W_O.reshape(h * e, 1, W_O.shape[-1]), e
