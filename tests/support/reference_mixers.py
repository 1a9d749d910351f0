"""Independent dense float64 reference for linear-recurrent mixer layers (docs/spec-mixers.md).

It imports neither ``lens_alti`` nor ``transformer_lens``: everything is read from the Hugging
Face modules' weights and recomputed from the papers' equations, by a different route than
the library. The library builds closed-form operators (hidden-attention matrices, the SSD
masked matrix, convolution shifts); this reference instead runs each layer's *recurrence*
step by step once per source token j, with only token j's value switched on and every
data-dependent quantity (Δ, B, C, gates, decays, the SiLU gate sigmoid(p), output-norm
scales) frozen at the value of the real run. That gives T_i(x_j) directly; a last run with
every value off and only the biases on gives bias_i. The sum is checked against the real
layer output captured from the Hugging Face forward pass.

Equations: Mamba (Gu & Dao 2023; hidden attention, Ali et al. 2024), Mamba-2 SSD (Dao & Gu
2024), causal short convolution (LFM2), gated DeltaNet (Yang et al. 2024) as in Qwen3-Next, RecurrentGemma's
RG-LRU (De et al. 2024).
Tiny models only: everything is dense and sequential.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.reference import hf_eps, run_hooked

MAMBA1 = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")
MAMBA2 = ("Mamba2Mixer", "BambaMixer", "NemotronHMamba2Mixer", "GraniteMoeHybridMambaLayer", "FalconH1Mixer")
SHORTCONV = ("Lfm2ShortConv", "Lfm2MoeShortConv")
DELTANET = ("Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "OlmoHybridGatedDeltaNet")
RGLRU = ("RecurrentGemmaRecurrentBlock",)
# Single-sublayer layers that are not recurrent: attention whose pattern the bridge does not cache
# (NemotronH's "*" layers, RecurrentGemma's local attention; the reference uses the Hugging Face
# module's own attention probabilities) and MLPs (their contribution matrix is the identity).
PLAIN_ATTENTION = ("NemotronHAttention", "RecurrentGemmaAttention")
TOKEN_WISE = ("NemotronHMLP", "NemotronHMoE")
KNOWN = MAMBA1 + MAMBA2 + SHORTCONV + DELTANET + RGLRU + PLAIN_ATTENTION + TOKEN_WISE
_RTOL = 1e-9


def _conv_seq(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution written as a loop over positions: `p[t] = Σ_k w[k] x[t-K+1+k] + b`."""
    bsz, n, ch = x.shape
    K = w.shape[-1]
    out = torch.zeros(bsz, n, ch, dtype=torch.float64)
    for t in range(n):
        for k in range(K):
            s = t - K + 1 + k
            if s >= 0:
                out[:, t] += w[:, k] * x[:, s]
        if b is not None:
            out[:, t] += b
    return out


def _lin(x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach().double()
    b = None if getattr(mod, "bias", None) is None else mod.bias.detach().double()
    return F.linear(x, w, b)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return y if weight is None else y * weight


class _Frozen:
    """One mixer layer with its data-dependent quantities frozen; `run(v, biases)` is linear in v."""

    def __init__(
        self, run: Callable[[torch.Tensor, bool], torch.Tensor], values: torch.Tensor, heads: int | None = None
    ) -> None:
        self.run = run  # (values [b, n, C], biases on?) -> mixer output [b, n, d]
        self.values = values
        self.heads = heads  # the value channels are `heads` contiguous groups (head-major), or None


def _mamba1(m: nn.Module, h: torch.Tensor) -> _Frozen:
    """Mamba: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t h_t + D u_t, out = W(silu(z) ⊙ y)."""
    ch = m.intermediate_size
    proj = _lin(h, m.in_proj)
    x, z = proj[..., :ch], proj[..., ch:]
    w = m.conv1d.weight.detach().double()[:, 0]
    cb = None if m.conv1d.bias is None else m.conv1d.bias.detach().double()
    p = _conv_seq(x, w, cb)
    u = F.silu(p)
    r, N = m.time_step_rank, m.ssm_state_size
    ts, B, C = torch.split(_lin(u, m.x_proj), [r, N, N], -1)
    if hasattr(m, "dt_layernorm"):  # Falcon-Mamba (weightless) and Jamba (weighted) RMS norms
        def norm(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
            eps = hf_eps(mod)
            weight = None if "Weightless" in type(mod).__name__ else getattr(mod, "weight", None)
            return _rms(t, None if weight is None else weight.detach().double(), eps)

        ts, B, C = norm(m.dt_layernorm, ts), norm(m.b_layernorm, B), norm(m.c_layernorm, C)
    dt = F.softplus(_lin(ts, m.dt_proj))  # [b, n, C]
    A = -torch.exp(m.A_log.detach().double())  # [C, N]
    D = m.D.detach().double()
    gate_src = torch.sigmoid(p)
    gate_out = F.silu(z)

    def run(v: torch.Tensor, biases: bool) -> torch.Tensor:
        pv = _conv_seq(v, w, cb if biases else None)
        uv = gate_src * pv
        state = torch.zeros(v.shape[0], ch, N, dtype=torch.float64)
        ys = []
        for t in range(v.shape[1]):
            state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * B[:, t, None, :] * uv[:, t, :, None]
            ys.append((state * C[:, t, None, :]).sum(-1) + D * uv[:, t])
        y = torch.stack(ys, 1) * gate_out
        out = y @ m.out_proj.weight.detach().double().T
        if biases and m.out_proj.bias is not None:
            out = out + m.out_proj.bias.detach().double()
        return out

    return _Frozen(run, x)


def _mamba2(m: nn.Module, h: torch.Tensor) -> _Frozen:
    """Mamba-2 (SSD, scalar A per head): the same recurrence per head over its P channels,
    then the gated RMSNorm `w ⊙ g / rms_group(g)`, g = y ⊙ silu(z), with its scale frozen."""
    ch, G, N, H, P = m.intermediate_size, m.n_groups, m.ssm_state_size, m.num_heads, m.head_dim
    # Falcon-H1's µP multipliers: on the mixer's input and on each part of the projection.
    proj = _lin(h * getattr(m, "ssm_in_multiplier", 1.0), m.in_proj)
    if getattr(m, "mup_vector", None) is not None:
        proj = proj * m.mup_vector.detach().double().reshape(-1)
    conv_dim = ch + 2 * G * N
    z, xbc, dt_raw = torch.split(proj, [ch, conv_dim, H], -1)
    w = m.conv1d.weight.detach().double()[:, 0]
    cb = None if m.conv1d.bias is None else m.conv1d.bias.detach().double()
    p = _conv_seq(xbc, w, cb)
    u = F.silu(p)
    bsz, n = h.shape[:2]
    x = xbc[..., :ch]
    B = u[..., ch : ch + G * N].reshape(bsz, n, G, N).repeat_interleave(H // G, 2)  # [b, n, H, N]
    C = u[..., ch + G * N :].reshape(bsz, n, G, N).repeat_interleave(H // G, 2)
    dt = F.softplus(dt_raw + m.dt_bias.detach().double())
    lo, hi = m.time_step_limit
    dt = dt.clamp(lo, hi)  # [b, n, H]
    A = -torch.exp(m.A_log.detach().double())  # [H]
    D = m.D.detach().double()
    gate_src = torch.sigmoid(p[..., :ch])
    wc, cbc = w[:ch], None if cb is None else cb[:ch]

    def ssm(v: torch.Tensor, biases: bool) -> torch.Tensor:
        uv = (gate_src * _conv_seq(v, wc, cbc if biases else None)).reshape(bsz, n, H, P)
        state = torch.zeros(bsz, H, P, N, dtype=torch.float64)
        ys = []
        for t in range(n):
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]
            state = decay * state + (dt[:, t, :, None, None] * uv[:, t, :, :, None]) * B[:, t, :, None, :]
            ys.append((state * C[:, t, :, None, :]).sum(-1) + D[:, None] * uv[:, t])
        return torch.stack(ys, 1).reshape(bsz, n, ch)

    # The norm's scale from the real run (all values and biases on).
    g_real = ssm(x, True) * F.silu(z)
    scale = F.silu(z)
    if getattr(m, "mamba_rms_norm", True):
        size = m.norm.group_size
        var = g_real.reshape(bsz, n, ch // size, size).pow(2).mean(-1, keepdim=True)
        inv = (var + hf_eps(m.norm)).rsqrt().expand(-1, -1, -1, size).reshape(bsz, n, ch)
        scale = m.norm.weight.detach().double() * inv * F.silu(z)

    def run(v: torch.Tensor, biases: bool) -> torch.Tensor:
        out = (ssm(v, biases) * scale) @ m.out_proj.weight.detach().double().T
        if biases and m.out_proj.bias is not None:
            out = out + m.out_proj.bias.detach().double()
        return out

    return _Frozen(run, x, H)


def _short_conv(m: nn.Module, h: torch.Tensor) -> _Frozen:
    """LFM2: [B | C | x] = in_proj(h); out = W(C ⊙ conv(B ⊙ x)); the value of source s is B_s ⊙ x_s."""
    ch = m.conv.weight.shape[0]
    B, C, x = _lin(h, m.in_proj).split(ch, -1)
    w = m.conv.weight.detach().double()[:, 0]
    cb = None if m.conv.bias is None else m.conv.bias.detach().double()

    def run(v: torch.Tensor, biases: bool) -> torch.Tensor:
        out = (C * _conv_seq(v, w, cb if biases else None)) @ m.out_proj.weight.detach().double().T
        if biases and m.out_proj.bias is not None:
            out = out + m.out_proj.bias.detach().double()
        return out

    return _Frozen(run, B * x)


def _deltanet(m: nn.Module, h: torch.Tensor) -> _Frozen:
    """Gated DeltaNet (Yang et al. 2024) as in Qwen3-Next: per value head, state S [d_k, d_v],
    S ← exp(g_t) S; S ← S + k_t (β_t (v_t − Sᵀk_t))ᵀ; o_t = Sᵀ q_t; out = W(w ⊙ o/rms(o) ⊙ silu(z))."""
    bsz, n, _ = h.shape
    Hv, Hk, dk, dv = m.num_v_heads, m.num_k_heads, m.head_k_dim, m.head_v_dim
    if hasattr(m, "in_proj_qkvz"):
        parts = m.fix_query_key_value_ordering(_lin(h, m.in_proj_qkvz), _lin(h, m.in_proj_ba))
    elif hasattr(m, "in_proj_qkv"):
        q, k, v = _lin(h, m.in_proj_qkv).split([Hk * dk, Hk * dk, Hv * dv], -1)
        parts = (q, k, v, _lin(h, m.in_proj_z), _lin(h, m.in_proj_b), _lin(h, m.in_proj_a))
    else:  # OLMo-hybrid
        parts = tuple(_lin(h, getattr(m, f"{c}_proj")) for c in "qkvgba")
    norm = m.norm if hasattr(m, "norm") else m.o_norm
    out_w = (m.out_proj if hasattr(m, "out_proj") else m.o_proj).weight.detach().double()
    q0, k0, v0, z, b, a = (t.reshape(bsz, n, -1) for t in parts)
    w = m.conv1d.weight.detach().double()[:, 0]
    p = _conv_seq(torch.cat((q0, k0, v0), -1), w, None)
    u = F.silu(p)
    kd = Hk * dk
    q = u[..., :kd].reshape(bsz, n, Hk, dk).repeat_interleave(Hv // Hk, 2)
    k = u[..., kd : 2 * kd].reshape(bsz, n, Hk, dk).repeat_interleave(Hv // Hk, 2)
    q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() / dk**0.5
    k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    beta = torch.sigmoid(b) * (2.0 if getattr(m, "allow_neg_eigval", False) else 1.0)
    g = -m.A_log.detach().double().exp() * F.softplus(a + m.dt_bias.detach().double())
    gate_src = torch.sigmoid(p[..., 2 * kd :])

    def recur(v: torch.Tensor) -> torch.Tensor:
        uv = (gate_src * _conv_seq(v, w[2 * kd :], None)).reshape(bsz, n, Hv, dv)
        S = torch.zeros(bsz, Hv, dk, dv, dtype=torch.float64)
        outs = []
        for t in range(n):
            S = S * g[:, t].exp()[..., None, None]
            mem = (S * k[:, t, :, :, None]).sum(-2)  # Sᵀk, [b, H, dv]
            S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * (uv[:, t] - mem))[:, :, None, :]
            outs.append((S * q[:, t, :, :, None]).sum(-2))
        return torch.stack(outs, 1)  # [b, n, H, dv]

    o_real = recur(v0)
    inv = (o_real.pow(2).mean(-1, keepdim=True) + hf_eps(norm)).rsqrt()
    zz = z.reshape(bsz, n, Hv, dv)
    scale = inv * norm.weight.detach().double() * F.silu(zz)

    def run(v: torch.Tensor, biases: bool) -> torch.Tensor:
        return (recur(v) * scale).reshape(bsz, n, Hv * dv) @ out_w.T

    return _Frozen(run, v0, Hv)


def _rglru(m: nn.Module, h: torch.Tensor) -> _Frozen:
    """RecurrentGemma's recurrent block (De et al. 2024, Griffin), step by step:
    p = conv(x) + b, x = linear_x(h); per block-diagonal head, i_t = σ(p_t W_i + b_i), ρ_t = σ(p_t W_a + b_a),
    a_t = exp(−8 ρ_t softplus(Λ)); s_t = a_t s_{t−1} + √(1 − a_t²) i_t p_t, restarted at t = 0 (a = 0, factor 1);
    out = linear_out(gelu_tanh(linear_y(h)) ⊙ s)."""
    lru = m.rg_lru
    bsz, n, _ = h.shape
    heads, bw = lru.num_attention_heads, lru.block_width
    x = _lin(h, m.linear_x)
    y = F.gelu(_lin(h, m.linear_y), approximate="tanh")
    w = m.conv_1d.weight.detach().double()[:, 0]
    cb = m.conv_1d.bias.detach().double()
    p = _conv_seq(x, w, cb)
    gi, ga = torch.zeros_like(p), torch.zeros_like(p)
    for hd in range(heads):
        blk = p[..., hd * bw : (hd + 1) * bw]
        gi[..., hd * bw : (hd + 1) * bw] = torch.sigmoid(
            blk @ lru.input_gate_weight[hd].detach().double() + lru.input_gate_bias[hd].detach().double()
        )
        ga[..., hd * bw : (hd + 1) * bw] = torch.sigmoid(
            blk @ lru.recurrent_gate_weight[hd].detach().double() + lru.recurrent_gate_bias[hd].detach().double()
        )
    a = torch.exp(-8.0 * ga * F.softplus(lru.recurrent_param.detach().double()))
    factor = torch.sqrt(1 - a * a)
    a[:, 0] = 0.0  # reset at position 0
    factor[:, 0] = 1.0

    def run(v: torch.Tensor, biases: bool) -> torch.Tensor:
        u = _conv_seq(v, w, cb if biases else None) * gi * factor
        state = torch.zeros(bsz, u.shape[-1], dtype=torch.float64)
        outs = []
        for t in range(n):
            state = a[:, t] * state + u[:, t]
            outs.append(state * y[:, t])
        out = torch.stack(outs, 1) @ m.linear_out.weight.detach().double().T
        return out + m.linear_out.bias.detach().double() if biases else out

    return _Frozen(run, x)


_BUILDERS: dict[tuple[str, ...], Callable[[nn.Module, torch.Tensor], _Frozen]] = {
    RGLRU: _rglru,
    MAMBA1: _mamba1,
    MAMBA2: _mamba2,
    SHORTCONV: _short_conv,
    DELTANET: _deltanet,
}


def _frozen(m: nn.Module, h: torch.Tensor) -> _Frozen:
    for names, build in _BUILDERS.items():
        if type(m).__name__ in names:
            return build(m, h)
    raise AssertionError(f"reference: no reference for mixer {type(m).__name__}")


def _mixers(model: nn.Module) -> dict[int, tuple[nn.Module, nn.Module]]:
    """{layer index: (decoder layer, mixer module)} for the layers whose mixer the reference knows."""
    backbone = getattr(model, "backbone", None) or getattr(model, "model", model)
    layers = backbone.layers
    out = {}
    for idx, layer in enumerate(layers):
        for child in ("mixer", "mamba", "conv", "linear_attn", "temporal_block"):
            mod = getattr(layer, child, None)
            if mod is not None and type(mod).__name__ in KNOWN:
                out[idx] = (layer, mod)
    return out


def _attention_parts(attn: nn.Module, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Σ_h A[h,i,j]·(v_j,h W_O[h]) `[b, i, j, d]` from the attention module's weights (GQA repeated)."""
    bsz, n, _ = h.shape
    H, d_head = probs.shape[1], attn.head_dim
    v = _lin(h, attn.v_proj).reshape(bsz, n, -1, d_head)
    v = v.repeat_interleave(H // v.shape[2], 2)  # [b, j, H, e]
    w_o = attn.o_proj.weight.detach().double().T.reshape(H, d_head, -1)
    vo = torch.einsum("bjhe,hed->bhjd", v, w_o)
    return torch.einsum("bhij,bhjd->bijd", probs.double(), vo)


@torch.no_grad()
def reference_mixer_layers(hf_model: nn.Module, input_ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Dense float64 ALTI of every linear-recurrent mixer layer of a Hugging Face model.

    Returns `{layer: {...}}` with `T` `[b, i, j, d]` (T_i(x_j), the receiver's own residual
    x_i included on the diagonal), `bias` `[b, i, d]`, `y` the real `x + mixer(norm(x))`
    `[b, i, d]`, the row-normalised contributions `l1`, `l2`, `koba` `[b, i, j]`, `l1_mass`
    `[b, i]` (Σ_j of the raw L1 contributions over ‖y_i‖₁: how well float32 can resolve the row), and
    `attention` (a bool tensor: the layer is attention whose pattern the bridge does not cache),
    and for mixers with heads (Mamba-2, gated DeltaNet; not Falcon-H1's parallel block) `parts`
    `[b, H, i, j, d]` and the layer input `x`: each head's share T^h_i(x_j) of T (residual
    excluded), from runs with only token j's value and only head h's channels switched on.
    """
    model = copy.deepcopy(hf_model).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    mixers = _mixers(model)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for idx, (layer, mod) in mixers.items():

        def layer_pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            hs = args[0] if args else kwargs.get("hidden_states", kwargs.get("activations"))
            seen.setdefault(idx, {})["x"] = hs.detach().double().clone()

        def mixer_pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
            hs = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(idx, {})["h"] = hs.detach().double().clone()

        def mixer_post(_m: nn.Module, _a: tuple, output: Any, idx: int = idx) -> None:
            out = output[0] if isinstance(output, tuple) else output
            seen.setdefault(idx, {})["out"] = out.detach().double().clone()
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                seen[idx]["mixer_probs"] = output[1].detach().double().clone()

        if getattr(layer, "self_attn", None) is not None and getattr(layer, "mamba", None) is not None:  # Falcon-H1

            def attn_pre(_m: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> None:
                hs = args[0] if args else kwargs["hidden_states"]
                seen.setdefault(idx, {})["attn_h"] = hs.detach().double().clone()

            def attn_post(_m: nn.Module, _a: tuple, output: Any, idx: int = idx) -> None:
                seen.setdefault(idx, {})["attn_out"] = output[0].detach().double().clone()
                seen[idx]["probs"] = output[1].detach().double().clone()

            handles.append(layer.self_attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(attn_post))
        handles.append(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
        handles.append(mod.register_forward_pre_hook(mixer_pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(mixer_post))
    run_hooked(model, input_ids, handles)

    result = {}
    for idx, (layer, mod) in mixers.items():
        x, h, real = seen[idx]["x"], seen[idx]["h"], seen[idx]["out"]
        bsz, n, d = x.shape
        name = type(mod).__name__
        if name in TOKEN_WISE:  # y_i depends on x_i alone: all of it is the receiver's own term
            T = torch.diag_embed(real.transpose(1, 2)).permute(0, 2, 3, 1)  # [b, i, j, d], diagonal
            bias = torch.zeros_like(real)
        elif name in PLAIN_ATTENTION:
            T = _attention_parts(mod, h, seen[idx]["mixer_probs"])
            o_bias = mod.o_proj.bias
            bias = torch.zeros_like(real) if o_bias is None else o_bias.detach().double().expand_as(real)
        else:
            frozen = _frozen(mod, h)
            v = frozen.values
            parts = []
            for j in range(n):
                only_j = torch.zeros_like(v)
                only_j[:, j] = v[:, j]
                parts.append(frozen.run(only_j, False))
            T = torch.stack(parts, 2)  # [b, i, j, d]
            bias = frozen.run(torch.zeros_like(v), True)
            if frozen.heads is not None and "probs" not in seen[idx]:
                # T^h_i(x_j): only token j's value, and of it only head h's channels, switched on.
                per = v.shape[-1] // frozen.heads
                by_head = []
                for hd in range(frozen.heads):
                    cols = []
                    for j in range(n):
                        only = torch.zeros_like(v)
                        only[:, j, hd * per : (hd + 1) * per] = v[:, j, hd * per : (hd + 1) * per]
                        cols.append(frozen.run(only, False))
                    by_head.append(torch.stack(cols, 2))
                head_parts = torch.stack(by_head, 1)  # [b, H, i, j, d]
                err = float((head_parts.sum(1) - T).abs().max())
                if err > 1e-9 * max(1.0, float(T.abs().max())):
                    raise AssertionError(f"reference: layer {idx}: the heads' parts do not sum to T ({err:.3g})")
                seen[idx]["head_parts"] = head_parts
        out = T.sum(2) + bias
        err = float((out - real).abs().max())
        if err > 1e-5 * max(1.0, float(real.abs().max())):
            what = f"layer {idx} ({type(mod).__name__})"
            raise AssertionError(f"reference: {what} does not reproduce the mixer output: {err:.3g}")
        m = float(getattr(layer, "residual_multiplier", 1.0))  # Granite: y = x + m·mixer(norm(x))
        T, bias, real = m * T, m * bias, m * real
        y = x + real
        if "probs" in seen[idx]:  # y = x + m_s·mixer + m_a·attention (Falcon-H1)
            m_s, m_a = layer.ssm_out_multiplier, layer.attn_out_multiplier
            attn_parts = _attention_parts(layer.self_attn, seen[idx]["attn_h"], seen[idx]["probs"])
            attn_real = seen[idx]["attn_out"]
            o_bias = layer.self_attn.o_proj.bias
            attn_bias = 0.0 if o_bias is None else o_bias.detach().double()
            err = float((attn_parts.sum(2) + attn_bias - attn_real).abs().max())
            if err > 1e-5 * max(1.0, float(attn_real.abs().max())):
                raise AssertionError(f"reference: layer {idx} attention does not reproduce its output: {err:.3g}")
            T = m_s * T + m_a * attn_parts
            bias = m_s * bias + m_a * attn_bias
            y = x + m_s * real + m_a * attn_real
        T = T + torch.eye(n, dtype=torch.float64)[None, :, :, None] * x[:, None, :, :]
        diff = (y[:, :, None] - T)
        c = {
            "l1": (y.abs().sum(-1)[..., None] - diff.abs().sum(-1)).clamp(min=0),
            "l2": (y.norm(dim=-1)[..., None] - diff.norm(dim=-1)).clamp(min=0),
            "koba": T.norm(dim=-1),
        }
        rows = {k: val / val.sum(-1, keepdim=True).clamp(min=1e-300) for k, val in c.items()}
        # How well conditioned each row is: Σ_j c_ij relative to ‖y_i‖₁ (float32 resolves ≳ 1e-5).
        rows["l1_mass"] = c["l1"].sum(-1) / y.abs().sum(-1)
        result[idx] = {"T": T, "bias": bias, "y": y, **rows, "attention": torch.tensor(name in PLAIN_ATTENTION)}
        if "head_parts" in seen[idx]:  # Mamba-2 and gated DeltaNet: T^h_i(x_j) `[b, H, i, j, d]`, no residual
            result[idx]["parts"] = m * seen[idx]["head_parts"]
            result[idx]["x"] = x
    return result


def _layer_norm(x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / (var + hf_eps(mod)).sqrt() * mod.weight.detach().double() + mod.bias.detach().double()


def _token_shift(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """`μ ⊙ x_t + (1 − μ) ⊙ x_{t−1}` with `x_{−1} = 0`."""
    prev = torch.zeros_like(x)
    prev[:, 1:] = x[:, :-1]
    return x * mu + prev * (1 - mu)


def _rwkv_time_mix(att: nn.Module, h: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """RWKV-4 time mixing with k and r frozen; `run(h')` is linear in the input h' of the value branch.

    `wkv_t = (Σ_{i<t} e^{−(t−1−i)w + k_i} v_i + e^{u+k_t} v_t) / (Σ_{i<t} e^{−(t−1−i)w + k_i} + e^{u+k_t})`,
    `w = exp(time_decay)`, computed as a recurrence over t with numerator and denominator states
    (the denominator from the real k only); out = W_o(σ(r) ⊙ wkv).
    """
    mu = lambda p: p.detach().double().reshape(-1)  # noqa: E731
    k = _token_shift(h, mu(att.time_mix_key)) @ att.key.weight.detach().double().T
    r = torch.sigmoid(_token_shift(h, mu(att.time_mix_receptance)) @ att.receptance.weight.detach().double().T)
    w, u = att.time_decay.detach().double().exp(), att.time_first.detach().double()
    bsz, n, C = k.shape

    def run(hv: torch.Tensor) -> torch.Tensor:
        v = _token_shift(hv, mu(att.time_mix_value)) @ att.value.weight.detach().double().T
        num = torch.zeros(bsz, C, dtype=torch.float64)
        den = torch.zeros(bsz, C, dtype=torch.float64)
        outs = []
        for t in range(n):
            cur = torch.exp(u + k[:, t])
            outs.append((num + cur * v[:, t]) / (den + cur))
            num = torch.exp(-w) * num + torch.exp(k[:, t]) * v[:, t]
            den = torch.exp(-w) * den + torch.exp(k[:, t])
        return (r * torch.stack(outs, 1)) @ att.output.weight.detach().double().T

    return run, r


def _rwkv_channel_mix(ffn: nn.Module, g: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """RWKV-4 channel mixing `σ(r) ⊙ W_v relu(z)²`, z = W_k shift(g), with relu(z)² = relu(z)·z and relu(z),
    σ(r) frozen at the real run; `run(g')` is linear in g'."""
    mu = lambda p: p.detach().double().reshape(-1)  # noqa: E731
    W_k = ffn.key.weight.detach().double()
    z = _token_shift(g, mu(ffn.time_mix_key)) @ W_k.T
    r = torch.sigmoid(_token_shift(g, mu(ffn.time_mix_receptance)) @ ffn.receptance.weight.detach().double().T)

    def run(gv: torch.Tensor) -> torch.Tensor:
        zv = _token_shift(gv, mu(ffn.time_mix_key)) @ W_k.T
        return r * ((F.relu(z) * zv) @ ffn.value.weight.detach().double().T)

    return run


@torch.no_grad()
def reference_rwkv_steps(hf_model: nn.Module, input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Dense float64 ALTI of every token-mixing step of an RWKV-4 model: `[time mix 0, channel mix 0, ...]`.

    Each step is `y = x + f(norm(x))` with f linear in norm(x) once its gates are frozen; T_i(x_j) is the
    output with only token j's normalised input switched on (every tap that reads it: its own position and,
    through the token shift, the next one). Entries as in `reference_mixer_layers` (T, y, l1, l2, koba).
    """
    model = copy.deepcopy(hf_model).eval()
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for idx, block in enumerate(model.rwkv.blocks):
        for name, mod in (("ln1", block.ln1), ("ln2", block.ln2)):

            def pre(_m: nn.Module, args: tuple, key: str = f"{idx}.{name}") -> None:
                seen[key] = args[0].detach().double().clone()

            handles.append(mod.register_forward_pre_hook(pre))
        for name, mod in (("att", block.attention), ("ffn", block.feed_forward)):

            def post(_m: nn.Module, _a: tuple, out: Any, key: str = f"{idx}.{name}") -> None:
                seen[key] = out[0].detach().double().clone()

            handles.append(mod.register_forward_hook(post))
    run_hooked(model, input_ids, handles)
    steps = []
    for idx, block in enumerate(model.rwkv.blocks):
        for norm, key, sub in (("ln1", "att", block.attention), ("ln2", "ffn", block.feed_forward)):
            x = seen[f"{idx}.{norm}"]
            hn = _layer_norm(x, getattr(block, norm))
            run = _rwkv_time_mix(sub, hn)[0] if key == "att" else _rwkv_channel_mix(sub, hn)
            bsz, n, _ = x.shape
            parts = []
            for j in range(n):
                only = torch.zeros_like(hn)
                only[:, j] = hn[:, j]
                parts.append(run(only))
            T = torch.stack(parts, 2)  # [b, i, j, d]
            real = seen[f"{idx}.{key}"]
            err = float((T.sum(2) - real).abs().max())
            if err > 1e-5 * max(1.0, float(real.abs().max())):
                raise AssertionError(f"reference: RWKV layer {idx} {key} does not reproduce its output: {err:.3g}")
            y = x + real
            T = T + torch.eye(n, dtype=torch.float64)[None, :, :, None] * x[:, None, :, :]
            diff = y[:, :, None] - T
            c = {
                "l1": (y.abs().sum(-1)[..., None] - diff.abs().sum(-1)).clamp(min=0),
                "l2": (y.norm(dim=-1)[..., None] - diff.norm(dim=-1)).clamp(min=0),
                "koba": T.norm(dim=-1),
            }
            rows = {k: val / val.sum(-1, keepdim=True).clamp(min=1e-300) for k, val in c.items()}
            steps.append({"T": T, "y": y, **rows})
    return steps
