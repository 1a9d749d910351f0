"""Read caches of the legacy TransformerLens 3.x models into neutral records.

`HookedTransformer`, `HookedEncoder` (BERT) and `HookedEncoderDecoder` (T5) were removed in
TransformerLens 4.0 but most existing notebooks still build them. Their hook layout differs
from the TransformerBridge's:

- decoder-only: `blocks.{l}`; the norms have `hook_scale`/`hook_normalized` but no
  `hook_in`/`hook_out`; parallel attention+MLP and attention-only models have no
  `hook_resid_mid`; under grouped-query attention `hook_v` has `n_key_value_heads` heads
  (the `W_V` property is expanded, `_W_V` is the stored weight; values come from `hook_v`);
- BERT (`HookedEncoder`): post-LN, `hook_attn_out` is the raw attention output and
  `hook_resid_mid = resid_pre + attn_out` is the input of `ln1`, whose output is
  `hook_resid_post − hook_mlp_out`;
- T5 (`HookedEncoderDecoder`): `encoder.{l}` and `decoder.{l}` with `attn` and `cross_attn`;
  `hook_resid_mid` is the self-attention output and the cross-attention's residual,
  `hook_resid_mid_cross` the cross-attention output.

The few names the shared readers expect and these caches lack (a norm's `hook_in`/`hook_out`,
the attention output of a parallel block) are supplied by `_DerivedCache` from real hooks,
so the record building in `lens_alti.reading.blocks` is reused unchanged.

Weight processing (`HookedTransformer.from_pretrained`'s default fold_ln,
center_writing_weights, fold_value_biases) is not recorded by TransformerLens; it is detected
from the weights. The reader always uses the weights the forward pass used, so the
decomposition is exact either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.blocks import sublayer_block
from lens_alti.reading.processing import RAW, _is_centred
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.spellings import norm_eps
from lens_alti.reading.types import BlockReader, ModelLayout

_HOOKED_CLASSES = ("HookedEncoderDecoder", "HookedEncoder", "HookedTransformer")
# Decoders of TransformerLens 3.x whose ln1 normalises the attention output itself (OLMo-2/3); Gemma-2/3
# set cfg.use_normalization_before_and_after (a norm on the attention output, docs/spec.md §1d).
_POST_NORM_DECODERS = ("Olmo2", "Olmo3", "Gemma2", "Gemma3")
_NO_PROCESSING_ADVICE = "HookedTransformer.from_pretrained_no_processing gives the unprocessed model's numbers"


def hooked_class(model: Any) -> str | None:
    """"HookedTransformer", "HookedEncoder" or "HookedEncoderDecoder" (or a subclass), else None.

    Detected by class name and module, so nothing is imported that the installed
    TransformerLens may lack.
    """
    for cls in type(model).__mro__:
        if cls.__name__ in _HOOKED_CLASSES and cls.__module__.startswith("transformer_lens"):
            return cls.__name__
    return None


class _DerivedCache:
    """A read-only view of a cache that adds entries computed from real hooks."""

    def __init__(self, cache: Any, derived: dict[str, Callable[[Any], Tensor]]) -> None:
        self._cache = cache
        self._derived = derived

    def __getitem__(self, name: str) -> Tensor:
        make = self._derived.get(name)
        return make(self._cache) if make is not None else self._cache[name]


@dataclass(frozen=True)
class _NormWeights:
    """A TransformerLens 3.x LayerNorm/RMSNorm (`w`, `b`, `eps`) as `_post_norm` reads norms."""

    weight: Tensor
    bias: Tensor | None
    eps: float


def _norm_weights(norm: Any, name: str) -> _NormWeights:
    weight = getattr(norm, "w", None)
    if weight is None:
        raise UnsupportedModelError(f"{name}: a normalisation without weights (folded?) cannot be linearised")
    bias = getattr(norm, "b", None)
    return _NormWeights(weight.detach(), None if bias is None else bias.detach(), norm_eps(norm))


def _has_value_bias(attn: Any) -> bool:
    b_V = attn._b_V if hasattr(attn, "_b_V") else getattr(attn, "b_V", None)  # _b_V: unexpanded under GQA
    return b_V is not None and bool(b_V.detach().any())


def hooked_weight_processing(model: Any, attns: list[Any]) -> str:
    """Which of HookedTransformer's weight processing steps changed the numbers ALTI reads.

    TransformerLens records none of them; they are recognised from the weights:
    - fold_ln (normalization_type "LNPre"/"RMSPre") moves the norm's weights into
      W_Q/W_K/W_V: values, W_O, b_O and the residual stream are unchanged, so on its own it
      leaves ALTI exactly as for the unprocessed model and counts as "raw";
    - center_writing_weights (every W_O has zero mean over d_model) centres the residual stream;
    - fold_value_biases moves Σ_h b_V·W_O (after fold_ln also the norm's β·W_V) into b_O, from the
      sources to the bias term: recognised when every b_V is 0 while some b_O is not, in a model
      whose norms were folded or whose writing weights were centred (an unprocessed GPT-Neo has
      no value bias and an output bias, and is raw).
    """
    centred = bool(attns) and all(_is_centred(a.W_O) for a in attns)
    folded = str(getattr(model.cfg, "normalization_type", "")) in ("LNPre", "RMSPre")
    value_biases_folded = (
        (folded or centred)
        and not any(_has_value_bias(a) for a in attns)
        and any(a.b_O is not None and bool(a.b_O.detach().any()) for a in attns)
    )
    if not (centred or value_biases_folded):
        return RAW
    done = {"fold_ln": folded, "center_writing_weights": centred, "fold_value_biases": value_biases_folded}
    steps = [name for name, applied in done.items() if applied]
    return f"processed (HookedTransformer weight processing: {', '.join(steps)}; {_NO_PROCESSING_ADVICE})"


def _alias(name: str) -> Callable[[Any], Tensor]:
    """A derived hook that is another hook of the cache."""
    return lambda cache: cache[name]


def _difference(minuend: str, subtrahend: str) -> Callable[[Any], Tensor]:
    """A derived hook: cache[minuend] − cache[subtrahend]."""
    return lambda cache: cache[minuend] - cache[subtrahend]


def _decoder_readers(model: Any, arch: str, parallel_mlp: str) -> list[BlockReader]:
    """Self-attention of a HookedTransformer (pre-norm; sequential, parallel or attention-only)."""
    cfg = model.cfg
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    attn_only = bool(getattr(cfg, "attn_only", False)) and not parallel
    readers = []
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        attn_hooks: tuple[str, ...] = (f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre")
        hooks: tuple[str, ...]
        derived: dict[str, Callable[[Any], Tensor]] = {}
        if parallel:
            # Default: y = x + attn_out = resid_post − mlp_out; "residual" mode counts the MLP
            # output (a function of x_i alone) in the receiver's own term, y = resid_post.
            hooks = (*attn_hooks, f"{p}.hook_resid_post", f"{p}.hook_mlp_out")
            if parallel_mlp == "residual":
                output = f"{p}.hook_resid_post"
            else:
                output = f"{p}.hook_resid_post - {p}.hook_mlp_out"
                derived[output] = _difference(f"{p}.hook_resid_post", f"{p}.hook_mlp_out")
        else:
            output = f"{p}.hook_resid_post" if attn_only else f"{p}.hook_resid_mid"
            hooks = (*attn_hooks, output)
        names = {"attn": f"{p}.attn", "output": output}

        def build(
            cache: Any, layer: int = layer, p: str = p, names: dict[str, str] = names, derived: dict = derived
        ) -> AttentionBlock:
            x = cache[f"{p}.hook_resid_pre"]
            residual = x + cache[f"{p}.hook_mlp_out"] if parallel and parallel_mlp == "residual" else x
            return sublayer_block(
                _DerivedCache(cache, derived), model, model.blocks[layer].attn, names, layer=layer, arch=arch,
                residual=residual, post=False, norm_component=None, column="diagonal",
            )

        readers.append(BlockReader(names["attn"], hooks, build))
    return readers


def _bert_readers(model: Any, arch: str) -> list[BlockReader]:
    """Self-attention of a HookedEncoder (BERT, post-LN): y = LN1(resid_pre + attn_out)."""
    readers = []
    for layer in range(len(model.blocks)):
        p = f"blocks.{layer}"
        names = {"attn": f"{p}.attn", "norm": f"{p}.ln1"}
        hooks = (
            f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre",
            f"{p}.hook_resid_mid", f"{p}.hook_resid_post", f"{p}.hook_mlp_out",
        )
        derived: dict[str, Callable[[Any], Tensor]] = {
            f"{p}.ln1.hook_in": _alias(f"{p}.hook_resid_mid"),
            f"{p}.ln1.hook_out": _difference(f"{p}.hook_resid_post", f"{p}.hook_mlp_out"),
        }

        def build(
            cache: Any, layer: int = layer, p: str = p, names: dict[str, str] = names, derived: dict = derived
        ) -> AttentionBlock:
            block = model.blocks[layer]
            return sublayer_block(
                _DerivedCache(cache, derived), model, block.attn, names, layer=layer, arch=arch,
                residual=cache[f"{p}.hook_resid_pre"], post=True,
                norm_component=_norm_weights(block.ln1, names["norm"]), column="diagonal",
            )

        readers.append(BlockReader(names["attn"], hooks, build))
    return readers


def _t5_readers(model: Any, arch: str) -> dict[str, list[BlockReader]]:
    """Encoder self-, decoder self- and cross-attention of a HookedEncoderDecoder (T5, pre-RMSNorm)."""

    def reader(
        stack: str, layer: int, attn: str, residual: str, output: str, column: Literal["diagonal", "last"]
    ) -> BlockReader:
        p = f"{stack}.{layer}"
        names = {"attn": f"{p}.{attn}", "output": f"{p}.{output}"}
        hooks = (f"{p}.{attn}.hook_pattern", f"{p}.{attn}.hook_v", f"{p}.{residual}", f"{p}.{output}")

        def build(cache: Any) -> AttentionBlock:
            module = getattr(getattr(model, stack)[layer], attn)
            return sublayer_block(
                cache, model, module, names, layer=layer, arch=arch, residual=cache[f"{p}.{residual}"],
                post=False, norm_component=None, column=column,
            )

        return BlockReader(names["attn"], hooks, build)

    n_enc, n_dec = len(model.encoder), len(model.decoder)
    return {
        "encoder": [reader("encoder", i, "attn", "hook_resid_pre", "hook_resid_mid", "diagonal") for i in range(n_enc)],
        "decoder_self": [
            reader("decoder", i, "attn", "hook_resid_pre", "hook_resid_mid", "diagonal") for i in range(n_dec)
        ],
        # The decoder stream after self-attention enters cross-attention as an extra, last source.
        "cross": [
            reader("decoder", i, "cross_attn", "hook_resid_mid", "hook_resid_mid_cross", "last") for i in range(n_dec)
        ],
    }


def hooked_layout(model: Any, parallel_mlp: str = "exclude") -> ModelLayout:
    """Describe a TransformerLens 3.x HookedTransformer / HookedEncoder / HookedEncoderDecoder."""
    kind = hooked_class(model)
    cfg = model.cfg
    arch = str(getattr(cfg, "original_architecture", None) or kind)
    if getattr(cfg, "load_in_4bit", False):
        raise UnsupportedModelError(f"{arch}: 4-bit quantised W_O cannot be read; load the model unquantised")
    if kind == "HookedEncoderDecoder":
        if len(model.encoder) == 0 or len(model.decoder) == 0:
            raise UnsupportedModelError(f"{arch}: the model has no encoder or no decoder layers")
        attns = [b.attn for b in model.encoder] + [m for b in model.decoder for m in (b.attn, b.cross_attn)]
        return ModelLayout("encoder_decoder", arch, hooked_weight_processing(model, attns), _t5_readers(model, arch))
    attns = [b.attn for b in model.blocks]
    processing = hooked_weight_processing(model, attns)
    if kind == "HookedEncoder":
        return ModelLayout("encoder", arch, processing, {"self": _bert_readers(model, arch)})
    if getattr(cfg, "use_normalization_before_and_after", False) or any(
        arch.startswith(p) for p in _POST_NORM_DECODERS
    ):
        raise UnsupportedModelError(f"{arch}: the post-attention norm (docs/spec.md §1d) is not supported yet")
    family: Literal["encoder", "decoder"] = (
        "encoder" if getattr(cfg, "attention_dir", "causal") == "bidirectional" else "decoder"
    )
    return ModelLayout(family, arch, processing, {"self": _decoder_readers(model, arch, parallel_mlp)})
