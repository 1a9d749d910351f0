"""Read attention blocks out of a TransformerLens cache into neutral records.

This is the only module that knows hook names and model families. Each reader lists
the hooks it needs (so missing ones are reported together, up front) and turns one
layer's activations and weights into an `AttentionBlock`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lens_alti.errors import MissingHooksError, NotACacheError, UnsupportedModelError
from lens_alti.records import AttentionBlock, NormAfterAttention

Family = Literal["decoder", "encoder", "encoder_decoder"]

# Norms whose scale is (1 + weight) rather than weight.
_OFFSET_WEIGHT_NORMS = ("Gemma",)

_EAGER_ADVICE = (
    "Patterns are only recorded with eager attention: boot the model with "
    "TransformerBridge.boot_transformers(...) (which forces it) or load the Hugging Face "
    "model with attn_implementation='eager'. If you used names_filter, include these names "
    "(lens_alti.hook_names(model) lists everything attribute() reads)."
)


@dataclass(frozen=True)
class BlockReader:
    """One attention block to read: its hook names and how to build its record."""

    name: str
    hooks: tuple[str, ...]
    build: Callable[[Any], AttentionBlock]


@dataclass(frozen=True)
class ModelLayout:
    """What a model looks like to lens_alti: family, blocks to read, weight processing."""

    family: Family
    architecture: str
    weight_processing: str
    blocks: dict[str, list[BlockReader]]

    def hook_names(self) -> list[str]:
        return [h for readers in self.blocks.values() for r in readers for h in r.hooks]


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _expand_kv(values: Tensor, n_heads: int, name: str) -> Tensor:
    """Grouped-query attention: query head h reads kv head h // (n_heads // n_kv)."""
    n_kv = values.shape[2]
    if n_kv == n_heads:
        return values
    if n_heads % n_kv:
        raise UnsupportedModelError(f"{name}: {n_heads} query heads cannot share {n_kv} key/value heads evenly")
    return values.repeat_interleave(n_heads // n_kv, dim=2)


def _weight_processing(model: Any) -> str:
    if getattr(model, "_weights_processed", False) or getattr(model, "compatibility_mode", False):
        return "processed (enable_compatibility_mode / process_weights: folded norms, centred writing weights)"
    return "raw"


def _bridge_decoder_layout(model: Any, parallel_mlp: str) -> ModelLayout:
    cfg = model.cfg
    arch = str(getattr(cfg, "architecture", None) or type(model).__name__)
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    readers = []
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        hooks = [f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre"]
        # Gemma-2/3, OLMo-2: a norm on the attention output only (spec 1d).
        attn_out_norm = hasattr(model.blocks[layer], "ln1_post")
        if attn_out_norm:
            hooks += [f"{p}.ln1_post.hook_in"]
        if parallel:
            hooks += [f"{p}.hook_resid_post", f"{p}.hook_mlp_out"]
        else:
            hooks += [f"{p}.hook_resid_mid"]

        def build(cache: Any, layer: int = layer, p: str = p, attn_out_norm: bool = attn_out_norm) -> AttentionBlock:
            attn = model.blocks[layer].attn
            x = cache[f"{p}.hook_resid_pre"]
            if parallel:
                mlp = cache[f"{p}.hook_mlp_out"]
                post = cache[f"{p}.hook_resid_post"]
                # Default: y = x + attn_out; "residual" mode counts the MLP (a function
                # of x_i alone) as part of the receiver's own residual term.
                residual, target = (x + mlp, post) if parallel_mlp == "residual" else (x, post - mlp)
            else:
                residual, target = x, cache[f"{p}.hook_resid_mid"]
            norm = None
            if attn_out_norm:
                kind = str(getattr(cfg, "normalization_type", "RMS"))
                norm = _post_norm(
                    model.blocks[layer].ln1_post, cache[f"{p}.ln1_post.hook_in"], f"{p}.ln1_post", kind, "attn_out"
                )
            return _record(cache, attn, f"{p}.attn", layer, arch, residual, target, norm)

        readers.append(BlockReader(f"{p}.attn", tuple(hooks), build))
    return ModelLayout("decoder", arch, _weight_processing(model), {"self": readers})


def _norm_params(component: Any, name: str, default_kind: str) -> tuple[str, Tensor, Tensor | None, float]:
    """(kind, weight, bias, eps) of a bridge normalisation component."""
    inner = getattr(component, "_original_component", component)
    is_rms = "rms" in type(component).__name__.lower() or default_kind == "RMS"
    eps = getattr(inner, "eps", None)
    if eps is None:
        eps = getattr(inner, "variance_epsilon", None)
    weight = getattr(inner, "weight", None)
    if eps is None or weight is None:
        raise UnsupportedModelError(f"{name}: cannot read the normalisation's weight and epsilon to linearise it")
    bias = getattr(inner, "bias", None)
    weight = weight.detach()
    if any(type(inner).__name__.startswith(p) for p in _OFFSET_WEIGHT_NORMS):
        weight = 1.0 + weight.float()
    return ("rmsnorm" if is_rms else "layernorm"), weight, _detach(bias), float(eps)


def _post_norm(
    component: Any, z: Tensor, name: str, default_kind: str, placement: Literal["block", "attn_out"] = "block"
) -> NormAfterAttention:
    """The linearised norm that follows the residual sum z (spec 1b, 1d).

    The scale is computed here from the norm's real input: biased variance with eps
    inside the root (LayerNorm) or the RMS (TransformerLens 4.3 reports a mean-centred
    `hook_scale` for T5, so that hook is not used).
    """
    kind, weight, bias, eps = _norm_params(component, name, default_kind)
    z32 = z.to(torch.float64)
    if kind == "layernorm":
        scale = (z32.var(dim=-1, unbiased=False) + eps).sqrt()
    else:
        scale = (z32.pow(2).mean(dim=-1) + eps).sqrt()
    return NormAfterAttention(kind=kind, placement=placement, weight=weight, bias=bias, scale=scale)


def _is_post_norm(cache: Any, prefix: str) -> bool:
    """Post-norm when the first norm does not read the block input (it reads input + attention)."""
    x, ln_in = cache[f"{prefix}.hook_resid_pre"], cache[f"{prefix}.ln1.hook_in"]
    return not torch.allclose(ln_in, x, rtol=1e-5, atol=1e-6 * float(x.abs().max().clamp(min=1)))


def _sublayer_block(
    cache: Any,
    model: Any,
    attn: Any,
    names: dict[str, str],
    *,
    layer: int,
    arch: str,
    residual: Tensor,
    post: bool,
    norm_component: Any,
    column: Literal["diagonal", "last"],
) -> AttentionBlock:
    """Record of one (self- or cross-) attention sublayer of an encoder or seq2seq block."""
    norm = None
    if post:
        target = cache[f"{names['norm']}.hook_out"]
        kind = str(getattr(model.cfg, "normalization_type", "LN"))
        norm = _post_norm(norm_component, cache[f"{names['norm']}.hook_in"], names["norm"], kind)
    else:
        target = cache[names["output"]]
    return _record(cache, attn, names["attn"], layer, arch, residual, target, norm, column)


def _record(
    cache: Any,
    attn: Any,
    name: str,
    layer: int,
    arch: str,
    residual: Tensor,
    target: Tensor,
    norm: NormAfterAttention | None,
    column: Literal["diagonal", "last"] = "diagonal",
) -> AttentionBlock:
    """The record of attention module `attn` (hooks under `name`), weights read from the module."""
    W_O = _detach(attn.W_O)
    return AttentionBlock(
        name=name,
        layer=layer,
        pattern=cache[f"{name}.hook_pattern"],
        values=_expand_kv(cache[f"{name}.hook_v"], W_O.shape[0], name),
        W_O=W_O,
        b_O=_detach(attn.b_O),
        residual=residual,
        target=target,
        residual_column=column,
        norm=norm,
        architecture=arch,
    )


def _encoder_readers(model: Any, blocks: Any, stack: str, arch: str) -> list[BlockReader]:
    """Self-attention of encoder layers (BERT `blocks`, seq2seq `encoder_blocks`)."""
    readers = []
    for layer in range(len(blocks)):
        p = f"{stack}.{layer}"
        names = {"attn": f"{p}.attn", "norm": f"{p}.ln1", "output": f"{p}.ln2.hook_in"}
        hooks = (
            f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre",
            f"{p}.ln1.hook_in", f"{p}.ln1.hook_out", f"{p}.ln2.hook_in",
        )

        def build(cache: Any, layer: int = layer, p: str = p, names: dict[str, str] = names) -> AttentionBlock:
            block = blocks[layer]
            return _sublayer_block(
                cache, model, block.attn, names, layer=layer, arch=arch, residual=cache[f"{p}.hook_resid_pre"],
                post=_is_post_norm(cache, p), norm_component=block.ln1, column="diagonal",
            )

        readers.append(BlockReader(names["attn"], hooks, build))
    return readers


def _decoder_readers(model: Any, arch: str) -> tuple[list[BlockReader], list[BlockReader]]:
    """Decoder self-attention and cross-attention sublayers of a seq2seq model."""
    self_readers, cross_readers = [], []
    for layer in range(len(model.decoder_blocks)):
        p = f"decoder_blocks.{layer}"
        self_names = {"attn": f"{p}.self_attn", "norm": f"{p}.ln1", "output": f"{p}.ln2.hook_in"}
        cross_names = {"attn": f"{p}.cross_attn", "norm": f"{p}.ln2", "output": f"{p}.ln3.hook_in"}
        common = (f"{p}.hook_resid_pre", f"{p}.ln1.hook_in", f"{p}.ln1.hook_out", f"{p}.ln2.hook_in")
        self_hooks = (f"{p}.self_attn.hook_pattern", f"{p}.self_attn.hook_v", *common)
        cross_hooks = (
            f"{p}.cross_attn.hook_pattern", f"{p}.cross_attn.hook_v", *common,
            f"{p}.ln2.hook_out", f"{p}.ln3.hook_in",
        )

        def build_self(cache: Any, layer: int = layer, p: str = p, names: dict = self_names) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            return _sublayer_block(
                cache, model, block.self_attn, names, layer=layer, arch=arch, residual=cache[f"{p}.hook_resid_pre"],
                post=_is_post_norm(cache, p), norm_component=block.ln1, column="diagonal",
            )

        def build_cross(cache: Any, layer: int = layer, p: str = p, names: dict = cross_names) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            post = _is_post_norm(cache, p)
            # The residual entering cross-attention is the self-attention sublayer's output.
            residual = cache[f"{p}.ln1.hook_out"] if post else cache[f"{p}.ln2.hook_in"]
            return _sublayer_block(
                cache, model, block.cross_attn, names, layer=layer, arch=arch, residual=residual,
                post=post, norm_component=block.ln2, column="last",
            )

        self_readers.append(BlockReader(self_names["attn"], self_hooks, build_self))
        cross_readers.append(BlockReader(cross_names["attn"], cross_hooks, build_cross))
    return self_readers, cross_readers


def _is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - depends on the installed TransformerLens
        return False
    return isinstance(model, TransformerBridge)


def model_layout(model: Any, parallel_mlp: str = "exclude") -> ModelLayout:
    """Describe `model` (a TransformerBridge, or a TransformerLens 3.x Hooked* model) for reading."""
    if parallel_mlp not in ("exclude", "residual"):
        raise ValueError(f"parallel_mlp must be 'exclude' or 'residual', got {parallel_mlp!r}")
    from lens_alti.reading_hooked import hooked_class, hooked_layout  # imports this module

    if hooked_class(model) is not None:
        return hooked_layout(model, parallel_mlp)
    if not _is_bridge(model):
        raise NotACacheError(
            f"the cache's model is a {type(model).__name__}; lens_alti reads caches of "
            "transformer_lens TransformerBridge models, or of HookedTransformer, HookedEncoder and "
            "HookedEncoderDecoder models of TransformerLens 3.x (model.run_with_cache(tokens))"
        )
    cfg = model.cfg
    arch = str(getattr(cfg, "architecture", None) or type(model).__name__)
    processing = _weight_processing(model)
    if hasattr(model, "encoder_blocks") and hasattr(model, "decoder_blocks"):
        if len(model.decoder_blocks) == 0 or len(model.encoder_blocks) == 0:
            raise UnsupportedModelError(f"{arch}: the model has no encoder or no decoder layers")
        dec_self, cross = _decoder_readers(model, arch)
        blocks = {
            "encoder": _encoder_readers(model, model.encoder_blocks, "encoder_blocks", arch),
            "decoder_self": dec_self,
            "cross": cross,
        }
        return ModelLayout("encoder_decoder", arch, processing, blocks)
    if not hasattr(model, "blocks"):
        raise UnsupportedModelError(f"{arch}: no attention blocks found (neither `blocks` nor `encoder_blocks`)")
    if getattr(cfg, "attention_dir", "causal") == "bidirectional":
        return ModelLayout("encoder", arch, processing, {"self": _encoder_readers(model, model.blocks, "blocks", arch)})
    return _bridge_decoder_layout(model, parallel_mlp)


def cache_and_model(cache: Any) -> tuple[Any, Any]:
    """Check `cache` is an ActivationCache with its model attached; return (cache, model)."""
    try:
        from transformer_lens import ActivationCache
    except ImportError as exc:  # pragma: no cover
        raise NotACacheError("transformer_lens is not installed") from exc
    if not isinstance(cache, ActivationCache):
        raise NotACacheError(
            f"expected the ActivationCache from `logits, cache = model.run_with_cache(tokens)`, "
            f"got {type(cache).__name__}"
        )
    model = getattr(cache, "model", None)
    if model is None:
        raise NotACacheError("this ActivationCache has no model attached (cache.model is None)")
    if not getattr(cache, "has_batch_dim", True):
        raise NotACacheError(
            "the cache has no batch dimension (remove_batch_dim was applied); run attribute on the batched cache"
        )
    return cache, model


def check_hooks(cache: Any, layout: ModelLayout) -> None:
    """Raise MissingHooksError listing every hook the layout needs that the cache lacks."""
    have = set(cache.keys())
    missing = [h for h in layout.hook_names() if h not in have]
    if missing:
        raise MissingHooksError(missing, _EAGER_ADVICE)
