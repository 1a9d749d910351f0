"""Read attention blocks out of a TransformerLens cache into neutral records.

This is the only module that knows hook names and model families. Each reader lists
the hooks it needs (so missing ones are reported together, up front) and turns one
layer's activations and weights into an `AttentionBlock`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lens_alti.errors import MissingHooksError, NotACacheError, UnsupportedModelError
from lens_alti.records import AttentionBlock

Family = Literal["decoder", "encoder", "encoder_decoder"]

# Decoder-only architectures whose attention block is not the plain pre-norm layout.
_POST_ATTENTION_NORM = ("Gemma2", "Gemma3", "Olmo2")

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
    if any(arch.startswith(p) for p in _POST_ATTENTION_NORM):
        raise UnsupportedModelError(
            f"{arch}: the post-attention norm (spec 1d) is not supported yet by the bridge reader"
        )
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    readers = []
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        hooks = [f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre"]
        if parallel:
            hooks += [f"{p}.hook_resid_post", f"{p}.hook_mlp_out"]
        else:
            hooks += [f"{p}.hook_resid_mid"]

        def build(cache: Any, layer: int = layer, p: str = p) -> AttentionBlock:
            attn = model.blocks[layer].attn
            W_O = _detach(attn.W_O)
            x = cache[f"{p}.hook_resid_pre"]
            if parallel:
                mlp = cache[f"{p}.hook_mlp_out"]
                post = cache[f"{p}.hook_resid_post"]
                # Default: y = x + attn_out; "residual" mode counts the MLP (a function
                # of x_i alone) as part of the receiver's own residual term.
                residual, target = (x + mlp, post) if parallel_mlp == "residual" else (x, post - mlp)
            else:
                residual, target = x, cache[f"{p}.hook_resid_mid"]
            return AttentionBlock(
                name=f"{p}.attn",
                layer=layer,
                pattern=cache[f"{p}.attn.hook_pattern"],
                values=_expand_kv(cache[f"{p}.attn.hook_v"], W_O.shape[0], f"{p}.attn"),
                W_O=W_O,
                b_O=_detach(attn.b_O),
                residual=residual,
                target=target,
                architecture=arch,
            )

        readers.append(BlockReader(f"{p}.attn", tuple(hooks), build))
    return ModelLayout("decoder", arch, _weight_processing(model), {"self": readers})


def _is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - depends on the installed TransformerLens
        return False
    return isinstance(model, TransformerBridge)


def model_layout(model: Any, parallel_mlp: str = "exclude") -> ModelLayout:
    """Describe `model` (a TransformerBridge) for reading; raise if it is unsupported."""
    if parallel_mlp not in ("exclude", "residual"):
        raise ValueError(f"parallel_mlp must be 'exclude' or 'residual', got {parallel_mlp!r}")
    if not _is_bridge(model):
        raise NotACacheError(
            f"the cache's model is a {type(model).__name__}; lens_alti reads caches of "
            "transformer_lens TransformerBridge models (model.run_with_cache(tokens))"
        )
    cfg = model.cfg
    if getattr(cfg, "is_encoder_decoder", False) or hasattr(model, "encoder_blocks"):
        raise UnsupportedModelError(f"{cfg.architecture}: encoder-decoder models are not supported yet")
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedModelError(f"{cfg.architecture}: encoder (bidirectional) models are not supported yet")
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
