"""Independent dense float64 reference of ALTI (encoders) and ALTI+ (encoder-decoders) for HF models.

Written straight from docs/spec.md §1a-§1d, §2, §3, §4 and used by the
tests as ground truth. Like ``tests/support/reference.py`` it imports neither ``lens_alti`` nor
``transformer_lens``: weights are read from the Hugging Face modules, activations are captured
with forward hooks, and every reconstruction is checked against the real activation.

Only meant for tiny models (d_model <= 64, a few layers, short sequences): every transformed
vector ``T_i(x_j)`` and every per-head part is materialised densely.

Supported (``config.model_type``):

- ``bert`` (``BertForMaskedLM`` / ``BertModel``): post-LN encoder, docs/spec.md §1b.
- ``t5`` (``T5ForConditionalGeneration`` / ``T5Model``): pre-RMSNorm without centring or biases
  (docs/spec.md §1a/§1d); the encoder's ``final_layer_norm`` output is what cross-attention reads.
- ``marian``, ``bart``: post-LN encoder and decoder (docs/spec.md §1b, and §1c with ``L_i`` on every term).
- ``m2m_100``, ``mbart``: pre-LN encoder and decoder with final encoder/decoder layer norms.
- ``switch_transformers``: T5's attention layout (its sparse MLPs are not read).
- ``longt5`` (``encoder_attention_type="local"``): T5's layout; the encoder's local attention is
  recomputed densely from the weights with the band ``|i − j| <= local_radius``.
- ``t5gemma``: pre-RMSNorm blocks (gain ``1 + w``) whose attention output is normalised again
  before joining the residual, ``y = x + (1 + w') ⊙ a_i / rms(a_i)`` (docs/spec.md §1d), grouped-query
  heads, and a final encoder norm that cross-attention reads.
- ``led``: BART's post-LN layout whose encoder self-attention is Longformer's sliding window:
  the attention is recomputed densely from the ``query``/``key`` weights with the band mask
  ``|i - j| <= attention_window / 2`` (HF's banded probabilities are not used), and the encoder's
  internal padding to a multiple of the window is cropped from every captured activation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests.support.reference import _normalise_rows, _rollout, float64_eager_copy, hf_eps, randomize_norms

__all__ = ["randomize_norms", "reference_encoder", "reference_seq2seq"]

# Relative tolerance of the internal reconstruction and norm checks (float64 throughout).
_RTOL = 1e-10
# T5LayerNorm computes its variance in float32 even in a float64 model: our exact float64 RMS
# formula can only match it to ~1e-7 relative. The reference uses the norm output the attention
# really saw and checks the formula against it with this looser tolerance.
_T5_RMS_RTOL = 1e-5
# Finite replacement for the additive "-inf"/finfo.min of attention masks; see _clamp_mask.
_MASK_FLOOR = -1e30

# LED's and LongT5's local encoder softmaxes are float32 (see _Block.rtol).
_LED_RTOL = 1e-5

_POST_LN = {"bert", "marian", "bart", "led"}
_PRE_LN = {"m2m_100", "mbart"}


# --------------------------------------------------------------------------------------------
# Small numerical helpers
# --------------------------------------------------------------------------------------------


def _check_close(what: str, layer: int, got: torch.Tensor, want: torch.Tensor, rtol: float = _RTOL) -> None:
    """Assert ``max|got - want| <= rtol · max(1, max|want|)``."""
    if got.shape != want.shape:
        raise AssertionError(f"reference: {what} shape {tuple(got.shape)} != {tuple(want.shape)} at layer {layer}")
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if not err <= rtol * scale:
        raise AssertionError(f"reference: {what} mismatch at layer {layer}: max|Δ|={err:.3e}")


def _rows(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the rows (dim 1 of ``[b, n, ...]``) whose position is not valid."""
    shape = valid.shape + (1,) * (t.dim() - 2)
    return torch.where(valid.view(shape), t, torch.zeros_like(t))


def _layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """``γ ⊙ (x − mean) / sqrt(var_biased + eps) + β`` written out (float64)."""
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(hf_eps(ln)).sqrt()
    out = (x - mu) / sigma * ln.weight
    return out if ln.bias is None else out + ln.bias


def _t5_rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """T5 RMS norm ``g ⊙ x / sqrt(mean(x²) + eps)``: no centring, no beta, eps inside the root."""
    return norm.weight * x / (x.pow(2).mean(-1, keepdim=True) + hf_eps(norm)).sqrt()


def _gemma_rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """T5Gemma RMS norm ``(1 + w) ⊙ x / sqrt(mean(x²) + eps)``."""
    return (1.0 + norm.weight) * x / (x.pow(2).mean(-1, keepdim=True) + hf_eps(norm)).sqrt()


def _l1(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sum(-1)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(-1).sqrt()


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


def _clamp_mask(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Clamp a floating additive attention mask (kwarg ``attention_mask`` or T5's ``mask``) to -1e30.

    Rows with at least one unmasked key stay bit-identical (``exp(-1e30 - m)`` is exactly 0);
    fully masked rows become uniform instead of possibly NaN (they are zeroed anyway). With the
    float64 softmax of these models no NaN was observed, but ``finfo.min + finfo.min`` = -inf
    would poison a row, so the guard is kept.
    """
    for key in ("attention_mask", "mask"):
        mask = kwargs.get(key)
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            kwargs = {**kwargs, key: mask.clamp(min=_MASK_FLOOR)}
    return kwargs


class _Recorder:
    """Captures the first input, the cross-attention key/value states and the first output of modules."""

    def __init__(self) -> None:
        self.inp: dict[str, torch.Tensor] = {}
        self.kv: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def add(self, name: str, module: nn.Module, clamp: bool = False) -> None:
        """Record ``module`` under ``name``; ``clamp`` also clamps its attention mask kwarg."""

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hs = args[0] if args else kwargs["hidden_states"]
            self.inp[name] = hs.detach().clone()
            for key in ("key_value_states", "encoder_hidden_states"):
                kv = kwargs.get(key)
                if isinstance(kv, torch.Tensor):
                    self.kv[name] = kv.detach().clone()
            return args, (_clamp_mask(kwargs) if clamp else kwargs)

        def post(_m: nn.Module, _args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.out[name] = out.detach().clone()

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------
# Model layout
# --------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """One attention block (self or cross) of one layer, with where to find its activations.

    ``kind`` is ``"pre"`` (``y = x + attn(norm(x))``, T5/M2M100/mBART) or ``"post"``
    (``y = LN(x + attn(x))``, BERT/Marian/BART). ``x_key`` records the residual entering the block,
    ``attn_key`` the attention module (its input is what queries/values saw), ``y_key`` where the
    real block output is (``("out"|"inp", name)``), ``norm_key`` the norm module.
    """

    kind: str
    norm: nn.Module
    v_proj: nn.Linear
    o_proj: nn.Linear
    n_heads: int
    d_head: int
    x_key: str
    attn_key: str
    norm_key: str
    y_key: tuple[str, str]
    rms: bool = False
    gemma: bool = False  # an RMSNorm with gain 1 + w (T5Gemma)
    post_norm: nn.Module | None = None  # a norm on the attention output only (T5Gemma, docs/spec.md §1d)
    n_kv: int = 0  # key/value heads (0: as many as query heads)
    # T5Gemma2's decoder: one softmax over [target prefix ; source] keys, the residual on the diagonal
    merged: bool = False
    # Tolerance of the checks against the real block output: LED's encoder takes its softmax in
    # float32 even in a float64 model, so its real output is only float32-exact.
    rtol: float = _RTOL


def _linear_params(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return m.weight, m.bias


def _register_bert(model: nn.Module, rec: _Recorder) -> list[_Block]:
    bert = getattr(model, "bert", model)
    cfg = model.config
    h = cfg.num_attention_heads
    dh = cfg.hidden_size // h
    blocks = []
    for idx, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        rec.add(f"enc{idx}.block", att)
        rec.add(f"enc{idx}.attn", att.self, clamp=True)
        rec.add(f"enc{idx}.norm", att.output.LayerNorm)
        blocks.append(
            _Block(
                "post",
                att.output.LayerNorm,
                att.self.value,
                att.output.dense,
                h,
                dh,
                f"enc{idx}.block",
                f"enc{idx}.attn",
                f"enc{idx}.norm",
                ("out", f"enc{idx}.block"),
            )
        )
    return blocks


def _register_t5(model: nn.Module, rec: _Recorder) -> tuple[list[_Block], list[_Block], list[_Block], nn.Module]:
    cfg = model.config
    h, dh = cfg.num_heads, cfg.d_kv
    enc, dec, cross = [], [], []
    for side, stack, out in (("enc", model.encoder, enc), ("dec", model.decoder, dec)):
        for idx, block in enumerate(stack.block):
            sa = block.layer[0]
            attn = getattr(sa, "SelfAttention", None) or sa.LocalSelfAttention  # LongT5: local encoder attention
            name = f"{side}{idx}"
            rec.add(f"{name}.block", sa)
            rec.add(f"{name}.attn", attn, clamp=True)
            rec.add(f"{name}.norm", sa.layer_norm)
            out.append(
                _Block(
                    "pre",
                    sa.layer_norm,
                    attn.v,
                    attn.o,
                    h,
                    dh,
                    f"{name}.block",
                    f"{name}.attn",
                    f"{name}.norm",
                    ("out", f"{name}.block"),
                    rms=True,
                    rtol=_LED_RTOL if attn is not getattr(sa, "SelfAttention", None) else _RTOL,  # float32 softmax
                )
            )
            if side == "dec":
                ca = block.layer[1]
                rec.add(f"x{idx}.block", ca)
                rec.add(f"x{idx}.attn", ca.EncDecAttention, clamp=True)
                rec.add(f"x{idx}.norm", ca.layer_norm)
                cross.append(
                    _Block(
                        "pre",
                        ca.layer_norm,
                        ca.EncDecAttention.v,
                        ca.EncDecAttention.o,
                        h,
                        dh,
                        f"x{idx}.block",
                        f"x{idx}.attn",
                        f"x{idx}.norm",
                        ("out", f"x{idx}.block"),
                        rms=True,
                    )
                )
    rec.add("enc.final_norm", model.encoder.final_layer_norm)
    return enc, dec, cross, model.encoder.final_layer_norm


def _register_bart_like(
    model: nn.Module, rec: _Recorder
) -> tuple[list[_Block], list[_Block], list[_Block], nn.Module | None]:
    cfg = model.config
    kind = "post" if cfg.model_type in _POST_LN else "pre"
    base = model.led if cfg.model_type == "led" else getattr(model, "model", model)
    enc, dec, cross = [], [], []
    for side, stack, out in (("enc", base.encoder, enc), ("dec", base.decoder, dec)):
        h = cfg.encoder_attention_heads if side == "enc" else cfg.decoder_attention_heads
        dh = cfg.d_model // h
        for idx, layer in enumerate(stack.layers):
            name = f"{side}{idx}"
            sa, sa_ln = layer.self_attn, layer.self_attn_layer_norm
            if cfg.model_type == "led" and side == "enc":  # Longformer: its own value/output names
                rec.add(f"{name}.attn", sa)
                rec.add(f"{name}.norm", sa_ln)
                v_proj, o_proj = sa.longformer_self_attn.value, sa.output
                enc.append(_Block(kind, sa_ln, v_proj, o_proj, h, dh, f"{name}.attn", f"{name}.attn", f"{name}.norm",
                                  ("out", f"{name}.norm"), rtol=_LED_RTOL))
                continue
            rec.add(f"{name}.attn", sa, clamp=True)
            rec.add(f"{name}.norm", sa_ln)
            if kind == "post":
                # x = input of self_attn; z = input of the LN; y = its output.
                x_key, y_key = f"{name}.attn", ("out", f"{name}.norm")
            else:
                # x = input of the pre-norm; y = input of the next norm in the layer.
                nxt = layer.final_layer_norm if side == "enc" else layer.encoder_attn_layer_norm
                rec.add(f"{name}.next", nxt)
                x_key, y_key = f"{name}.norm", ("inp", f"{name}.next")
            out.append(_Block(kind, sa_ln, sa.v_proj, sa.out_proj, h, dh, x_key, f"{name}.attn", f"{name}.norm", y_key))
            if side == "dec":
                ca, ca_ln = layer.encoder_attn, layer.encoder_attn_layer_norm
                xname = f"x{idx}"
                rec.add(f"{xname}.attn", ca, clamp=True)
                rec.add(f"{xname}.norm", ca_ln)
                if kind == "post":
                    x_key, y_key = f"{xname}.attn", ("out", f"{xname}.norm")
                else:
                    rec.add(f"{xname}.next", layer.final_layer_norm)
                    x_key, y_key = f"{xname}.norm", ("inp", f"{xname}.next")
                cross.append(
                    _Block(kind, ca_ln, ca.v_proj, ca.out_proj, h, dh, x_key, f"{xname}.attn", f"{xname}.norm", y_key)
                )
    final = getattr(base.encoder, "layer_norm", None) if kind == "pre" else None
    if final is not None:
        rec.add("enc.final_norm", final)
    return enc, dec, cross, final


def _register_t5gemma(
    model: nn.Module, rec: _Recorder
) -> tuple[list[_Block], list[_Block], list[_Block], nn.Module]:
    base = model.model
    enc, dec, cross = [], [], []
    for side, stack, out in (("enc", base.encoder, enc), ("dec", base.decoder, dec)):
        for idx, layer in enumerate(stack.layers):
            sa = layer.self_attn
            h, dh = sa.config.num_attention_heads, sa.head_dim
            n_kv = sa.config.num_key_value_heads
            name = f"{side}{idx}"
            rec.add(f"{name}.attn", sa, clamp=True)
            rec.add(f"{name}.norm", layer.pre_self_attn_layernorm)
            nxt = layer.pre_cross_attn_layernorm if side == "dec" else layer.pre_feedforward_layernorm
            rec.add(f"{name}.next", nxt)
            out.append(
                _Block("pre", layer.pre_self_attn_layernorm, sa.v_proj, sa.o_proj, h, dh, f"{name}.norm",
                       f"{name}.attn", f"{name}.norm", ("inp", f"{name}.next"), gemma=True,
                       post_norm=layer.post_self_attn_layernorm, n_kv=n_kv, rtol=_T5_RMS_RTOL)
            )
            if side == "dec":
                ca = layer.cross_attn
                xname = f"x{idx}"
                rec.add(f"{xname}.attn", ca, clamp=True)
                rec.add(f"{xname}.norm", layer.pre_cross_attn_layernorm)
                rec.add(f"{xname}.next", layer.pre_feedforward_layernorm)
                cross.append(
                    _Block("pre", layer.pre_cross_attn_layernorm, ca.v_proj, ca.o_proj, h, dh, f"{xname}.norm",
                           f"{xname}.attn", f"{xname}.norm", ("inp", f"{xname}.next"), gemma=True,
                           post_norm=layer.post_cross_attn_layernorm, n_kv=ca.config.num_key_value_heads,
                           rtol=_T5_RMS_RTOL)
                )
    rec.add("enc.final_norm", base.encoder.norm)
    return enc, dec, cross, base.encoder.norm


# --------------------------------------------------------------------------------------------
# One attention block: transformed vectors, reconstruction checks, measures
# --------------------------------------------------------------------------------------------


def _norm_rtol(block: _Block) -> float:
    """T5 / T5Gemma norms compute in float32 even in a float64 model."""
    return _T5_RMS_RTOL if block.rms or block.gemma else _RTOL


def _pre_norm(block: _Block, x: torch.Tensor) -> torch.Tensor:
    if block.gemma:
        return _gemma_rms(x, block.norm)
    return _t5_rms(x, block.norm) if block.rms else _layer_norm(x, block.norm)


def _block_measures(
    block: _Block,
    rec: _Recorder,
    a: torch.Tensor,
    valid_q: torch.Tensor,
    valid_k: torch.Tensor,
    cross: bool,
    causal: bool,
    what: str,
    layer: int,
) -> dict[str, torch.Tensor]:
    """Dense ALTI of one block (docs/spec.md §1a/§1b/§1c/§1d, §2, §3) for all batch items.

    ``a`` ``[b, H, n, m]``; ``valid_q`` ``[b, n]``, ``valid_k`` ``[b, m]`` (booleans).
    Self blocks give ``[b, n, n]`` token matrices; cross blocks ``[b, n, m+1]`` with the residual
    last. Returns per-layer tensors (no layer dim).
    """
    x = rec.inp[block.x_key]  # residual entering the block [b, n, d]
    bsz, n, d = x.shape
    h, dh = block.n_heads, block.d_head
    attn_in = rec.inp[block.attn_key]

    # States the values are computed from.
    if cross:
        vin = rec.kv[block.attn_key]  # encoder output e_s (already after the encoder's final norm)
    elif block.kind == "pre":
        vin = attn_in  # norm(x_j): what the attention module really saw
        mine = _pre_norm(block, x)
        _check_close(f"{what} pre-norm of the residual", layer, mine, vin, _norm_rtol(block))
        _check_close(f"{what} norm module output", layer, rec.out[block.norm_key], vin)
        if block.merged:  # the sources: the decoder prefix, then the encoder output e_s
            vin = torch.cat([attn_in, rec.kv[block.attn_key]], dim=1)
    else:
        vin = x
    if cross and block.kind == "pre":
        normed = _pre_norm(block, x)
        _check_close(f"{what} pre-norm of the residual", layer, normed, attn_in, _norm_rtol(block))
    if block.kind == "post":
        _check_close(f"{what} block input", layer, attn_in, x)
    m = vin.shape[1]
    if a.shape != (bsz, h, n, m):
        raise AssertionError(f"reference: {what} attention shape {tuple(a.shape)} at layer {layer}")

    wv, bv = _linear_params(block.v_proj)
    wo, bo = _linear_params(block.o_proj)
    v = vin @ wv.T
    if bv is not None:
        v = v + bv
    n_kv = block.n_kv or h
    v = v.view(bsz, m, n_kv, dh).repeat_interleave(h // n_kv, dim=2).permute(0, 2, 1, 3)  # [b, H, m, dh]
    w_o = wo.T.reshape(h, dh, d)  # Linear weight is [out, in]; input index = head * dh + k
    b_o = torch.zeros(d, dtype=x.dtype) if bo is None else bo
    vo = torch.einsum("bhjk,hke->bhje", v, w_o)  # VO[h, j]

    a = torch.where(valid_q[:, None, :, None], a, torch.zeros_like(a))  # padded query rows -> 0
    if (a.masked_select((~valid_k)[:, None, None, :].expand_as(a)) != 0).any():
        raise AssertionError(f"reference: {what} attends to a padded key at layer {layer}")
    if causal and torch.triu(a, diagonal=1).abs().max() != 0:
        raise AssertionError(f"reference: {what} non-causal attention at layer {layer}")

    parts = a[..., None] * vo[:, :, None, :, :]  # T^h_i(x_j) before any post-norm, [b, H, n, m, d]
    res = x  # the residual part R_i = x_i (self: on the diagonal; cross: extra last column)
    bias = b_o.expand(bsz, n, d)
    y_true = rec.inp[block.y_key[1]] if block.y_key[0] == "inp" else rec.out[block.y_key[1]]

    if block.kind == "post":
        ln = block.norm
        z = parts.sum((1, 3)) + res + b_o  # input of the layer norm
        _check_close(
            f"{what} layer-norm input z", layer, _rows(z, valid_q), _rows(rec.inp[block.norm_key], valid_q), block.rtol
        )
        mu = z.mean(-1, keepdim=True)
        sigma = ((z - mu) ** 2).mean(-1, keepdim=True).add(hf_eps(ln)).sqrt()  # [b, n, 1]
        gamma = ln.weight
        beta = ln.bias if ln.bias is not None else torch.zeros(d, dtype=x.dtype)

        def lin(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            """L_i(u) = γ ⊙ (u − mean(u)) / σ_i."""
            return gamma * (u - u.mean(-1, keepdim=True)) / s

        parts = lin(parts, sigma[:, None, :, :, None])
        res = lin(res, sigma)
        bias = lin(b_o.expand(bsz, n, d), sigma) + beta

    if block.post_norm is not None:  # y = x + g ⊙ a_i / rms(a_i), a = the attention module's real output
        u = rec.out[block.attn_key]
        _check_close(
            f"{what} attention output", layer, _rows(parts.sum((1, 3)) + b_o, valid_q), _rows(u, valid_q), block.rtol
        )
        rms = (u.pow(2).mean(-1, keepdim=True) + hf_eps(block.post_norm)).sqrt()  # [b, n, 1]
        gain = 1.0 + block.post_norm.weight
        _check_close(f"{what} post-attention norm formula", layer, gain * u / rms, block.post_norm(u), _T5_RMS_RTOL)
        parts = gain * parts / rms[:, None, :, None, :]
        bias = gain * b_o / rms

    tok = parts.sum(1)  # [b, n, m, d]
    if cross:
        t = torch.cat([tok, res[:, :, None, :]], dim=2)  # [b, n, m+1, d]
    else:
        eye = torch.eye(n, m, dtype=x.dtype)  # m = n, or n + S for a merged block (residual on key j = i)
        t = tok + eye[None, :, :, None] * res[:, :, None, :]  # δ_ij x_j
    y = t.sum(2) + bias
    _check_close(
        f"{what} reconstruction of the block output", layer, _rows(y, valid_q), _rows(y_true, valid_q), block.rtol
    )

    vq = valid_q[:, :, None]
    y_l1 = _l1(y)
    diff = y[:, :, None, :] - t
    c_l1 = (y_l1[:, :, None] - _l1(diff)).clamp(min=0)
    c_l2 = (_l2(y)[:, :, None] - _l2(diff)).clamp(min=0)
    c_koba = _l2(t)
    out: dict[str, torch.Tensor] = {}
    keep = torch.cat([valid_k, torch.ones_like(valid_q[:, :1])], 1) if cross else valid_k
    for key, c in (("l1", c_l1), ("l2", c_l2), ("koba", c_koba)):
        c = torch.where(vq, c, torch.zeros_like(c))
        if (c.masked_select((~keep)[:, None, :].expand_as(c)) != 0).any():
            raise AssertionError(f"reference: {what} {key} non-zero on a padded key at layer {layer}")
        out[key] = _normalise_rows(c)
    mean_a = a.mean(1)
    out["attention"] = _normalise_rows(mean_a)
    if not cross and not block.merged:
        step = torch.where(vq, 0.5 * mean_a + 0.5 * torch.eye(n, dtype=x.dtype), torch.zeros_like(mean_a))
        out["attn_rollout_step"] = _normalise_rows(step)

    c_heads = (y_l1[:, None, :, None] - _l1(y[:, None, :, None, :] - parts)).clamp(min=0)  # [b, H, n, m]
    c_res = (y_l1 - _l1(y - res)).clamp(min=0)  # [b, n]
    c_heads = torch.where(valid_q[:, None, :, None], c_heads, torch.zeros_like(c_heads))
    c_res = torch.where(valid_q, c_res, torch.zeros_like(c_res))
    total = c_heads.sum((1, 3)) + c_res
    ok = total > 0
    safe = torch.where(ok, total, torch.ones_like(total))
    out["heads"] = torch.where(ok[:, None, :, None], c_heads / safe[:, None, :, None], 0.0)
    out["heads_residual"] = torch.where(ok, c_res / safe, 0.0)
    out["resultant"] = y
    out["resultant_actual"] = y_true
    return out


def _run_blocks(
    blocks: list[_Block],
    rec: _Recorder,
    attentions: tuple[torch.Tensor, ...] | None,
    valid_q: torch.Tensor,
    valid_k: torch.Tensor,
    cross: bool,
    causal: bool,
    what: str,
) -> dict[str, torch.Tensor]:
    """Per-layer measures of a stack of blocks, stacked on dim 1; adds ``rollout`` for self blocks."""
    if attentions is None or len(attentions) != len(blocks) or any(t is None for t in attentions):
        raise AssertionError(f"reference: the model returned no / wrong {what} attention probabilities")
    acc: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    for idx, block in enumerate(blocks):
        a = attentions[idx].to(torch.float64)
        for key, val in _block_measures(block, rec, a, valid_q, valid_k, cross, causal, what, idx).items():
            acc[key].append(val)
    res = {k: torch.stack(v, dim=1) for k, v in acc.items()}
    if not cross:
        res["rollout"] = _rollout(res["l1"])
        res["attention_rollout"] = _rollout(res.pop("attn_rollout_step"))
    return res


def _valid(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    return torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.to(torch.bool)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_encoder(
    hf_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dense float64 ALTI of a post-LN BERT encoder (docs/spec.md §1b, §2, §3, §4).

    Returns, batch first: ``l1``, ``l2``, ``koba``, ``attention``, ``rollout`` (of l1) and
    ``attention_rollout`` ``[batch, layer, S, S]``; ``heads`` ``[batch, layer, head, S, S]`` and
    ``heads_residual`` ``[batch, layer, S]``; ``resultant`` (reconstructed ``y = LN1(z)``) and
    ``resultant_actual`` (captured) ``[batch, layer, S, d]``. Padded rows and columns are 0.
    """
    if hf_model.config.model_type != "bert":
        raise NotImplementedError(f"reference_encoder: unsupported model_type {hf_model.config.model_type!r}")
    model = float64_eager_copy(hf_model)
    rec = _Recorder()
    blocks = _register_bert(model, rec)
    input_ids = input_ids.to(torch.long)
    valid = _valid(attention_mask, input_ids)
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.to(torch.long),
            output_hidden_states=True,
            output_attentions=True,
        )
    finally:
        rec.remove()
    return _run_blocks(blocks, rec, out.attentions, valid, valid, cross=False, causal=False, what="encoder")


def _led_encoder_attentions(
    model: nn.Module, rec: _Recorder, s_len: int, valid_s: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Dense ``[b, H, S, S]`` sliding-window attention of LED's encoder layers, from the weights.

    LED pads the encoder input to a multiple of the window; the padded positions are masked keys
    and are dropped, so every captured encoder activation is cropped to the first ``S`` positions
    here. ``softmax((x W_q + b_q)/√dh · (x W_k + b_k)ᵀ)`` over the keys with ``|i − j| ≤ w`` that
    are not padding (``w = attention_window / 2``).
    """
    for store in (rec.inp, rec.out):
        for key in list(store):
            if key.startswith("enc") and not key.startswith("enc."):
                store[key] = store[key][:, :s_len]
    probs = []
    for idx, layer in enumerate(model.led.encoder.layers):
        att = layer.self_attn.longformer_self_attn
        x = rec.inp[f"enc{idx}.attn"]
        bsz, n, d = x.shape
        h = model.config.encoder_attention_heads
        dh = d // h
        q = (x @ att.query.weight.T + att.query.bias).view(bsz, n, h, dh).transpose(1, 2) / dh**0.5
        k = (x @ att.key.weight.T + att.key.bias).view(bsz, n, h, dh).transpose(1, 2)
        w = model.config.attention_window[idx] // 2
        pos = torch.arange(n)
        allowed = ((pos[:, None] - pos[None, :]).abs() <= w)[None, None] & valid_s[:, None, None, :]
        scores = torch.where(allowed, q @ k.transpose(-1, -2), torch.tensor(float("-inf"), dtype=x.dtype))
        probs.append(torch.softmax(scores, dim=-1))
    return tuple(probs)


def _longt5_local_attentions(model: nn.Module, rec: _Recorder, valid_s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Dense ``[b, H, S, S]`` LongT5 local attention from the weights: ``softmax(q_i·k_j + b(j − i))``
    over the keys with ``|i − j| <= local_radius`` that are not padding (no 1/√d scaling; the
    relative bias ``b`` from layer 0's embedding, bucketed as in T5)."""
    cfg = model.config
    first = model.encoder.block[0].layer[0].LocalSelfAttention
    probs = []
    for idx, block in enumerate(model.encoder.block):
        att = block.layer[0].LocalSelfAttention
        xn = rec.inp[f"enc{idx}.attn"]
        bsz, n, _ = xn.shape
        q = (xn @ att.q.weight.T).view(bsz, n, cfg.num_heads, cfg.d_kv).transpose(1, 2)
        k = (xn @ att.k.weight.T).view(bsz, n, cfg.num_heads, cfg.d_kv).transpose(1, 2)
        pos = torch.arange(n)
        rel = pos[None, :] - pos[:, None]
        bucket = first._relative_position_bucket(
            rel, bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
        )
        bias = first.relative_attention_bias.weight[bucket].permute(2, 0, 1)  # [H, S, S]
        allowed = (rel.abs() <= cfg.local_radius)[None, None] & valid_s[:, None, None, :]
        scores = torch.where(allowed, q @ k.transpose(-1, -2) + bias, torch.tensor(float("-inf"), dtype=xn.dtype))
        probs.append(torch.softmax(scores, dim=-1))
    return tuple(probs)


def _alti_plus(r_enc: torch.Tensor, cross: torch.Tensor, dec_self: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/spec.md §4 steps 1-5 and, independently, the block-matrix product.

    ``r_enc`` ``[b, S, S]``, ``cross`` ``[b, L, T, S+1]``, ``dec_self`` ``[b, L, T, T]``.
    Returns ``total`` ``[b, L, T, S+T]`` and ``total_blockproduct`` ``[b, T, S+T]`` (not renormalised).
    """
    bsz, n_layers, t_len, _ = dec_self.shape
    s_len = r_enc.shape[-1]
    acc: list[torch.Tensor] = []
    eye_s = torch.eye(s_len, dtype=torch.float64).expand(bsz, s_len, s_len)
    prod = torch.eye(s_len + t_len, dtype=torch.float64).expand(bsz, -1, -1).clone()
    for layer in range(n_layers):
        c_x, c_s = cross[:, layer], dec_self[:, layer]
        c_s_scaled = c_s * c_x[:, :, s_len : s_len + 1]  # step 1: rows scaled by the residual share
        j = torch.cat([c_x[:, :, :s_len], c_s_scaled], dim=2)  # step 2
        ced = j[:, :, :s_len] @ r_enc  # step 3
        csa = j[:, :, s_len:]
        if layer == 0:  # step 4
            cur = torch.cat([ced, csa], dim=2)
        else:
            prev = acc[-1]
            cur = torch.cat([ced + csa @ prev[:, :, :s_len], csa @ prev[:, :, s_len:]], dim=2)
            cur = _normalise_rows(cur)
        acc.append(cur)
        top = torch.cat([eye_s, torch.zeros(bsz, s_len, t_len, dtype=torch.float64)], dim=2)
        m = torch.cat([top, torch.cat([ced, csa], dim=2)], dim=1)  # M^l = [[I_S, 0], [Ced, Csa]]
        prod = m @ prod  # M^l … M^0
    return torch.stack(acc, dim=1), prod[:, s_len:, :]


@torch.no_grad()
def reference_seq2seq(
    hf_model: nn.Module,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dense float64 ALTI+ of an encoder-decoder HF model (docs/spec.md §1a-§1d, §2, §3, §4).

    Returns float64 tensors, batch first (S source length, T target length, L layers, H heads):

    - encoder: ``encoder_l1`` / ``encoder_l2`` / ``encoder_koba`` / ``encoder_attention`` /
      ``encoder_rollout`` / ``encoder_attention_rollout`` ``[b, L, S, S]``, ``encoder_heads``
      ``[b, L, H, S, S]``, ``encoder_heads_residual`` ``[b, L, S]``;
    - decoder self-attention: ``decoder_self`` (= ``decoder_self_l1``), ``decoder_self_l2``,
      ``decoder_self_koba``, ``decoder_self_attention`` ``[b, L, T, T]`` (causal),
      ``decoder_self_heads`` ``[b, L, H, T, T]``, ``decoder_self_heads_residual`` ``[b, L, T]``;
    - cross-attention: ``cross`` (= ``cross_l1``), ``cross_l2``, ``cross_koba`` ``[b, L, T, S+1]``
      (decoder residual last), ``cross_attention`` ``[b, L, T, S]`` (head mean, no residual),
      ``cross_heads`` ``[b, L, H, T, S]``, ``cross_heads_residual`` ``[b, L, T]``;
    - ``total`` ``[b, L, T, S+T]`` (docs/spec.md §4 steps 1-5), ``total_blockproduct`` ``[b, T, S+T]``
      (block-matrix product, last layer), ``source_contribution`` ``[b, T]``;
    - ``encoder_resultant`` ``[b, L, S, d]``, ``decoder_self_resultant`` and ``cross_resultant``
      ``[b, L, T, d]`` (reconstructions) and the captured ``*_resultant_actual``.

    Padded query rows are 0 and padded key columns are 0 (right or left padding).
    """
    kind = hf_model.config.model_type
    model = float64_eager_copy(hf_model)
    rec = _Recorder()
    if kind in ("t5", "switch_transformers", "longt5"):  # Switch: sparse MLPs; LongT5: local encoder attention
        enc_blocks, dec_blocks, cross_blocks, final_norm = _register_t5(model, rec)
    elif kind == "t5gemma":
        enc_blocks, dec_blocks, cross_blocks, final_norm = _register_t5gemma(model, rec)
    elif kind in _POST_LN | _PRE_LN and kind != "bert":
        enc_blocks, dec_blocks, cross_blocks, final_norm = _register_bart_like(model, rec)
    else:
        raise NotImplementedError(f"reference_seq2seq: unsupported model_type {kind!r}")

    input_ids = input_ids.to(torch.long)
    decoder_input_ids = decoder_input_ids.to(torch.long)
    valid_s = _valid(attention_mask, input_ids)
    valid_t = _valid(decoder_attention_mask, decoder_input_ids)
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.to(torch.long),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=None if decoder_attention_mask is None else decoder_attention_mask.to(torch.long),
            output_hidden_states=True,
            output_attentions=True,
            use_cache=False,
        )
    finally:
        rec.remove()

    # The encoder output e that cross-attention reads: after the final norm where there is one.
    e = out.encoder_last_hidden_state.to(torch.float64)
    for idx, block in enumerate(cross_blocks):
        _check_close("cross-attention key/value states vs encoder output", idx, rec.kv[block.attn_key], e)
    if final_norm is not None:
        last = rec.inp["enc.final_norm"]
        if kind == "t5gemma":
            mine = _gemma_rms(last, final_norm)
        else:
            t5_like = kind in ("t5", "switch_transformers", "longt5")
            mine = _t5_rms(last, final_norm) if t5_like else _layer_norm(last, final_norm)
        _check_close(
            "encoder final norm",
            len(enc_blocks),
            _rows(mine, valid_s),
            _rows(e, valid_s),
            _T5_RMS_RTOL if kind in ("t5", "t5gemma", "switch_transformers", "longt5") else _RTOL,
        )

    enc_attentions = out.encoder_attentions
    if kind == "led":
        enc_attentions = _led_encoder_attentions(model, rec, input_ids.shape[1], valid_s)
    if kind == "longt5":
        enc_attentions = _longt5_local_attentions(model, rec, valid_s)
    enc = _run_blocks(enc_blocks, rec, enc_attentions, valid_s, valid_s, False, False, "encoder")
    dec = _run_blocks(dec_blocks, rec, out.decoder_attentions, valid_t, valid_t, False, True, "decoder self")
    crs = _run_blocks(cross_blocks, rec, out.cross_attentions, valid_t, valid_s, True, False, "cross")

    result: dict[str, torch.Tensor] = {}
    for key, val in enc.items():
        result[f"encoder_{key}"] = val
    for key, val in dec.items():
        if key not in ("rollout", "attention_rollout"):
            result[f"decoder_self_{key}"] = val
    for key, val in crs.items():
        result[f"cross_{key}"] = val
    result["decoder_self"] = result["decoder_self_l1"]
    result["cross"] = result["cross_l1"]

    total, block_product = _alti_plus(enc["rollout"][:, -1], crs["l1"], dec["l1"])
    s_len = input_ids.shape[1]
    result["total"] = total
    result["total_blockproduct"] = block_product
    result["source_contribution"] = total[:, -1, :, :s_len].sum(-1)
    return result


def _register_t5gemma2(
    model: nn.Module, rec: _Recorder, probs: dict[str, torch.Tensor]
) -> tuple[list[_Block], list[_Block], nn.Module]:
    """T5Gemma2: a T5Gemma-like text encoder; decoder layers with one merged attention module."""
    base = model.model
    enc, dec = [], []
    stacks = (("enc", base.encoder.text_model.layers, enc), ("dec", base.decoder.layers, dec))
    for side, layers, out in stacks:
        for idx, layer in enumerate(layers):
            sa = layer.self_attn
            name = f"{side}{idx}"
            rec.add(f"{name}.attn", sa)
            rec.add(f"{name}.norm", layer.pre_self_attn_layernorm)
            rec.add(f"{name}.next", layer.pre_feedforward_layernorm)

            def keep(_m: nn.Module, _a: tuple, output: Any, name: str = name) -> None:
                # eager: (out, weights) in the encoder, (out, self weights, cross weights) in the decoder
                probs[name] = torch.cat([w for w in output[1:] if isinstance(w, torch.Tensor)], dim=-1).detach()

            rec._handles.append(sa.register_forward_hook(keep))
            out.append(
                _Block("pre", layer.pre_self_attn_layernorm, sa.v_proj, sa.o_proj, sa.config.num_attention_heads,
                       sa.head_dim, f"{name}.norm", f"{name}.attn", f"{name}.norm", ("inp", f"{name}.next"),
                       gemma=True, post_norm=layer.post_self_attn_layernorm, n_kv=sa.config.num_key_value_heads,
                       rtol=_T5_RMS_RTOL, merged=side == "dec")
            )
    final = base.encoder.text_model.norm
    rec.add("enc.final_norm", final)
    return enc, dec, final


@torch.no_grad()
def reference_merged_seq2seq(
    hf_model: nn.Module, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Dense float64 ALTI+ of T5Gemma2 (unpadded), whose decoder blocks are merged self+cross attention.

    Each decoder block is one attention block over the keys ``[target prefix ; source]`` (values
    ``v_proj`` of the pre-normed decoder stream and of the encoder output), the receiver's own
    residual on key ``j = i``, and a norm on the attention output. Returns ``encoder_l1`` /
    ``encoder_rollout`` ``[b, L, S, S]``, ``merged`` ``[b, L, T, T+S]`` (target keys first), its
    per-head parts ``merged_heads`` ``[b, L, H, T, T+S]`` and ``merged_heads_residual`` ``[b, L, T]``, and
    ``total`` ``[b, L, T, S+T]``: docs/spec.md §4 with the block's own matrix ``J = [C_src, C_tgt]``,
    ``R^0 = [C_src R_enc, C_tgt]``, ``R^l = [C_src R_enc + C_tgt R^{l-1}_src, C_tgt R^{l-1}_tgt]``.
    """
    model = float64_eager_copy(hf_model)
    rec = _Recorder()
    probs: dict[str, torch.Tensor] = {}
    enc_blocks, dec_blocks, final_norm = _register_t5gemma2(model, rec, probs)
    input_ids, decoder_input_ids = input_ids.long(), decoder_input_ids.long()
    try:
        out = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, use_cache=False,
                    output_attentions=True)
    finally:
        rec.remove()
    e = out.encoder_last_hidden_state.to(torch.float64)
    _check_close("encoder final norm", len(enc_blocks), _gemma_rms(rec.inp["enc.final_norm"], final_norm), e,
                 _T5_RMS_RTOL)
    valid_s = torch.ones(input_ids.shape, dtype=torch.bool)
    valid_t = torch.ones(decoder_input_ids.shape, dtype=torch.bool)
    enc_attn = tuple(probs[f"enc{i}"] for i in range(len(enc_blocks)))
    enc = _run_blocks(enc_blocks, rec, enc_attn, valid_s, valid_s, False, False, "encoder")
    merged, heads, heads_residual = [], [], []
    for idx, block in enumerate(dec_blocks):
        _check_close("merged attention's encoder states", idx, rec.kv[block.attn_key], e)
        a = probs[f"dec{idx}"].to(torch.float64)
        res = _block_measures(block, rec, a, valid_t, torch.cat([valid_t, valid_s], 1), False, False, "merged", idx)
        merged.append(res["l1"])
        heads.append(res["heads"])
        heads_residual.append(res["heads_residual"])
    c = torch.stack(merged, dim=1)  # [b, L, T, T+S]
    t_len = decoder_input_ids.shape[1]
    r_enc = enc["rollout"][:, -1]
    acc: list[torch.Tensor] = []
    for layer in range(c.shape[1]):
        c_tgt, c_src = c[:, layer, :, :t_len], c[:, layer, :, t_len:]
        if layer == 0:
            cur = torch.cat([c_src @ r_enc, c_tgt], dim=2)
        else:
            prev_src, prev_tgt = acc[-1][..., : r_enc.shape[-1]], acc[-1][..., r_enc.shape[-1] :]
            cur = _normalise_rows(torch.cat([c_src @ r_enc + c_tgt @ prev_src, c_tgt @ prev_tgt], dim=2))
        acc.append(cur)
    return {
        "encoder_l1": enc["l1"], "encoder_rollout": enc["rollout"], "merged": c, "total": torch.stack(acc, 1),
        "merged_heads": torch.stack(heads, 1), "merged_heads_residual": torch.stack(heads_residual, 1),
    }
