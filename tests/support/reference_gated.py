"""Independent dense float64 reference for attention whose output is gated per receiver and channel.

Qwen3-Next / Qwen3.5 / Qwen3.5-MoE attention layers and AFMoE compute
`o_proj(σ(gate_i) ⊙ z_i)` with `z_i,h = Σ_j A[h,i,j] v_j,h` and the gate a projection of the
receiver's own (normed) input: `q_proj`'s second half per head (Qwen3-Next, Qwen3.5) or
`gate_proj` (AFMoE), or `softplus(g_proj)` (Laguna with `gating="per-element"`). With the gate at its real value,
`T_i(x_j) = Σ_h A[h,i,j] (g_i,h ⊙ v_j,h) W_O[h]` (docs/spec-mixers.md §7); AFMoE then applies
an RMSNorm to the attention output before the residual sum (docs/spec.md §1d: `s_i = w / rms_i`).

Imports neither ``lens_alti`` nor ``transformer_lens``: values and gates are recomputed from the
Hugging Face modules' weights and the attention module's real input, the attention
probabilities are the Hugging Face module's own (eager), and every `T_i(x_j)` and every head's
part `T^h_i(x_j)` is materialised `[b, H, i, j, d]`, checked to sum to the module's real output,
and turned into ALTI (docs/spec.md §2) and per-head ALTI (docs/spec.md §3). Tiny models, unpadded batches only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.reference import hf_eps, run_hooked

GATED = ("Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention", "AfmoeAttention", "LagunaAttention")


def _lin(x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach().double()
    b = None if getattr(mod, "bias", None) is None else mod.bias.detach().double()
    return F.linear(x, w, b)


def _l1(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sum(-1)


def per_head_alti(parts: torch.Tensor, y: torch.Tensor, residual: torch.Tensor) -> dict[str, torch.Tensor]:
    """docs/spec.md §3 from dense parts `parts[b, H, i, j, d]` (T^h_i(x_j), residual excluded).

    Each part and the residual `residual[b, i, d]` scores max(0, ‖y_i‖₁ − ‖y_i − part‖₁);
    `heads[b, H, i, j]` and `heads_residual[b, i]` are normalised together per row; the
    head-level summary uses whole head outputs `o^h_i = Σ_j T^h_i(x_j)` as parts.
    """
    yl = _l1(y)
    score = (yl[:, None, :, None] - _l1(y[:, None, :, None] - parts)).clamp(min=0)
    res = (yl - _l1(y - residual)).clamp(min=0)
    total = score.sum((1, 3)) + res
    out = {"heads": score / total[:, None, :, None], "heads_residual": res / total}
    o = parts.sum(3)  # [b, H, i, d]
    score_o = (yl[:, None] - _l1(y[:, None] - o)).clamp(min=0)
    total_o = score_o.sum(1) + res
    out["head_outputs"] = score_o / total_o[:, None]
    out["head_outputs_residual"] = res / total_o
    return out


@torch.no_grad()
def reference_gated_layers(hf_model: nn.Module, input_ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Dense float64 ALTI of every gated attention layer: `{layer: {...}}`.

    Keys: `parts` `[b, H, i, j, d]`, `T` `[b, i, j, d]` (the receiver's own residual on the
    diagonal), `y` `[b, i, d]` the real block output, `l1` `[b, i, j]` row-normalised, and
    the per-head results of `per_head_alti`.
    """
    model = copy.deepcopy(hf_model).eval()
    model.set_attn_implementation("eager")
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    layers = list(model.model.layers)
    for idx, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or type(attn).__name__ not in GATED or getattr(attn, "gate_per_head", False):
            continue

        def layer_pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            hs = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(idx, {})["x"] = hs.detach().double().clone()

        def attn_pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            hs = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(idx, {})["h"] = hs.detach().double().clone()

        def attn_post(_m: nn.Module, _a: tuple, output: Any, idx: int = idx) -> None:
            seen[idx]["out"] = output[0].detach().double().clone()
            seen[idx]["probs"] = output[1].detach().double().clone()

        def post_norm(_m: nn.Module, _a: tuple, output: Any, idx: int = idx) -> None:
            seen[idx]["normed"] = output.detach().double().clone()

        handles.append(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
        handles.append(attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        handles.append(attn.register_forward_hook(attn_post))
        if type(attn).__name__ == "AfmoeAttention":
            handles.append(layer.post_attention_layernorm.register_forward_hook(post_norm))
    run_hooked(model, input_ids, handles)

    result = {}
    for idx, got in seen.items():
        layer = layers[idx]
        attn = layer.self_attn
        x, h, probs, real = got["x"], got["h"], got["probs"], got["out"]
        b, n, d = x.shape
        H, e = probs.shape[1], attn.head_dim
        v = _lin(h, attn.v_proj).view(b, n, -1, e)
        v = v.repeat_interleave(H // v.shape[2], 2)  # [b, j, H, e]
        if type(attn).__name__ == "AfmoeAttention":
            g = torch.sigmoid(_lin(h, attn.gate_proj).view(b, n, H, e))  # [b, i, H, e]
        elif type(attn).__name__ == "LagunaAttention":  # gating="per-element": softplus(g_proj)
            g = F.softplus(_lin(h, attn.g_proj).view(b, n, H, e))
        else:  # q_proj emits [query | gate] per head
            g = torch.sigmoid(_lin(h, attn.q_proj).view(b, n, H, 2 * e)[..., e:])
        W_O = attn.o_proj.weight.detach().double().T.reshape(H, e, d)
        parts = torch.einsum("bhij,bihe,bjhe,hed->bhijd", probs, g, v, W_O)
        o_bias = torch.zeros(d, dtype=torch.float64) if attn.o_proj.bias is None else attn.o_proj.bias.double()
        err = float((parts.sum((1, 3)) + o_bias - real).abs().max())
        if err > 1e-5 * max(1.0, float(real.abs().max())):
            raise AssertionError(f"reference: layer {idx} gated attention does not reproduce its output: {err:.3g}")
        bias = o_bias.expand(b, n, d)
        if "normed" in got:  # AFMoE: RMSNorm on the attention output, linearised at its real scale
            norm = layer.post_attention_layernorm
            rms = (real.pow(2).mean(-1, keepdim=True) + hf_eps(norm)).sqrt()
            s = norm.weight.detach().double() / rms  # [b, i, d]
            parts = parts * s[:, None, :, None]
            bias = bias * s
            err = float((parts.sum((1, 3)) + bias - got["normed"]).abs().max())
            if err > 1e-5 * max(1.0, float(got["normed"].abs().max())):
                raise AssertionError(f"reference: layer {idx} post-attention norm is not w·o/rms: {err:.3g}")
        y = x + parts.sum((1, 3)) + bias
        T = parts.sum(1) + torch.eye(n, dtype=torch.float64)[None, :, :, None] * x[:, None]
        c = (_l1(y)[..., None] - _l1(y[:, :, None] - T)).clamp(min=0)
        result[idx] = {
            "parts": parts, "T": T, "y": y, "l1": c / c.sum(-1, keepdim=True),
            **per_head_alti(parts, y, x),
        }
    return result
