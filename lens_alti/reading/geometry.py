"""Per-layer attention geometry: value layouts, grouped-query heads, shape validation.

Every reader passes its pattern, values and W_O through `checked_values` before any
arithmetic, so a hook whose shape disagrees with the others (or with the layer's weights)
is reported by name and shape instead of failing later inside the mathematics. Head counts
and head sizes are read from the layer's own weights (`W_O` `[heads, d_head, d_model]`), not
from a model-wide config: models with per-layer head counts (Laguna) read correctly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.errors import PatternNotDistributionError, UnsupportedModelError
from lens_alti.reading.layer_kinds import original
from lens_alti.reading.records import is_placeholder

# "pos_major": hook_v is [batch, pos, kv_heads, d_head] (TransformerLens's convention);
# "head_major": [batch, kv_heads, pos, d_head] (the bridge's multi-head latent attention).
ValueLayout = Literal["pos_major", "head_major"]


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_pattern(pattern: Tensor, name: str, n_heads: int) -> None:
    """A pattern must be [batch, head, query, key] with one row per query head."""
    if pattern.ndim != 4:
        raise UnsupportedModelError(
            f"{name}.hook_pattern has shape {_shape(pattern)}; lens_alti reads patterns "
            "[batch, head, query, key] (banded or blocked attention layouts are not supported)"
        )
    low = float(pattern.amin()) if pattern.numel() and not is_placeholder(pattern) else 0.0
    if low < -1e-3:  # no softmax, masked or not, gives a negative probability
        raise PatternNotDistributionError(
            f"{name}.hook_pattern (shape {_shape(pattern)}) is not a probability distribution over the keys: it "
            f"has negative entries (down to {low:.3g}), so it is not the attention the block applied (a "
            "TransformerLens adapter issue for this architecture) and ALTI cannot be computed from it"
        )
    if pattern.shape[1] != n_heads and pattern.shape[2] == n_heads:
        raise UnsupportedModelError(
            f"{name}.hook_pattern has shape {_shape(pattern)}: the banded local-attention layout "
            "[batch, query, head, 2w+1] of Longformer / LED (each query's window of keys, not all keys). "
            "lens_alti reads patterns [batch, head, query, key] and expands bands only in LED's encoder "
            "(reading/banded.py)"
        )
    if pattern.shape[1] != n_heads:
        raise UnsupportedModelError(
            f"{name}.hook_pattern has shape {_shape(pattern)}: {pattern.shape[1]} heads, but the layer's W_O "
            f"has {n_heads} heads"
        )


def checked_values(
    pattern: Float[Tensor, "b h q k"],
    values: Tensor,
    W_O: Float[Tensor, "h e d"],
    name: str,
    layout: ValueLayout = "pos_major",
) -> Float[Tensor, "b k h e"]:
    """Values `[batch, key, head, d_head]`, one per query head, after checking every shape.

    `values` is the cache's `hook_v` in `layout`; grouped-query attention (fewer key/value
    heads than query heads) is expanded as query head h reading kv head h // (h_q / h_kv).
    Raises UnsupportedModelError naming the hooks and shapes that disagree.
    """
    if W_O.ndim != 3:
        raise UnsupportedModelError(f"{name}: W_O has shape {_shape(W_O)}, expected [head, d_head, d_model]")
    n_heads, d_head, _ = W_O.shape
    check_pattern(pattern, name, n_heads)
    b, _, _, k = pattern.shape
    if values.ndim != 4:
        raise UnsupportedModelError(
            f"{name}.hook_v has shape {_shape(values)}; expected [batch, pos, kv_heads, d_head]"
        )
    if layout == "head_major":
        values = values.transpose(1, 2)
    expected = f"[{b}, {k}, kv_heads, {d_head}]" + (" (read from [batch, kv_heads, pos, d_head])"
                                                      if layout == "head_major" else "")
    if values.shape[0] != b or values.shape[1] != k or values.shape[3] != d_head:
        raise UnsupportedModelError(
            f"{name}: hook_v has shape {_shape(values if layout == 'pos_major' else values.transpose(1, 2))} but "
            f"hook_pattern {_shape(pattern)} and W_O {_shape(W_O)} need values {expected}"
        )
    n_kv = values.shape[2]
    if n_kv == n_heads:
        return values
    if n_kv == 0 or n_heads % n_kv:
        raise UnsupportedModelError(
            f"{name}: {n_heads} query heads (W_O {_shape(W_O)}) cannot share {n_kv} key/value heads "
            f"(hook_v {_shape(values)}) evenly"
        )
    return values.repeat_interleave(n_heads // n_kv, dim=2)


def check_same_shape(t: Tensor, like: Tensor, what: str, like_what: str) -> None:
    """Raise unless `t` (e.g. a residual stream) has the shape of `like`."""
    if t.shape != like.shape:
        raise UnsupportedModelError(f"{what} has shape {_shape(t)} but {like_what} has {_shape(like)}")


def output_weights(attn: Any, name: str) -> tuple[Float[Tensor, "h e d"], Float[Tensor, " d"] | None]:
    """(W_O, b_O) of one attention module, read from this layer's own weights.

    The bridge's `W_O` property assumes one head count for the whole model and raises for
    models whose layers differ (Laguna's `num_attention_heads_per_layer`); then W_O is read
    from the Hugging Face output projection, `[heads · d_head, d_model]` → `[heads, d_head, d_model]`.
    """
    try:
        W_O, b_O = attn.W_O, attn.b_O
    except Exception as exc:  # noqa: BLE001 - TransformerLens raises several kinds here
        hf = original(attn)
        o_proj = original(getattr(hf, "o_proj", None))  # the bridge wraps it in place
        d_head = getattr(hf, "head_dim", None)
        if not isinstance(o_proj, torch.nn.Linear) or not d_head or o_proj.in_features % int(d_head):
            raise UnsupportedModelError(f"{name}: cannot read this layer's W_O ({type(exc).__name__}: {exc})") from exc
        d_head = int(d_head)
        W_O = o_proj.weight.T.reshape(o_proj.in_features // d_head, d_head, o_proj.out_features)
        b_O = o_proj.bias
    return W_O.detach(), (None if b_O is None else b_O.detach())


def check_sub_distribution(pattern: Float[Tensor, "b h q k"], name: str, tolerance: float = 1e-3) -> None:
    """Attention with sinks (GPT-OSS): rows are ≥ 0 and sum to at most 1 (the sink takes the rest)."""
    if pattern.numel() == 0:
        return
    low = float(pattern.amin())
    high = float(pattern.sum(-1, dtype=torch.float64).amax())
    if low < -tolerance or high > 1 + tolerance:
        raise PatternNotDistributionError(
            f"{name}.hook_pattern is not attention with sinks: entries must be ≥ 0 and rows sum to at most 1 "
            f"(smallest entry {low:.3g}, largest row sum {high:.4g})"
        )
