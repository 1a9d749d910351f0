"""Independent dense float64 ALTI / ALTI+ for TransformerLens 3.x models, from the spec.

Written from docs/spec.md §1a-§1f, §2, §3, §4; it imports nothing
from lens_alti. Residual streams and attention patterns come from a float64 copy of the model's
own forward pass; the value vectors are recomputed from the weights (the norm by hand, the
stored ``_W_V``/``_b_V`` per key-value head, expanded for grouped-query attention) and checked
against ``hook_v``; every reconstruction ``Σ_j T_i(x_j) + bias_i`` is checked against the real
activation. Every transformed vector and per-head part is materialised: tiny models only.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

_RTOL = 1e-9


def _check_close(what: str, got: Tensor, want: Tensor) -> None:
    err = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not err <= _RTOL * scale:
        raise AssertionError(f"reference: {what} mismatch, max|Δ| = {err:.3e}")


def _float64(model: Any) -> Any:
    """A float64 copy (TransformerLens casts inside its norms to cfg.dtype, so change that too)."""
    m = copy.deepcopy(model)
    m.cfg.dtype = torch.float64
    return m.to(torch.float64).eval()


def _normalise_rows(c: Tensor) -> Tensor:
    s = c.sum(-1, keepdim=True)
    return torch.where(s > 0, c / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(c))


def _rollout(c: Tensor) -> Tensor:
    out = [c[:, 0]]
    for layer in range(1, c.shape[1]):
        out.append(c[:, layer] @ out[-1])
    return torch.stack(out, dim=1)


def _norm(x: Tensor, kind: str | None, module: Any, eps: float) -> Tensor:
    """LayerNorm / RMSNorm by hand: (x − mean) or x, over sqrt(mean(·²) + eps), then weight and bias."""
    if kind is None:
        return x
    if kind.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    n = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if not kind.endswith("Pre"):
        n = n * module.w
        if kind.startswith("LN"):
            n = n + module.b
    return n


def _values(attn: Any, source: Tensor, n_heads: int, hook_v: Tensor) -> Tensor:
    """v = source @ W_V + b_V per key-value head, then one per query head; checked against hook_v."""
    W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V  # [n_kv, d, e]
    b_V = attn._b_V if hasattr(attn, "_b_V") else attn.b_V
    v = torch.einsum("bkd,nde->bkne", source, W_V) + b_V
    _check_close("value vectors vs hook_v", v, hook_v)
    return v.repeat_interleave(n_heads // v.shape[2], dim=2)


def _block(
    A: Tensor, v: Tensor, W_O: Tensor, b_O: Tensor, resid: Tensor, target: Tensor, *,
    last: bool = False, post_ln: tuple[Tensor, Tensor, float] | None = None,
) -> dict[str, Tensor]:
    """Dense transformed vectors of one block and every measure (docs/spec.md §1a-§1c, §2, §3)."""
    b, H, q, k = A.shape
    vo = torch.einsum("bkhe,hed->bhkd", v, W_O)
    parts = A[..., None] * vo[:, :, None]  # T^h_i(x_j): [b, H, q, k, d]
    res = resid
    bias = b_O.expand(b, q, -1)
    if post_ln is not None:  # y = LN(z), linearised at z (docs/spec.md §1b)
        w, beta, eps = post_ln
        z = parts.sum((1, 3)) + resid + b_O
        sigma = (z.var(-1, unbiased=False) + eps).sqrt()  # [b, q]

        def lin(u: Tensor, s: Tensor) -> Tensor:
            return w * (u - u.mean(-1, keepdim=True)) / s

        parts = lin(parts, sigma[:, None, :, None, None])
        res = lin(resid, sigma[..., None])
        bias = lin(bias, sigma[..., None]) + beta
    t = parts.sum(1)  # [b, q, k, d]
    if last:
        t = torch.cat([t, res[:, :, None]], dim=2)
    else:
        t = t + torch.eye(q, k, dtype=t.dtype)[None, :, :, None] * res[:, :, None, :]
    y = t.sum(2) + bias
    _check_close("reconstruction of the block output", y, target)

    y1 = y.abs().sum(-1)
    out = {
        "l1": _normalise_rows((y1[..., None] - (y[:, :, None] - t).abs().sum(-1)).clamp(min=0)),
        "l2": _normalise_rows((y.norm(dim=-1)[..., None] - (y[:, :, None] - t).norm(dim=-1)).clamp(min=0)),
        "koba": _normalise_rows(t.norm(dim=-1)),
        "attention": _normalise_rows(A.mean(1)),
    }
    c_heads = (y1[:, None, :, None] - (y[:, None, :, None] - parts).abs().sum(-1)).clamp(min=0)  # [b, H, q, k]
    c_res = (y1 - (y - res).abs().sum(-1)).clamp(min=0)
    total = c_heads.sum((1, 3)) + c_res
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out["heads"] = torch.where(total[:, None, :, None] > 0, c_heads / safe[:, None, :, None], 0.0)
    out["heads_residual"] = torch.where(total > 0, c_res / safe, 0.0)
    return out


def _stack(per_layer: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    acc: defaultdict[str, list[Tensor]] = defaultdict(list)
    for d in per_layer:
        for key, value in d.items():
            acc[key].append(value)
    return {key: torch.stack(values, dim=1) for key, values in acc.items()}


@torch.no_grad()
def reference_hooked(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    """Dense float64 ALTI of a HookedTransformer (pre-norm; sequential, parallel or attention-only) or a
    HookedEncoder (post-LN BERT). Keys: l1, l2, koba, attention, rollout ``[b, L, q, k]``, heads
    ``[b, L, H, q, k]``, heads_residual ``[b, L, q]``.
    """
    m = _float64(model)
    _, cache = m.run_with_cache(tokens)
    cfg = m.cfg
    bert = type(model).__name__ == "HookedEncoder"
    layers = []
    for layer, block in enumerate(m.blocks):
        p = f"blocks.{layer}"
        x = cache[f"{p}.hook_resid_pre"]
        source = x if bert else _norm(x, cfg.normalization_type, block.ln1, cfg.eps)
        v = _values(block.attn, source, cfg.n_heads, cache[f"{p}.attn.hook_v"])
        post_ln = None
        if bert:
            target = cache[f"{p}.hook_resid_post"] - cache[f"{p}.hook_mlp_out"]  # = LN1(x + attn_out)
            post_ln = (block.ln1.w, block.ln1.b, cfg.eps)
        elif cfg.parallel_attn_mlp:
            target = cache[f"{p}.hook_resid_post"] - cache[f"{p}.hook_mlp_out"]
        elif cfg.attn_only:
            target = cache[f"{p}.hook_resid_post"]
        else:
            target = cache[f"{p}.hook_resid_mid"]
        A = cache[f"{p}.attn.hook_pattern"]
        layers.append(_block(A, v, block.attn.W_O, block.attn.b_O, x, target, post_ln=post_ln))
    out = _stack(layers)
    out["rollout"] = _rollout(out["l1"])
    return out


def _alti_plus_total(enc_rollout: Tensor, cross: Tensor, dec_self: Tensor) -> Tensor:
    """docs/spec.md §4 steps 1-5: ``[b, L, T, S+T]``."""
    S = enc_rollout.shape[-1]
    totals = []
    for layer in range(cross.shape[1]):
        cx, cs = cross[:, layer], dec_self[:, layer]
        cs_scaled = cs * cx[..., S:S + 1]
        ced = cx[..., :S] @ enc_rollout
        if not totals:
            acc = torch.cat([ced, cs_scaled], dim=-1)
        else:
            prev = totals[-1]
            acc = torch.cat([ced + cs_scaled @ prev[..., :S], cs_scaled @ prev[..., S:]], dim=-1)
        totals.append(acc / acc.sum(-1, keepdim=True))
    return torch.stack(totals, dim=1)


@torch.no_grad()
def reference_t5(model: Any, src: Tensor, tgt: Tensor) -> dict[str, Tensor]:
    """Dense float64 ALTI+ of a HookedEncoderDecoder (T5): encoder_*, decoder_self_*, cross_* and total."""
    m = _float64(model)
    _, cache = m.run_with_cache(src, decoder_input=tgt)
    cfg = m.cfg
    out: dict[str, Tensor] = {}
    enc = []
    for layer, block in enumerate(m.encoder):
        p = f"encoder.{layer}"
        x = cache[f"{p}.hook_resid_pre"]
        v = _values(block.attn, _norm(x, "RMS", block.ln1, cfg.eps), cfg.n_heads, cache[f"{p}.attn.hook_v"])
        A = cache[f"{p}.attn.hook_pattern"]
        enc.append(_block(A, v, block.attn.W_O, block.attn.b_O, x, cache[f"{p}.hook_resid_mid"]))
    encoded = _norm(cache[f"encoder.{len(m.encoder) - 1}.hook_resid_post"], "RMS", m.encoder_final_ln, cfg.eps)
    dec_self, cross = [], []
    for layer, block in enumerate(m.decoder):
        p = f"decoder.{layer}"
        x = cache[f"{p}.hook_resid_pre"]
        v = _values(block.attn, _norm(x, "RMS", block.ln1, cfg.eps), cfg.n_heads, cache[f"{p}.attn.hook_v"])
        A = cache[f"{p}.attn.hook_pattern"]
        dec_self.append(_block(A, v, block.attn.W_O, block.attn.b_O, x, cache[f"{p}.hook_resid_mid"]))
        mid = cache[f"{p}.hook_resid_mid"]
        v = _values(block.cross_attn, encoded, cfg.n_heads, cache[f"{p}.cross_attn.hook_v"])
        A = cache[f"{p}.cross_attn.hook_pattern"]
        target = cache[f"{p}.hook_resid_mid_cross"]
        cross.append(_block(A, v, block.cross_attn.W_O, block.cross_attn.b_O, mid, target, last=True))
    for prefix, per_layer in (("encoder", enc), ("decoder_self", dec_self), ("cross", cross)):
        for key, value in _stack(per_layer).items():
            out[f"{prefix}_{key}"] = value
    out["encoder_rollout"] = _rollout(out["encoder_l1"])
    out["total"] = _alti_plus_total(out["encoder_rollout"][:, -1], out["cross_l1"], out["decoder_self_l1"])
    return out
