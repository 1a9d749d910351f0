"""Independent dense float64 reference of ALTI-Logit (docs/spec.md §7) for Hugging Face models.

Written from the paper's equations (Ferrando, Gállego, Tsiamas, Costa-jussà 2023) as condensed in
docs/spec.md §7. It imports neither ``lens_alti`` nor ``transformer_lens``:
weights are read from the Hugging Face modules, activations are captured with forward hooks on a
float64 copy, and every term is pushed FORWARD to the logit (each term through every later
linearised norm, then the final norm and the unembedding), the literal reading of the spec, while
lens_alti propagates a direction backwards. The ALTI rollout comes from ``tests/support/reference.py`` /
``tests/support/reference_seq2seq.py``.

Supported: GPT-2, LLaMA (GQA), GPT-NeoX (parallel attention + MLP) and Gemma-2 (post-attention
norm, ``1 + w`` gains, logit soft-capping: the pre-cap logit is explained), decoder-only; Marian
(post-LN encoder-decoder, no final norm, ``final_logits_bias``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.support.reference import (
    _layers,
    _mask_fix_hook,
    _values_and_out_proj,
    float64_eager_copy,
    hf_eps,
    reference_decoder_only,
)
from tests.support.reference_seq2seq import reference_seq2seq

__all__ = ["reference_logit_decoder", "reference_logit_marian"]

_RTOL = 1e-9


def _check(what: str, got: torch.Tensor, want: torch.Tensor, rtol: float = _RTOL) -> None:
    err = float((got - want).abs().max())
    if err > rtol * max(1.0, float(want.abs().max())):
        raise AssertionError(f"reference_logit: {what}: max|Δ| = {err:.3g}")


def _final_norm(model: nn.Module) -> tuple[nn.Module, str]:
    kind = model.config.model_type
    if kind == "gpt2":
        return model.transformer.ln_f, "layernorm"
    if kind in ("llama", "gemma2"):
        return model.model.norm, "rmsnorm"
    if kind == "gpt_neox":
        return model.gpt_neox.final_layer_norm, "layernorm"
    raise NotImplementedError(kind)


def _norm_linear(norm: nn.Module, kind: str, model_type: str, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """(L(v) for the norm at the real scale of x [d], its bias β [d]) written out from the formulas."""
    if kind == "layernorm":
        sigma = ((x - x.mean()) ** 2).mean().add(hf_eps(norm)).sqrt()
        gamma = norm.weight

        def lin(v: torch.Tensor) -> torch.Tensor:
            return gamma * (v - v.mean(-1, keepdim=True)) / sigma

        beta = norm.bias if norm.bias is not None else torch.zeros_like(x)
        return lin, beta
    eps = hf_eps(norm)
    rms = (x.pow(2).mean() + eps).sqrt()
    gain = 1.0 + norm.weight if model_type == "gemma2" else norm.weight

    def lin_rms(v: torch.Tensor) -> torch.Tensor:
        return gain * v / rms

    return lin_rms, torch.zeros_like(x)


@torch.no_grad()
def reference_logit_decoder(
    hf_model: nn.Module,
    input_ids: torch.Tensor,
    target: list[int],
    contrast: list[int] | None,
    positions: list[int],
    attention_mask: torch.Tensor | None = None,
    contrast_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ALTI-Logit of a decoder-only HF model, float64, dense.

    ``contrast_weights`` ``[b, vocab]``: a distribution p whose mean logit is subtracted, the explained
    quantity being ``logit_target − Σ_v p_v·logit_v`` (docs/spec.md §13b).

    Returns ``heads`` [b, layer, head, k], ``head_totals`` [b, layer, head], ``mlp`` [b, layer],
    ``attn_bias`` [b, layer], ``embedding`` [b], ``bias`` [b], ``logit`` [b] (pre-softcap),
    ``by_layer`` [b, layer, k] and ``tokens`` [b, k].
    """
    model = float64_eager_copy(hf_model)
    layers = _layers(model)
    model_type = model.config.model_type
    final, final_kind = _final_norm(model)
    bsz, n = input_ids.shape
    attn_out: dict[int, torch.Tensor] = {}
    layer_in: dict[int, torch.Tensor] = {}
    handles = []
    blocks = (
        model.transformer.h if model_type == "gpt2"
        else model.gpt_neox.layers if model_type == "gpt_neox" else model.model.layers
    )
    for idx, (layer, block) in enumerate(zip(layers, blocks, strict=True)):

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple:
            return _mask_fix_hook(mod, args, kwargs)

        def post(_m: nn.Module, _a: tuple, output: Any, idx: int = idx) -> None:
            attn_out[idx] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        def block_pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            layer_in[idx] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        handles.append(layer.attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.attn.register_forward_hook(post))
        handles.append(block.register_forward_pre_hook(block_pre, with_kwargs=True))
    final_in: dict[str, torch.Tensor] = {}
    handles.append(
        final.register_forward_pre_hook(lambda _m, args: final_in.__setitem__("x", args[0].detach().clone()))
    )
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            output_attentions=True,
            use_cache=False,
        )
    finally:
        for h in handles:
            h.remove()
    lm_w = model.get_output_embeddings().weight  # [vocab, d]
    lm_b = model.get_output_embeddings().bias
    cap = getattr(model.config, "final_logit_softcapping", None)
    rollout = reference_decoder_only(hf_model, input_ids, attention_mask)["rollout"]
    n_layers = len(layers)
    res: dict[str, list[torch.Tensor]] = {k: [] for k in ("heads", "mlp", "attn_bias", "embedding", "bias", "logit")}
    for b in range(bsz):
        N = positions[b]
        u = lm_w[target[b]] - (lm_w[contrast[b]] if contrast is not None else 0)
        ub = 0.0 if lm_b is None else lm_b[target[b]] - (lm_b[contrast[b]] if contrast is not None else 0)
        if contrast_weights is not None:
            pw = contrast_weights[b].double()
            u = u - pw @ lm_w
            ub = ub if lm_b is None else ub - pw @ lm_b
        xL = final_in["x"][b, N]
        lin, beta = _norm_linear(final, final_kind, model_type, xL)

        def to_logit(v: torch.Tensor, lin: Any = lin, u: torch.Tensor = u) -> torch.Tensor:
            return lin(v) @ u

        # The logit from the norm's formula in float64, checked against the model's own output
        # (RMSNorm modules compute in float32 even in a float64 model: 1e-6 there).
        z = (lin(xL) + beta) @ lm_w.T + (0 if lm_b is None else lm_b)
        if cap:
            _check("soft-capped logits", cap * torch.tanh(z / cap), out.logits[b, N], 1e-6)
        else:
            _check("logits", z, out.logits[b, N], 1e-6)
        logit = z[target[b]] - (z[contrast[b]] if contrast is not None else 0)
        if contrast_weights is not None:
            logit = logit - contrast_weights[b].double() @ z
        heads_b, mlp_b, attn_b = [], [], []
        for idx, layer in enumerate(layers):
            x = layer_in[idx][b : b + 1]
            xn = layer.norm(x)
            v, w_o, b_o = _values_and_out_proj(layer, xn)  # v [1, H, n, dh]
            vo = torch.einsum("bhjd,hde->bhje", v, w_o)[0]  # [H, n, d]
            a = out.attentions[idx][b, :, N].double()  # [H, n]
            if attention_mask is not None:
                a = a * attention_mask[b].double()
            parts = a[..., None] * vo  # [H, n, d]
            bias_vec = b_o
            attn_real = attn_out[idx][b, N]
            if layer.post_norm is not None:  # Gemma-2: g ⊙ a / rms(a), g = 1 + w
                rms = (attn_real.pow(2).mean() + hf_eps(layer.post_norm)).sqrt()
                g = 1.0 + layer.post_norm.weight
                parts = g * parts / rms
                bias_vec = g * b_o / rms
                attn_written = g * attn_real / rms
            else:
                attn_written = attn_real
            _check(f"layer {idx} attention at N", parts.sum((0, 1)) + bias_vec, attn_written)
            nxt = layer_in[idx + 1][b, N] if idx + 1 < n_layers else final_in["x"][b, N]
            mlp_write = nxt - layer_in[idx][b, N] - attn_written
            heads_b.append(torch.stack([torch.stack([to_logit(p) for p in head]) for head in parts]))
            mlp_b.append(to_logit(mlp_write))
            attn_b.append(to_logit(bias_vec))
        emb = to_logit(layer_in[0][b, N])
        bias = sum(attn_b) + beta @ u + ub
        total = emb + sum(h.sum() for h in heads_b) + sum(mlp_b) + beta @ u + ub + sum(attn_b)
        _check("completeness", total, logit, 1e-8)
        res["heads"].append(torch.stack(heads_b))
        res["mlp"].append(torch.stack(mlp_b))
        res["attn_bias"].append(torch.stack(attn_b))
        res["embedding"].append(emb)
        res["bias"].append(torch.as_tensor(bias))
        res["logit"].append(logit)
    out_d = {k: torch.stack(v) for k, v in res.items()}
    heads = out_d["heads"]  # [b, L, H, n]
    out_d["head_totals"] = heads.sum(-1)
    by_layer = [heads[:, 0].sum(1)] + [
        torch.einsum("bk,bks->bs", heads[:, layer].sum(1), rollout[:, layer - 1]) for layer in range(1, n_layers)
    ]
    out_d["by_layer"] = torch.stack(by_layer, 1)
    tokens = out_d["by_layer"].sum(1)
    for b in range(bsz):
        tokens[b, positions[b]] += out_d["embedding"][b]
    out_d["tokens"] = tokens
    return out_d


@torch.no_grad()
def reference_logit_marian(
    hf_model: nn.Module,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    target: list[int],
    contrast: list[int] | None,
    positions: list[int],
) -> dict[str, torch.Tensor]:
    """ALTI-Logit of a post-LN Marian model at decoder positions `positions` (float64, dense).

    Each term is pushed forward through every later post-norm of the decoder, linearised at the
    real scale of position N (``L(v) = γ ⊙ (v − mean v)/σ``; β enters once and is pushed on).
    Returns ``heads`` [b, L, H, T] (decoder self), ``cross_heads`` [b, L, H, S], ``mlp`` [b, L],
    ``embedding``, ``bias``, ``logit`` [b], ``by_layer`` [b, L, S+T], ``tokens`` [b, S+T].
    """
    if hf_model.config.model_type != "marian":
        raise NotImplementedError(hf_model.config.model_type)
    model = float64_eager_copy(hf_model)
    dec = model.model.decoder
    cfg = model.config
    h = cfg.decoder_attention_heads
    dh = cfg.d_model // h
    cap: dict[str, torch.Tensor] = {}
    handles = []

    def grab_in(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            cap[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            kv = kwargs.get("key_value_states", kwargs.get("encoder_hidden_states"))
            if isinstance(kv, torch.Tensor):
                cap[name + ".kv"] = kv.detach().clone()

        return hook

    def grab_out(name: str) -> Any:
        def hook(_m: nn.Module, _a: tuple, output: Any) -> None:
            cap[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    for i, layer in enumerate(dec.layers):
        handles.append(layer.register_forward_pre_hook(grab_in(f"{i}.in"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(grab_in(f"{i}.sa_in"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(grab_out(f"{i}.sa")))
        handles.append(layer.encoder_attn.register_forward_pre_hook(grab_in(f"{i}.ca_in"), with_kwargs=True))
        handles.append(layer.encoder_attn.register_forward_hook(grab_out(f"{i}.ca")))
        for ln in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            handles.append(getattr(layer, ln).register_forward_pre_hook(grab_in(f"{i}.{ln}"), with_kwargs=True))
            handles.append(getattr(layer, ln).register_forward_hook(grab_out(f"{i}.{ln}.out")))
    try:
        out = model(
            input_ids=input_ids, decoder_input_ids=decoder_input_ids, output_attentions=True, use_cache=False
        )
    finally:
        for hd in handles:
            hd.remove()
    ref = reference_seq2seq(hf_model, input_ids, decoder_input_ids)
    r_enc = ref["encoder_rollout"][:, -1]
    total = ref["total"]
    lm_w = model.lm_head.weight
    flb = model.final_logits_bias[0]
    n_layers = len(dec.layers)
    bsz, t_len = decoder_input_ids.shape
    s_len = input_ids.shape[1]
    res: dict[str, list[torch.Tensor]] = {k: [] for k in ("heads", "cross_heads", "mlp", "embedding", "bias", "logit")}
    for b in range(bsz):
        N = positions[b]
        u = lm_w[target[b]] - (lm_w[contrast[b]] if contrast is not None else 0)
        ub = flb[target[b]] - (flb[contrast[b]] if contrast is not None else 0)
        # Linear maps in forward order (3 per layer); maps[k] = (L_k, β_k).
        maps = []
        for i, layer in enumerate(dec.layers):
            for ln in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
                norm = getattr(layer, ln)
                z = cap[f"{i}.{ln}"][b, N]
                lin, beta = _norm_linear(norm, "layernorm", "marian", z)
                _check(f"{i}.{ln} linearised", lin(z) + beta, cap[f"{i}.{ln}.out"][b, N])
                maps.append((lin, beta))

        def forward_from(k: int, v: torch.Tensor, maps: list = maps, u: torch.Tensor = u) -> torch.Tensor:
            """Push a term added before map k through maps k.. and read the logit."""
            for lin, _ in maps[k:]:
                v = lin(v)
            return v @ u

        z_all = cap[f"{n_layers - 1}.final_layer_norm.out"][b, N] @ lm_w.T + flb
        _check("logits", z_all, out.logits[b, N])
        logit = z_all[target[b]] - (z_all[contrast[b]] if contrast is not None else 0)
        bias = ub + sum(forward_from(k + 1, beta) for k, (_, beta) in enumerate(maps))
        heads_b, cross_b, mlp_b = [], [], []
        for i, layer in enumerate(dec.layers):
            pieces = []
            for which, attn, vin, pattern in (
                ("sa", layer.self_attn, cap[f"{i}.sa_in"][b], out.decoder_attentions[i][b, :, N].double()),
                ("ca", layer.encoder_attn, cap[f"{i}.ca_in.kv"][b], out.cross_attentions[i][b, :, N].double()),
            ):
                v = (vin @ attn.v_proj.weight.T + attn.v_proj.bias).view(-1, h, dh).transpose(0, 1)  # [H, m, dh]
                w_o = attn.out_proj.weight.T.reshape(h, dh, cfg.d_model)
                vo = torch.einsum("hjd,hde->hje", v, w_o)
                parts = pattern[..., None] * vo
                _check(f"{i}.{which} output at N", parts.sum((0, 1)) + attn.out_proj.bias, cap[f"{i}.{which}"][b, N])
                k = 3 * i + (0 if which == "sa" else 1)
                pieces.append(torch.stack([torch.stack([forward_from(k, p) for p in hd]) for hd in parts]))
                bias = bias + forward_from(k, attn.out_proj.bias)
            heads_b.append(pieces[0])
            cross_b.append(pieces[1])
            ffn_out = cap[f"{i}.final_layer_norm"][b, N] - cap[f"{i}.encoder_attn_layer_norm.out"][b, N]
            mlp_b.append(forward_from(3 * i + 2, ffn_out))
        emb = forward_from(0, cap["0.in"][b, N])
        total_parts = emb + sum(x.sum() for x in heads_b) + sum(x.sum() for x in cross_b) + sum(mlp_b) + bias
        _check("completeness", total_parts, logit, 1e-8)
        res["heads"].append(torch.stack(heads_b))
        res["cross_heads"].append(torch.stack(cross_b))
        res["mlp"].append(torch.stack(mlp_b))
        res["embedding"].append(emb)
        res["bias"].append(bias)
        res["logit"].append(logit)
    o = {k: torch.stack(v) for k, v in res.items()}
    zeros = torch.zeros(bsz, t_len, s_len, dtype=torch.float64)
    eye = torch.cat([zeros, torch.eye(t_len).double().expand(bsz, -1, -1)], -1)
    by_layer = []
    for layer in range(n_layers):
        below = eye if layer == 0 else total[:, layer - 1]
        row = torch.einsum("bk,bks->bs", o["heads"][:, layer].sum(1), below)
        row[:, :s_len] += torch.einsum("bk,bks->bs", o["cross_heads"][:, layer].sum(1), r_enc)
        by_layer.append(row)
    o["by_layer"] = torch.stack(by_layer, 1)
    tokens = o["by_layer"].sum(1)
    for b in range(bsz):
        tokens[b, s_len + positions[b]] += o["embedding"][b]
    o["tokens"] = tokens
    o["head_totals"] = o["heads"].sum(-1)
    o["cross_head_totals"] = o["cross_heads"].sum(-1)
    return o


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """`actual` equals the float64 reference `expected` within `tol` of the reference's scale (at least 1)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=0)
