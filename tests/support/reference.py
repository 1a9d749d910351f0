"""Independent dense float64 reference implementation of ALTI for decoder-only HF models.

Written straight from docs/spec.md §1a, §1e, §1f, §2, §3, §4 and
used by the tests as ground truth. It deliberately imports neither ``lens_alti`` nor
``transformer_lens``: everything is read from the Hugging Face modules themselves.

Only meant for tiny models (a few layers, d_model <= 64, seq <= 12): every transformed
vector ``T_i(x_j)`` and every per-head part is materialised densely.

Supported: ``GPT2LMHeadModel`` / ``GPT2Model``, ``LlamaForCausalLM`` / ``LlamaModel``
(grouped-query attention, RMSNorm, optional biases) and ``GPTNeoXForCausalLM`` /
``GPTNeoXModel`` (parallel attention + MLP, default mode of docs/spec.md §1e: ``y_i = x_i + attn_out_i``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["randomize_norms", "reference_decoder_only"]

# Relative tolerance of the internal reconstruction and norm checks (float64 throughout).
_RTOL = 1e-10
# Finite replacement for the additive "-inf" of the attention mask; see _mask_fix_hook.
_MASK_FLOOR = -1e30


@dataclass
class _Layer:
    """What the reference needs from one decoder layer."""

    norm: nn.Module
    attn: nn.Module
    n_heads: int
    n_kv: int
    d_head: int
    kind: str
    post_norm: nn.Module | None = None  # a norm on the attention output only (Gemma-2, docs/spec.md §1d)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set every LayerNorm/RMSNorm weight to ``1 + 0.3·randn`` and bias to ``0.1·randn`` in place.

    A module counts as a norm when its class name contains ``norm`` or ``ln`` (case-insensitive)
    and it has a ``weight`` parameter. Returns ``model`` for chaining.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            name = type(module).__name__.lower()
            if "norm" not in name and "ln" not in name:
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter):
                continue
            noise = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
            weight.copy_((1.0 + 0.3 * noise).to(weight.dtype))
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                noise = torch.randn(bias.shape, generator=gen, dtype=torch.float64)
                bias.copy_((0.1 * noise).to(bias.dtype))
    return model


def _layers(model: nn.Module) -> list[_Layer]:
    """Locate the decoder layers, their input norm and attention module."""
    cfg = model.config
    kind = cfg.model_type
    if kind == "gpt2":
        backbone = getattr(model, "transformer", model)
        h = cfg.n_head
        return [_Layer(b.ln_1, b.attn, h, h, cfg.n_embd // h, kind) for b in backbone.h]
    if kind in ("llama", "mistral", "gemma2"):  # Mistral: LLaMA's layout with a sliding window
        backbone = getattr(model, "model", model)
        out = []
        for b in backbone.layers:
            h = cfg.num_attention_heads
            n_kv = getattr(cfg, "num_key_value_heads", None) or h
            d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
            post = b.post_attention_layernorm if kind == "gemma2" else None
            out.append(_Layer(b.input_layernorm, b.self_attn, h, n_kv, d_head, kind, post))
        return out
    if kind == "gpt_neox":
        backbone = getattr(model, "gpt_neox", model)
        h = cfg.num_attention_heads
        d_head = cfg.hidden_size // h
        return [_Layer(b.input_layernorm, b.attention, h, h, d_head, kind) for b in backbone.layers]
    raise NotImplementedError(f"reference: unsupported model_type {kind!r}")


def hf_eps(norm: nn.Module) -> float:
    """A Hugging Face norm's epsilon under either name transformers has used (`eps`, `variance_epsilon`)."""
    for name in ("eps", "variance_epsilon"):
        value = getattr(norm, name, None)
        if value is not None:
            return float(value)
    raise AttributeError(f"{type(norm).__name__} has neither `eps` nor `variance_epsilon`")


def float64_eager_copy(hf_model: nn.Module) -> nn.Module:
    """A float64, eval, eager-attention deep copy of ``hf_model`` (the references' starting point)."""
    model = copy.deepcopy(hf_model).double().eval()
    model.config._attn_implementation = "eager"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model


def run_hooked(model: nn.Module, input_ids: torch.Tensor, handles: list[Any]) -> None:
    """Run the Hugging Face model once (no KV cache) with forward hooks registered, then remove them."""
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for an ``nn.Linear``-layout weight ``[out, in]``."""
    y = x @ weight.T
    return y if bias is None else y + bias


def _values_and_out_proj(layer: _Layer, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-head values ``[batch, head, pos, d_head]``, ``W_O`` ``[head, d_head, d]``, ``b_O``.

    ``xn`` is the normalised residual (input of the attention module), ``[batch, pos, d]``.
    """
    b, n, d = xn.shape
    h, n_kv, dh = layer.n_heads, layer.n_kv, layer.d_head
    attn = layer.attn
    if layer.kind == "gpt2":
        # Conv1D: y = x @ W + b with W [in, out]; columns are [q | k | v], each d wide.
        w, bias = attn.c_attn.weight, attn.c_attn.bias
        v = xn @ w[:, 2 * d : 3 * d] + bias[2 * d : 3 * d]
        v = v.view(b, n, h, dh)
        w_o = attn.c_proj.weight.view(h, dh, d)  # Conv1D weight is [in, out]
        b_o = attn.c_proj.bias
    elif layer.kind in ("llama", "mistral", "gemma2"):
        v = _linear(xn, attn.v_proj.weight, attn.v_proj.bias).view(b, n, n_kv, dh)
        v = v.repeat_interleave(h // n_kv, dim=2)  # query head q uses kv head q // (h // n_kv)
        w_o = attn.o_proj.weight.T.reshape(h, dh, d)  # Linear weight is [out, in]
        b_o = attn.o_proj.bias
    elif layer.kind == "gpt_neox":
        # query_key_value output is laid out per head as [head, (q, k, v), d_head].
        qkv = _linear(xn, attn.query_key_value.weight, attn.query_key_value.bias)
        v = qkv.view(b, n, h, 3 * dh)[..., 2 * dh : 3 * dh]
        w_o = attn.dense.weight.T.reshape(h, dh, d)
        b_o = attn.dense.bias
    else:  # pragma: no cover - _layers already refused it
        raise NotImplementedError(layer.kind)
    if b_o is None:
        b_o = torch.zeros(d, dtype=xn.dtype)
    return v.permute(0, 2, 1, 3), w_o, b_o


def _mask_fix_hook(
    _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Clamp the additive attention mask to a finite floor.

    transformers 5.x LLaMA/NeoX eager attention adds ``finfo(float64).min`` and then takes the
    softmax in float32, where it becomes ``-inf``: fully masked rows (left-padded queries) turn
    NaN and ``0 · NaN`` then poisons every position in later layers. Clamping to -1e30 leaves
    every row with at least one unmasked key bit-identical (``exp(-1e30 - m)`` is exactly 0)
    and only makes fully masked rows uniform instead of NaN; those rows are zeroed anyway.
    """
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        kwargs = {**kwargs, "attention_mask": mask.clamp(min=_MASK_FLOOR)}
    return args, kwargs


def _normalise_rows(c: torch.Tensor) -> torch.Tensor:
    """Divide by the sum over the last dim; rows summing to 0 give 0."""
    s = c.sum(-1, keepdim=True)
    return torch.where(s > 0, c / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(c))


def _rollout(c: torch.Tensor) -> torch.Tensor:
    """``R^0 = C^0``, ``R^l = C^l @ R^{l-1}`` over dim 1 of ``[batch, layer, q, k]``."""
    out = [c[:, 0]]
    for layer in range(1, c.shape[1]):
        out.append(c[:, layer] @ out[-1])
    return torch.stack(out, dim=1)


def _check_close_tol(name: str, layer: int, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    err = float((got - want).abs().max())
    if err > rtol * max(float(want.abs().max()), 1e-30):
        raise AssertionError(f"reference: {name} differs at layer {layer}: max|Δ| = {err:.3g}")


def _check_close(name: str, layer: int, got: torch.Tensor, want: torch.Tensor) -> None:
    """Assert ``max|got - want| <= _RTOL · max(1, max|want|)``."""
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if not err <= _RTOL * scale:
        raise AssertionError(f"reference: {name} mismatch at layer {layer}: max|Δ|={err:.3e}")


@torch.no_grad()
def reference_decoder_only(
    hf_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dense float64 ALTI of a decoder-only HF model (spec sections 1a/1e/1f, 2, 3, 4).

    Returns float64 tensors, batch first:
    ``l1``, ``l2``, ``koba``, ``attention``, ``rollout``, ``attention_rollout``
    ``[batch, layer, query, key]``; ``heads`` ``[batch, layer, head, query, key]`` and
    ``heads_residual`` ``[batch, layer, query]``; ``resid_mid`` (the reconstruction
    ``Σ_j T_i(x_j) + b_O``) and ``resid_mid_actual`` (``x + attention module output`` captured
    from the real forward pass) ``[batch, layer, query, d_model]``.
    Padded query rows are all 0, padded key columns are 0.
    """
    model = float64_eager_copy(hf_model)
    layers = _layers(model)

    input_ids = input_ids.to(torch.long)
    bsz, n = input_ids.shape
    if attention_mask is None:
        valid = torch.ones(bsz, n, dtype=torch.bool)
    else:
        valid = attention_mask.to(torch.bool)

    attn_in: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(layers):

        def pre(mod: nn.Module, args: tuple, kwargs: dict, idx: int = idx) -> tuple:
            hs = args[0] if args else kwargs["hidden_states"]
            attn_in[idx] = hs.detach().clone()
            return _mask_fix_hook(mod, args, kwargs)

        def post(_mod: nn.Module, _args: tuple, output: Any, idx: int = idx) -> None:
            out = output[0] if isinstance(output, tuple) else output
            attn_out[idx] = out.detach().clone()

        handles.append(layer.attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.attn.register_forward_hook(post))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.to(torch.long),
            output_hidden_states=True,
            output_attentions=True,
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()

    if out.attentions is None or any(a is None for a in out.attentions):
        raise AssertionError("reference: the model returned no attention probabilities")
    if len(out.attentions) != len(layers) or len(out.hidden_states) < len(layers):
        raise AssertionError("reference: unexpected number of attentions / hidden states")

    eye = torch.eye(n, dtype=torch.float64)
    qmask = valid[:, None, :, None]  # [batch, 1, query, 1]
    kpad = ~valid[:, None, None, :]  # [batch, 1, 1, key]
    res: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    for idx, layer in enumerate(layers):
        x = out.hidden_states[idx].to(torch.float64)  # residual entering the layer [b, n, d]
        a = out.attentions[idx].to(torch.float64)  # [b, H, q, k]
        if a.shape != (bsz, layer.n_heads, n, n):
            raise AssertionError(f"reference: attention shape {tuple(a.shape)} at layer {idx}")
        xn = layer.norm(x)
        # hidden_states[idx] really is the input of layer idx, and its norm is what attn saw.
        _check_close("normalised attention input", idx, xn, attn_in[idx])

        v, w_o, b_o = _values_and_out_proj(layer, xn)
        vo = torch.einsum("bhjd,hde->bhje", v, w_o)  # VO[h, j], [b, H, n, d]

        # Rows of padded queries may be arbitrary (uniform over all keys): zero them first.
        a = torch.where(qmask, a, torch.zeros_like(a))
        if (a.masked_select(kpad.expand_as(a)) != 0).any():
            raise AssertionError(f"reference: attention to a padded key at layer {idx}")
        if torch.triu(a, diagonal=1).abs().max() != 0:
            raise AssertionError(f"reference: non-causal attention at layer {idx}")

        # Dense transformed vectors: parts T^h_i(x_j) and T_i(x_j) = Σ_h T^h_i(x_j) + δ_ij x_j.
        parts = a[..., None] * vo[:, :, None, :, :]  # [b, H, i, j, d]
        y_true = x + attn_out[idx].to(torch.float64)
        bias = b_o
        if layer.post_norm is not None:
            # Gemma-2: y = x + g ⊙ a / rms(a), a = Σ_j Σ_h A·VO + b_O; gain g = 1 + weight.
            a_out = attn_out[idx].to(torch.float64)
            eps = hf_eps(layer.post_norm)
            gain = 1.0 + layer.post_norm.weight.to(torch.float64)
            scale = gain / (a_out.square().mean(-1, keepdim=True) + eps).sqrt()
            parts = parts * scale[:, None, :, None, :]
            bias = b_o * scale
            # The module normalises in float32 even in a float64 model: check it loosely,
            # and reconstruct against the float64 formula applied to the real attention output.
            _check_close_tol("Gemma-2 post-attention norm", idx, a_out * scale, layer.post_norm(a_out), 1e-5)
            y_true = x + a_out * scale
        t = parts.sum(1) + eye[None, :, :, None] * x[:, None, :, :]  # [b, i, j, d]
        y = t.sum(2) + bias  # [b, i, d]
        vq = valid[:, :, None]
        _check_close(
            "reconstruction of resid_mid",
            idx,
            torch.where(vq, y, torch.zeros_like(y)),
            torch.where(vq, y_true, torch.zeros_like(y_true)),
        )

        diff = y[:, :, None, :] - t  # y_i - T_i(x_j), [b, i, j, d]
        c_l1 = (y.abs().sum(-1)[:, :, None] - diff.abs().sum(-1)).clamp(min=0)
        c_l2 = (y.norm(dim=-1)[:, :, None] - diff.norm(dim=-1)).clamp(min=0)
        c_koba = t.norm(dim=-1)

        y_l1 = y.abs().sum(-1)  # [b, i]
        c_heads = (y_l1[:, None, :, None] - (y[:, None, :, None, :] - parts).abs().sum(-1)).clamp(min=0)  # [b, H, i, j]
        c_res = (y_l1 - (y - x).abs().sum(-1)).clamp(min=0)  # [b, i]

        vrow = valid[:, :, None]  # [b, i, 1]
        zero = torch.zeros(bsz, n, n, dtype=torch.float64)
        tok = {
            "l1": torch.where(vrow, c_l1, zero),
            "l2": torch.where(vrow, c_l2, zero),
            "koba": torch.where(vrow, c_koba, zero),
        }
        for key, c in tok.items():
            pad_cols = c.masked_select(~valid[:, None, :].expand_as(c))
            if (pad_cols != 0).any():
                raise AssertionError(f"reference: {key} non-zero on a padded key at layer {idx}")
            res[key].append(_normalise_rows(c))

        mean_a = a.mean(1)
        res["attention"].append(_normalise_rows(mean_a))
        step = torch.where(vrow, 0.5 * mean_a + 0.5 * eye, zero)
        res["attn_rollout_step"].append(_normalise_rows(step))

        c_heads = torch.where(qmask, c_heads, torch.zeros_like(c_heads))
        c_res = torch.where(valid, c_res, torch.zeros_like(c_res))
        total = c_heads.sum((1, 3)) + c_res  # [b, i]
        ok = total > 0
        safe = torch.where(ok, total, torch.ones_like(total))
        res["heads"].append(torch.where(ok[:, None, :, None], c_heads / safe[:, None, :, None], 0.0))
        res["heads_residual"].append(torch.where(ok, c_res / safe, 0.0))

        res["resid_mid"].append(y)
        res["resid_mid_actual"].append(y_true)

    result = {k: torch.stack(v, dim=1) for k, v in res.items()}
    step = result.pop("attn_rollout_step")
    result["rollout"] = _rollout(result["l1"])
    result["attention_rollout"] = _rollout(step)
    return result
