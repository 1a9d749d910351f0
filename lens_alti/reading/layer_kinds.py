"""What kind of token mixer a layer has: attention, or a recurrent / convolutional mixer.

Hybrid models (Jamba, Zamba2, Qwen3-Next...) mix attention layers with layers that have no
attention hooks at all; attention-free models (Mamba, RWKV) have only the latter. The kind is
read from which hooks and submodules the bridge really has, never from the model's name.
"""

from __future__ import annotations

from typing import Any

import torch

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.spellings import spelled

# Submodules of a bridge block (or of its Hugging Face layer) that hold a non-attention mixer
# (`attention`: Falcon-H1's attention beside its mixer).
MIXER_ATTRIBUTES = ("mixer", "mamba", "linear_attn", "temporal_block", "recurrent", "conv", "attention", "ssm")


def original(component: Any) -> Any:
    """The Hugging Face module a bridge component wraps (the component itself if none)."""
    return spelled(component, "wrapped", component)


def _hooks(model: Any) -> set[str] | None:
    try:
        return set(model.hook_dict)
    except Exception:  # noqa: BLE001 - a model without a hook registry: decide from submodules
        return None


def mixer_kind(model: Any, layer: int, prefix: str = "blocks") -> str:
    """"attention" when layer `layer` has an attention module, else the mixer's name (or NO_HOOKS).

    The name is the class of the mixer's Hugging Face module (e.g. "MambaMixer"), so the
    error a user sees names what the layer really is.
    """
    block = getattr(model, prefix)[layer]
    if getattr(block, "attn", None) is not None:
        return "attention"  # `require_attention_hooks` says precisely if its hooks are missing
    for name in MIXER_ATTRIBUTES:
        sub = getattr(block, name, None)
        if sub is not None:
            return type(original(sub)).__name__
    hf_layer = original(block)
    for name in MIXER_ATTRIBUTES:
        sub = getattr(hf_layer, name, None)
        if sub is not None:
            return type(sub).__name__
    return NO_HOOKS


# `mixer_kind` when a layer has neither attention hooks nor a recognisable mixer.
NO_HOOKS = "no attention hooks"


def parallel_mixer(model: Any, layer: int, prefix: str = "blocks") -> str | None:
    """The class of a non-attention mixer that runs beside the layer's attention (Falcon-H1), or None."""
    block = getattr(model, prefix)[layer]
    for name in MIXER_ATTRIBUTES:
        if name == "attention":
            continue
        sub = getattr(block, name, None)
        if isinstance(sub, torch.nn.Module):
            return type(original(sub)).__name__
    return None


def require_attention_hooks(model: Any, name: str, arch: str, layer: int, module: Any = None) -> None:
    """Refuse an attention module whose bridge has no `hook_pattern` or `hook_v` at all.

    Such activations can never be cached, whatever the attention implementation (so the
    "use eager attention" advice of a missing hook would be wrong): LongT5's local attention
    records no pattern; JetMoE's mixture of attention heads computes values per expert
    inside the module.
    """
    hooks = _hooks(model)
    if hooks is None:
        return
    module = type(original(module if module is not None else model.blocks[layer].attn)).__name__
    if f"{name}.hook_pattern" not in hooks:
        raise UnsupportedModelError(
            f"{arch}: layer {layer}'s attention ({name}, {module}) has no hook_pattern in the bridge, so no cache "
            "can hold its attention probabilities and the block cannot be decomposed; this attention layout is "
            "not supported"
        )
    if f"{name}.hook_v" not in hooks:
        raise UnsupportedModelError(
            f"{arch}: layer {layer}'s attention ({name}, {module}) has a hook_pattern but the bridge exposes no "
            "hook_v (the values each head averages), so no cache can hold them and the block cannot be "
            "decomposed; this attention layout is not supported"
        )
