"""Reading what lies between the attention blocks and the logits (docs/spec.md §7), for logit attribution.

A decoder stack is read as an ordered list of *steps* that write into the residual stream of
the explained position: attention blocks (the neutral `AttentionBlock` records of
`lens_alti.reading`) and *direct writes* (MLP outputs), each possibly followed by a post-norm;
then the readout: the final norm and the unembedding.

Requirements this module meets:
- the final norm is read from its behaviour, not its class name: the module is probed with
  inputs whose normalisation is known, which gives LayerNorm vs RMSNorm (shift invariance),
  the gain (Gemma's `1 + w` comes out as it is) and the bias; the result is then checked to
  reproduce the norm's real output on the cached activations;
- the real logits are read from the cache (`unembed.hook_out`, before any soft-capping), or
  computed by the model's own modules when the cache lacks them;
- MLP writes are residual-stream differences of cached activations (`resid_post − resid_mid`,
  or `hook_mlp_out` in parallel blocks), so whatever the MLP holds (gates, post-feed-forward
  norms) is read exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.norms import is_post_norm, post_norm
from lens_alti.reading.records import NormAfterAttention
from lens_alti.reading.spellings import SPELLINGS, spelled
from lens_alti.reading.types import BlockReader, ModelLayout

# The probed final norm must reproduce its real output on the cache this well (relative).
_NORM_CHECK_RTOL = 1e-4


@dataclass(frozen=True)
class FinalNorm:
    """The final norm as it behaves: `out = gain ⊙ n(x) + bias`, with
    `n(x) = (x − mean x)/sqrt(var x + eps)` ("layernorm"), `x/sqrt(mean x² + eps)` ("rmsnorm"),
    or `x` ("none": no final norm, e.g. post-norm Marian)."""

    kind: Literal["layernorm", "rmsnorm", "none"]
    gain: Float[Tensor, " d"] | None
    bias: Float[Tensor, " d"] | None
    eps: float


@dataclass(frozen=True)
class Readout:
    """From the last residual stream to the logits.

    `final_residual[b, q, d]` is the input of the final norm; `real_logits[b, q, vocab]` the
    model's logits before soft-capping; `W_U[d, vocab]`, `b_U[vocab]` (or None);
    `softcap` is the logit soft-capping constant c (`c·tanh(z/c)` is applied after the
    unembedding) or None.
    """

    final_residual: Float[Tensor, "b q d"]
    norm: FinalNorm
    W_U: Float[Tensor, "d vocab"]
    b_U: Float[Tensor, " vocab"] | None
    real_logits: Float[Tensor, "b q vocab"]
    softcap: float | None


@dataclass(frozen=True)
class DirectWrite:
    """A write into the residual stream that belongs to no source token (an MLP output).

    `output[b, q, d]` is what the sublayer adds; `norm` the post-norm applied to
    (residual + output) in post-norm models (placement "block"), else None.
    """

    name: str
    layer: int
    output: Float[Tensor, "b q d"]
    norm: NormAfterAttention | None


@dataclass(frozen=True)
class Step:
    """One step of the stack, in forward order: an attention block or a direct write.

    `parallel`: a write that runs beside the layer's attention on the same input (GPT-J, NeoX's MLP).
    """

    kind: Literal["self", "cross", "write"]
    layer: int
    hooks: tuple[str, ...]
    build: Callable[[Any], Any]  # cache -> AttentionBlock (self, cross) or DirectWrite (write)
    parallel: bool = False


@dataclass(frozen=True)
class LogitLayout:
    """What logit attribution reads: the embedding, the steps and the readout.

    `readout(cache, rows=None)`: with `rows[b]` or `rows[b, m]`, every per-position tensor of the
    readout is read at those positions of item b only (`[b, 1, ...]` or `[b, m, ...]`), so the
    logits of other positions are never formed. `readout_hooks`: what the readout reads (the last residual stream).
    """

    family: Literal["decoder", "encoder_decoder"]
    embedding_hook: str
    steps: list[Step]
    readout: Callable[..., Readout]
    hooks: tuple[str, ...]
    readout_hooks: tuple[str, ...] = ()

    def layer_hooks(self) -> dict[int, tuple[str, ...]]:
        """The hooks of each layer's steps; the embedding with layer 0 and the readout with the last layer
        (what running one layer again must keep, `lens_alti.reading.replay`)."""
        by_layer: dict[int, list[str]] = {}
        for step in self.steps:
            by_layer.setdefault(step.layer, []).extend(step.hooks)
        if by_layer:
            by_layer[min(by_layer)].append(self.embedding_hook)
            by_layer[max(by_layer)].extend(self.readout_hooks)
        return {layer: tuple(dict.fromkeys(hooks)) for layer, hooks in by_layer.items()}


def _final_norm_module(model: Any, stack: str) -> Any | None:
    name = "ln_final" if stack == "blocks" else "decoder_ln_final"
    return getattr(model, name, None)


def _eps(module: Any) -> float | None:
    for obj in (module, spelled(module, "wrapped", None), getattr(module, "cfg", None)):
        value = spelled(obj, "eps", None) if obj is not None else None
        if isinstance(value, (int, float)):
            return float(value)
    return None


@torch.no_grad()
def probe_norm(module: Any, d_model: int, name: str) -> FinalNorm:
    """Read a norm from its behaviour: kind (shift invariance), gain and bias.

    Probes (in the module's dtype): `0` gives the bias; two zero-mean ±1 patterns (mean 0,
    known variance and RMS) give the gain per component; adding a constant shift tells a
    LayerNorm (output unchanged) from an RMSNorm.
    """
    eps = _eps(module)
    if eps is None:
        raise UnsupportedModelError(f"{name}: cannot read the norm's epsilon (none of {SPELLINGS['eps']})")
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    pattern = torch.ones(d_model, dtype=torch.float64)
    pattern[1::2] = -1.0
    if d_model % 2:
        pattern[-1] = 0.0  # zero mean for odd d_model
    probes = torch.stack([torch.zeros(d_model, dtype=torch.float64), pattern, pattern.roll(1), pattern + 3.0])
    out = module(probes[None].to(dtype=dtype, device=device))[0].to(torch.float64).cpu()
    bias = out[0]
    layer_norm = bool(torch.allclose(out[3], out[1], rtol=1e-4, atol=1e-4 * float(out[1].abs().max())))
    var = pattern.square().mean()  # mean 0: variance and mean square agree
    norm_scale = (var + eps).sqrt()
    gain = torch.where(pattern != 0, (out[1] - bias) * norm_scale / pattern.where(pattern != 0, 1.0), 0.0)
    other = pattern.roll(1)
    gain = torch.where(pattern != 0, gain, (out[2] - bias) * norm_scale / other.where(other != 0, 1.0))
    kind: Literal["layernorm", "rmsnorm"] = "layernorm" if layer_norm else "rmsnorm"
    has_bias = bool(bias.abs().max() > 0)
    return FinalNorm(kind, gain, bias if has_bias else None, eps)


def apply_norm(norm: FinalNorm, x: Tensor) -> Tensor:
    """The norm as read, applied to `x[..., d]` in float64."""
    x = x.to(torch.float64)
    if norm.kind == "none":
        return x
    if norm.kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    out = x / (x.square().mean(-1, keepdim=True) + norm.eps).sqrt()
    out = out if norm.gain is None else out * norm.gain.to(x.device)
    return out if norm.bias is None else out + norm.bias.to(x.device)


def _softcap(model: Any) -> float | None:
    cfg = model.cfg
    for attr in ("output_logits_soft_cap", "final_logit_softcapping"):
        value = getattr(cfg, attr, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    value = getattr(hf_cfg, "final_logit_softcapping", None)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _readout_reader(model: Any, stack: str, n_layers: int) -> tuple[Callable[..., Readout], tuple[str, ...]]:
    last = f"{stack}.{n_layers - 1}.hook_resid_post"
    module = _final_norm_module(model, stack)
    d_model = int(model.cfg.d_model)
    norm_name = "ln_final" if stack == "blocks" else "decoder_ln_final"
    cached: dict[str, FinalNorm] = {}

    def read(cache: Any, rows: Tensor | None = None) -> Readout:
        def at(t: Tensor) -> Tensor:  # the explained positions of each item only, [b, m, ...]
            if rows is None:
                return t
            index = rows.to(t.device).view(t.shape[0], -1, *([1] * (t.dim() - 2)))
            return t.gather(1, index.expand(*index.shape[:2], *t.shape[2:]))

        x = at(cache[last])
        if "norm" not in cached:
            cached["norm"] = probe_norm(module, d_model, norm_name) if module is not None else FinalNorm(
                "none", None, None, 0.0
            )
        norm = cached["norm"]
        with torch.no_grad():
            if f"{norm_name}.hook_out" in cache.keys():
                real_norm_out = at(cache[f"{norm_name}.hook_out"])
            elif module is not None:
                real_norm_out = module(x)
            else:
                real_norm_out = x
            if "unembed.hook_out" in cache.keys():
                logits = at(cache["unembed.hook_out"])
            else:
                logits = model.unembed(real_norm_out)
        mine = apply_norm(norm, x)
        err = float((mine - real_norm_out.to(torch.float64)).abs().max())
        ref = float(real_norm_out.abs().max())
        if module is not None and not err <= _NORM_CHECK_RTOL * max(ref, 1e-30):
            raise UnsupportedModelError(
                f"{norm_name}: the final norm does not behave as a {norm.kind} with the gain and bias its probes "
                f"gave (max|Δ| = {err:.3g} of max|out| = {ref:.3g}); it cannot be linearised exactly"
            )
        norm = _rescaled(norm, at(cache["unembed.hook_in"]) if "unembed.hook_in" in cache.keys() else None,
                         real_norm_out, norm_name)
        W_U = model.W_U.detach()
        with torch.no_grad():
            b_U = model.unembed(torch.zeros(1, 1, d_model, dtype=W_U.dtype, device=W_U.device))[0, 0].detach()
        return Readout(x, norm, W_U, b_U if bool(b_U.abs().max() > 0) else None, logits, _softcap(model))

    return read, (last,)


def _rescaled(norm: FinalNorm, unembed_in: Tensor | None, norm_out: Tensor, norm_name: str) -> FinalNorm:
    """Absorb a constant factor between the final norm and the unembedding (T5's d_model^-0.5 of tied
    embeddings) into the norm's gain and bias; refuse anything else between them."""
    if unembed_in is None:
        return norm
    into = unembed_in.to(torch.float64)
    out = norm_out.to(torch.float64)
    if torch.equal(into, out):
        return norm
    alpha = float((into * out).sum() / (out * out).sum().clamp(min=1e-300))
    err = float((into - alpha * out).abs().max())
    if not err <= _NORM_CHECK_RTOL * max(float(into.abs().max()), 1e-30):
        raise UnsupportedModelError(
            f"{norm_name}: the unembedding does not read the final norm's output (nor a constant multiple of it); "
            f"max|Δ| = {err:.3g}: the readout cannot be linearised"
        )
    gain = (torch.ones(out.shape[-1], dtype=torch.float64) if norm.gain is None else norm.gain) * alpha
    bias = None if norm.bias is None else norm.bias * alpha
    kind = norm.kind
    if kind == "none":  # a pure rescaling: an RMS-free "norm" with gain alpha and no scale
        raise UnsupportedModelError(f"{norm_name}: a rescaling before the unembedding without a final norm")
    return FinalNorm(kind, gain, bias, norm.eps)


def _decoder_only(model: Any, layout: ModelLayout) -> LogitLayout:
    readers: list[BlockReader] = layout.blocks["self"]
    n = len(readers)
    if hasattr(model, "blocks") and n != len(model.blocks):  # RWKV: time and channel mixing per layer
        raise UnsupportedModelError(
            f"{layout.architecture}: its layers have {n // max(1, len(model.blocks))} token-mixing steps each "
            f"({', '.join(r.name for r in readers[:2])}) and no token-wise MLP; logit attribution and routes "
            "read one token mixer and one MLP per layer. Use attribute() for this model"
        )
    hook_dict = getattr(model, "hook_dict", None)
    attn_only = bool(getattr(model.cfg, "attn_only", False))
    steps: list[Step] = []
    hooks: list[str] = ["blocks.0.hook_resid_pre"]
    for layer, reader in enumerate(readers):
        p = f"blocks.{layer}"
        steps.append(Step("self", layer, reader.hooks, reader.build))
        hooks += reader.hooks
        if attn_only:
            continue
        if f"{p}.hook_mlp_out" in reader.hooks:  # parallel attention + MLP (GPT-J, NeoX)
            names: tuple[str, ...] = (f"{p}.hook_mlp_out",)

            def write(cache: Any, layer: int = layer, p: str = p) -> DirectWrite:
                return DirectWrite(f"{p}.mlp", layer, cache[f"{p}.hook_mlp_out"], None)

            build = write
        elif hook_dict is None or f"{p}.hook_resid_mid" in hook_dict or f"{reader.name}.hook_out" not in reader.hooks:
            names = (f"{p}.hook_resid_post", f"{p}.hook_resid_mid")
            absent = [h for h in names if hook_dict is not None and h not in hook_dict]
            if absent:  # Mamba, RecurrentGemma layers: no run can record it
                raise UnsupportedModelError(
                    f"{layout.architecture}: layer {layer} ({reader.name}) has no {', '.join(absent)} in the bridge, "
                    "so the write after its token mixer cannot be read from any cache; logit attribution and "
                    "routes need it. Use attribute() for this model"
                )

            def write_mid(cache: Any, layer: int = layer, p: str = p) -> DirectWrite:
                out = cache[f"{p}.hook_resid_post"] - cache[f"{p}.hook_resid_mid"]
                return DirectWrite(f"{p}.mlp", layer, out, None)

            build = write_mid
        else:  # a mixer block with no resid_mid (Mamba: y = x + mixer(norm(x)), usually no MLP)
            names = (f"{p}.hook_resid_post", f"{p}.hook_resid_pre", f"{reader.name}.hook_out")

            def write_after_mixer(cache: Any, layer: int = layer, p: str = p, mix: str = reader.name) -> DirectWrite:
                out = cache[f"{p}.hook_resid_post"] - cache[f"{p}.hook_resid_pre"] - cache[f"{mix}.hook_out"]
                return DirectWrite(f"{p}.mlp", layer, out, None)

            build = write_after_mixer

        steps.append(Step("write", layer, names, build, parallel=names == (f"{p}.hook_mlp_out",)))
        hooks += names
    read, more = _readout_reader(model, "blocks", n)
    hooks += more
    return LogitLayout("decoder", "blocks.0.hook_resid_pre", steps, read, tuple(dict.fromkeys(hooks)), more)


def _encoder_decoder(model: Any, layout: ModelLayout) -> LogitLayout:
    dec, crs = layout.blocks["decoder_self"], layout.blocks["cross"]
    steps: list[Step] = []
    hooks: list[str] = ["decoder_blocks.0.hook_resid_pre"]
    kind = str(getattr(model.cfg, "normalization_type", "LN"))
    for layer, (s_reader, c_reader) in enumerate(zip(dec, crs, strict=True)):
        p = f"decoder_blocks.{layer}"
        steps.append(Step("self", layer, s_reader.hooks, s_reader.build))
        steps.append(Step("cross", layer, c_reader.hooks, c_reader.build))
        names = (
            f"{p}.hook_resid_post", f"{p}.ln3.hook_in", f"{p}.ln2.hook_out", f"{p}.hook_resid_pre", f"{p}.ln1.hook_in"
        )

        def build(cache: Any, layer: int = layer, p: str = p) -> DirectWrite:
            z = cache[f"{p}.ln3.hook_in"]
            if is_post_norm(cache, p):  # y = LN3(h + mlp(h)), h = the cross-attention sublayer's output
                block = model.decoder_blocks[layer]
                norm = post_norm(block.ln3, z, f"{p}.ln3", kind)
                return DirectWrite(f"{p}.mlp", layer, z - cache[f"{p}.ln2.hook_out"], norm)
            return DirectWrite(f"{p}.mlp", layer, cache[f"{p}.hook_resid_post"] - z, None)

        steps.append(Step("write", layer, names, build))
        hooks += [*s_reader.hooks, *c_reader.hooks, *names]
    for reader in layout.blocks["encoder"]:
        hooks += reader.hooks
    read, more = _readout_reader(model, "decoder_blocks", len(dec))
    hooks += more
    return LogitLayout(
        "encoder_decoder", "decoder_blocks.0.hook_resid_pre", steps, read, tuple(dict.fromkeys(hooks)), more
    )


def logit_layout(model: Any, layout: ModelLayout) -> LogitLayout:
    """The logit-attribution layout of `model` (decoder-only or encoder-decoder)."""
    if layout.family == "encoder":
        raise UnsupportedModelError(
            f"{layout.architecture}: an encoder has no next-token logits to explain; logit attribution needs a "
            "decoder-only or an encoder-decoder model"
        )
    if not hasattr(model, "W_U") or not hasattr(model, "unembed"):
        raise UnsupportedModelError(f"{layout.architecture}: the model has no unembedding (W_U) to read logits from")
    if layout.family == "decoder":
        return _decoder_only(model, layout)
    if "merged" in layout.blocks:
        raise UnsupportedModelError(
            f"{layout.architecture}: its decoder merges self- and cross-attention in one block (reading/merged.py); "
            "logit attribution reads separate decoder self- and cross-attention blocks, so it is not available for "
            "this model (attribute() is)"
        )
    return _encoder_decoder(model, layout)


# Read by `run_with_cache` besides the layouts' own hooks: the logits and final norm (the readout
# falls back on them) and the embeddings' inputs (attribute's check of an encoder-decoder's target).
_READOUT_EXTRA = ("unembed.hook_in", "unembed.hook_out", "ln_final.hook_out", "decoder_ln_final.hook_out")
_EMBED_INPUTS = ("embed.hook_in", "decoder_embed.hook_in")


def readout_hooks(model: Any, layout: ModelLayout) -> set[str]:
    """The hooks `LogitLayout.readout` reads (the last residual stream, the final norm's output, the
    unembedding's input and output), with each self-attention layer's write point of a decoder-only
    model, `attention_writes(model, layout)`: what direct-effect patching records from its clean run."""
    last = f"blocks.{len(layout.blocks['self']) - 1}.hook_resid_post"
    return {last, *_READOUT_EXTRA, *attention_writes(model, layout)}


def attention_writes(model: Any, layout: ModelLayout) -> list[str]:
    """Per layer of a decoder-only model, the hook whose value at a position changes exactly by what that
    layer's attention writes there: `hook_resid_mid` (the stream after the attention block), or
    `hook_attn_out` in parallel blocks (GPT-J, NeoX), which have no `hook_resid_mid`."""
    hook_dict = getattr(model, "hook_dict", {})
    out = []
    for layer in range(len(layout.blocks["self"])):
        mid, attn = f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_attn_out"
        out.append(mid if mid in hook_dict else attn)
    return out


def recorded_hooks(model: Any, layout: ModelLayout) -> set[str]:
    """Every hook a logit attribution (and the ALTI rollout under it) reads: `names_filter` for `run_with_cache`."""
    return set(layout.hook_names()) | set(logit_layout(model, layout).hooks) | {*_READOUT_EXTRA, *_EMBED_INPUTS}
