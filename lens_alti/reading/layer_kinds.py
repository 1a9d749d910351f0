"""What kind of token mixer a layer has: attention, or a recurrent / convolutional mixer.

Hybrid models (Jamba, Zamba2, Qwen3-Next...) mix attention layers with layers that have no
attention hooks at all; attention-free models (Mamba, RWKV) have only the latter. The kind is
read from which hooks and submodules the bridge really has, never from the model's name.
"""

from __future__ import annotations

from typing import Any

from lens_alti.errors import UnsupportedModelError

# Submodules of a bridge block (or of its Hugging Face layer) that hold a non-attention mixer.
_MIXER_ATTRIBUTES = ("mixer", "mamba", "linear_attn", "temporal_block", "recurrent", "conv", "attention", "ssm")


def original(component: Any) -> Any:
    """The Hugging Face module a bridge component wraps (the component itself if none)."""
    return getattr(component, "_original_component", None) or component


def _hooks(model: Any) -> set[str] | None:
    try:
        return set(model.hook_dict)
    except Exception:  # noqa: BLE001 - a model without a hook registry: decide from submodules
        return None


def mixer_kind(model: Any, layer: int, prefix: str = "blocks") -> str:
    """"attention" when layer `layer` has an attention module with a pattern hook, else the mixer's name.

    The name is the class of the mixer's Hugging Face module (e.g. "MambaMixer"), so the
    error a user sees names what the layer really is.
    """
    block = getattr(model, prefix)[layer]
    hooks = _hooks(model)
    attn = getattr(block, "attn", None)
    if attn is not None and (hooks is None or f"{prefix}.{layer}.attn.hook_pattern" in hooks):
        return "attention"
    for name in _MIXER_ATTRIBUTES:
        sub = getattr(block, name, None)
        if sub is not None:
            return type(original(sub)).__name__
    hf_layer = original(block)
    for name in _MIXER_ATTRIBUTES:
        sub = getattr(hf_layer, name, None)
        if sub is not None:
            return type(sub).__name__
    return f"{type(hf_layer).__name__} (no attention hooks)"


def require_attention_hooks(model: Any, name: str, arch: str, layer: int) -> None:
    """Refuse an attention module whose bridge exposes no `hook_v` (values not cached at all).

    JetMoE's mixture of attention heads computes values per expert inside the module; no
    hook carries them, so no cache can hold them (this is not an eager-attention problem).
    """
    hooks = _hooks(model)
    if hooks is None or f"{name}.hook_pattern" not in hooks:
        return
    if f"{name}.hook_v" not in hooks:
        module = type(original(model.blocks[layer].attn)).__name__
        raise UnsupportedModelError(
            f"{arch}: layer {layer}'s attention ({name}, {module}) has a hook_pattern but the bridge exposes no "
            "hook_v (the values each head averages), so no cache can hold them and the block cannot be "
            "decomposed; this attention layout is not supported"
        )
