"""Independent dense float64 ALTI references for the block layouts of issue 10.

Written from docs/spec.md §1a, §1b, §1d, §2, §4 and the Hugging Face
modules' forward passes; imports neither ``lens_alti`` nor ``transformer_lens``. Every transformed
vector ``T_i(x_j)`` is materialised, checked to sum (with the bias) to the block's real output
captured from the Hugging Face forward pass, and turned into L1 contributions and their rollout.

Supported (``config.model_type``):
- ``granite``: pre-RMSNorm LLaMA-like layers, ``y = x + m · attn(norm(x))`` with the
  ``residual_multiplier`` m (the ``attention_multiplier`` is inside the softmax);
- ``bitnet``: pre-RMSNorm layers whose attention applies an RMSNorm to the concatenated heads'
  outputs before ``o_proj`` (``attn_sub_norm``), a per-receiver scale 1/rms_i;
- ``openai-gpt``: post-LN causal decoder, ``y = LN1(x + attn(x))``;
- ``laguna``: per-layer head counts and a per-head output gate ``softplus(g_proj(xn))_i,h``
  multiplying head h's output at receiver i before ``o_proj``.
- ``deepseek_v2``: multi-head latent attention: each head's value is decompressed from the
  source's latent, ``v_j = kv_b_proj(RMSNorm(kv_a_proj_with_mqa(xn_j)[:kv_lora_rank]))`` (the value part
  of each head's slice), ``o_proj`` over ``v_head_dim`` per head;
- ``gemma4_text``: a scale-free RMSNorm on each value (``v_norm``), plain-``w`` RMSNorms, and a norm
  on the attention output only, ``y = x + w ⊙ attn_i / rms(attn_i)``;
- ``gpt_oss``: attention sinks: each row's probabilities sum to less than 1 (the sink logit takes
  the rest and contributes no value); biased projections.
The attention probabilities are the ones the Hugging Face module returned in eager mode (for
GPT-OSS: without the sink column).
Only meant for tiny models and unpadded batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.support.reference import float64_eager_copy, hf_eps

__all__ = ["reference_layout"]

_RTOL = 1e-6  # float64 throughout, but some HF norms compute in float32 even in a float64 model


def _check(what: str, layer: int, got: torch.Tensor, want: torch.Tensor, rtol: float = _RTOL) -> None:
    err = float((got - want).abs().max())
    if not err <= rtol * max(1.0, float(want.abs().max())):
        raise AssertionError(f"reference: {what} differs at layer {layer}: max|Δ| = {err:.3g}")


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _rms_norm(x: torch.Tensor, norm: nn.Module, offset: bool = False) -> torch.Tensor:
    eps = hf_eps(norm)
    w = norm.weight.to(torch.float64)
    return x / _rms(x, eps) * ((1.0 + w) if offset else w)


def _layers(model: nn.Module) -> tuple[str, list[Any]]:
    kind = model.config.model_type
    if kind in ("granite", "bitnet", "laguna", "deepseek_v2", "gemma4_text", "gpt_oss"):
        return kind, list(model.model.layers)
    if kind == "openai-gpt":
        return kind, list(model.transformer.h)
    raise NotImplementedError(f"reference_layout: unsupported model_type {kind!r}")


def _values(kind: str, layer: Any, xn: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-head values ``[b, H, n, dh]``, ``W_O`` ``[H, dh, d]``, ``b_O`` ``[d]`` from the HF weights."""
    b, n, d = xn.shape
    if kind == "openai-gpt":
        attn = layer.attn
        h = cfg.n_head
        dh = d // h
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: [in, out], columns [q | k | v]
        v = (xn @ w[:, 2 * d : 3 * d] + bias[2 * d : 3 * d]).view(b, n, h, dh)
        return v.permute(0, 2, 1, 3), attn.c_proj.weight.view(h, dh, d), attn.c_proj.bias
    attn = layer.self_attn
    if kind == "deepseek_v2":
        h, r, dn, dv = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        latent = (xn @ attn.kv_a_proj_with_mqa.weight.T)[..., :r]
        if attn.kv_a_proj_with_mqa.bias is not None:
            latent = latent + attn.kv_a_proj_with_mqa.bias[:r]
        latent = _rms_norm(latent, attn.kv_a_layernorm)
        kv = (latent @ attn.kv_b_proj.weight.T).view(b, n, h, dn + dv)
        v = kv[..., dn:]  # [b, n, H, dv]: each head's value slice
        w_o = attn.o_proj.weight.T.reshape(h, dv, d)
        b_o = attn.o_proj.bias if attn.o_proj.bias is not None else torch.zeros(d, dtype=xn.dtype)
        return v.permute(0, 2, 1, 3), w_o, b_o
    if kind == "gemma4_text":
        dh = attn.head_dim
    else:
        dh = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    h = attn.o_proj.in_features // dh  # this layer's own head count (Laguna: per layer)
    v = xn @ attn.v_proj.weight.T
    if attn.v_proj.bias is not None:
        v = v + attn.v_proj.bias
    v = v.view(b, n, v.shape[-1] // dh, dh)
    if kind == "gemma4_text":  # v_norm: x / sqrt(mean(x²) + eps), no gain
        v_norm = v / _rms(v, hf_eps(attn.v_norm))
        _check("value norm formula", 0, v_norm, attn.v_norm(v), 1e-5)
        v = v_norm
    n_kv = v.shape[2]
    v = v.repeat_interleave(h // n_kv, dim=2)
    w_o = attn.o_proj.weight.T.reshape(h, dh, d)
    b_o = attn.o_proj.bias if attn.o_proj.bias is not None else torch.zeros(d, dtype=xn.dtype)
    return v.permute(0, 2, 1, 3), w_o, b_o


@torch.no_grad()
def reference_layout(hf_model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense float64 ALTI (L1) of a decoder with one of the layouts above.

    Returns ``l1`` and ``rollout`` ``[batch, layer, query, key]`` and ``resultant`` /
    ``resultant_actual`` ``[batch, layer, query, d_model]`` (the reconstruction and the real block output).
    """
    model = float64_eager_copy(hf_model)
    if hasattr(model, "set_experts_implementation") and getattr(model.config, "_experts_implementation", None):
        model.set_experts_implementation("eager")  # grouped_mm kernels refuse float64 (GPT-OSS)
    kind, layers = _layers(model)
    cfg = model.config
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(layers):
        attn = layer.attn if kind == "openai-gpt" else layer.self_attn

        def pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            captured[f"attn_in{idx}"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def post(_m: nn.Module, _args: tuple, out: Any, idx: int = idx) -> None:
            captured[f"attn_out{idx}"] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()
            if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor):
                captured[f"probs{idx}"] = out[1].detach().clone()  # eager attention returns its probabilities

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.register_forward_hook(post))
        if kind == "openai-gpt":

            def ln_post(_m: nn.Module, _args: tuple, out: torch.Tensor, idx: int = idx) -> None:
                captured[f"ln1_out{idx}"] = out.detach().clone()

            handles.append(layer.ln_1.register_forward_hook(ln_post))
        if kind == "bitnet":

            def sub_pre(_m: nn.Module, args: tuple, idx: int = idx) -> None:
                captured[f"sub_in{idx}"] = args[0].detach().clone()

            handles.append(attn.attn_sub_norm.register_forward_pre_hook(sub_pre))
    try:
        out = model(input_ids=input_ids.long(), output_hidden_states=True, output_attentions=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    bsz, n = input_ids.shape
    eye = torch.eye(n, dtype=torch.float64)
    acc: dict[str, list[torch.Tensor]] = {"l1": [], "resultant": [], "resultant_actual": []}
    for idx, layer in enumerate(layers):
        x = out.hidden_states[idx].to(torch.float64)  # the layer's input residual [b, n, d]
        a = captured.get(f"probs{idx}")
        if a is None:
            a = out.attentions[idx]
        a = a.to(torch.float64)  # [b, H, n, n]
        if torch.triu(a, diagonal=1).abs().max() != 0 or a.min() < 0:
            raise AssertionError(f"reference: attention at layer {idx} is not causal probabilities")
        rows = a.sum(-1)
        if kind == "gpt_oss":  # the sink takes part of every row's mass
            if rows.max() > 1 + 1e-9 or rows.min() > 1 - 1e-6:
                raise AssertionError(f"reference: GPT-OSS rows at layer {idx} do not leave mass to the sink")
        elif (rows - 1).abs().max() > 1e-6:  # some HF softmaxes run in float32 even in a float64 model
            raise AssertionError(f"reference: attention rows at layer {idx} do not sum to 1")
        if kind == "openai-gpt":
            xn = x  # post-LN: attention reads the residual itself
        else:
            xn = _rms_norm(x, layer.input_layernorm)
            if kind == "laguna":
                _check("input norm formula", idx, xn, layer.input_layernorm(x), 1e-5)
        _check("attention input", idx, xn, captured[f"attn_in{idx}"])
        v, w_o, b_o = _values(kind, layer, xn, cfg)
        if kind == "bitnet":
            # o_proj(RMSNorm(concat_h z_h)): z_i = Σ_j A v_j per head, rms_i over all heads' channels,
            # so T^h_i(x_j) = A[h,i,j] · ((w_h ⊙ v_j,h) @ W_O[h]) / rms_i.
            sub = layer.self_attn.attn_sub_norm
            z = torch.einsum("bhij,bhje->bihe", a, v).flatten(2)  # [b, n, H·dh]
            _check("concatenated heads' output", idx, z, captured[f"sub_in{idx}"])
            eps = hf_eps(sub)
            _check("head norm formula", idx, z / _rms(z, eps) * sub.weight, sub(z), 1e-5)
            gain = sub.weight.to(torch.float64).view(v.shape[1], v.shape[-1])  # [H, dh]
            vo = torch.einsum("bhje,hed->bhjd", v * gain[None, :, None, :], w_o)
            parts = a[..., None] * vo[:, :, None, :, :] / _rms(z, eps)[:, None, :, None, :]
        else:
            vo = torch.einsum("bhje,hed->bhjd", v, w_o)  # VO[h, j]
            parts = a[..., None] * vo[:, :, None, :, :]  # [b, H, i, j, d]
        if kind == "laguna":
            attn_mod = layer.self_attn
            if not attn_mod.gate_per_head:
                raise NotImplementedError("reference: Laguna with a per-channel gate")
            gate = torch.nn.functional.softplus(xn @ attn_mod.g_proj.weight.T)  # [b, i, H]
            parts = parts * gate.permute(0, 2, 1)[:, :, :, None, None]
        tok = parts.sum(1)  # [b, i, j, d]
        if kind == "granite":
            m = float(cfg.residual_multiplier)
            t = m * tok + eye[None, :, :, None] * x[:, None, :, :]
            bias = m * b_o
            y_true = x + m * captured[f"attn_out{idx}"]
        elif kind == "gemma4_text":  # y = x + w ⊙ u_i / rms(u_i), u = attn_out (real, captured)
            post = layer.post_attention_layernorm
            u = captured[f"attn_out{idx}"]
            rms = _rms(u, hf_eps(post))  # [b, i, 1]
            _check("post-attention norm formula", idx, u / rms * post.weight, post(u), 1e-5)
            t = post.weight * tok / rms[:, :, None, :] + eye[None, :, :, None] * x[:, None, :, :]
            bias = post.weight * b_o / rms
            y_true = x + post(u)
        elif kind in ("bitnet", "laguna", "deepseek_v2", "gpt_oss"):
            t = tok + eye[None, :, :, None] * x[:, None, :, :]
            bias = b_o
            y_true = x + captured[f"attn_out{idx}"]
        else:  # openai-gpt: y = γ ⊙ (u − mean u)/σ_i + β, u = x + attn, σ_i from the real u
            ln = layer.ln_1
            u = x + captured[f"attn_out{idx}"]
            sigma = (u.var(-1, unbiased=False, keepdim=True) + hf_eps(ln)).sqrt()  # [b, i, 1]

            def lin(w: torch.Tensor, s: torch.Tensor, ln: nn.Module = ln) -> torch.Tensor:
                return ln.weight * (w - w.mean(-1, keepdim=True)) / s

            t = lin(tok + eye[None, :, :, None] * x[:, None, :, :], sigma[:, :, None, :])
            bias = lin(b_o.expand(bsz, n, -1), sigma) + ln.bias
            y_true = captured[f"ln1_out{idx}"]
        y = t.sum(2) + bias
        _check("reconstruction of the block output", idx, y, y_true)
        c = (y.abs().sum(-1)[:, :, None] - (y[:, :, None, :] - t).abs().sum(-1)).clamp(min=0)
        acc["l1"].append(c / c.sum(-1, keepdim=True))
        acc["resultant"].append(y)
        acc["resultant_actual"].append(y_true)
    res = {k: torch.stack(v, dim=1) for k, v in acc.items()}
    roll = [res["l1"][:, 0]]
    for layer_idx in range(1, res["l1"].shape[1]):
        roll.append(res["l1"][:, layer_idx] @ roll[-1])
    res["rollout"] = torch.stack(roll, dim=1)
    return res
