"""`attribute`: the one entry point from a cache to ALTI contributions."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from lens_alti.contributions import (
    DEFAULT_CHUNK_BYTES,
    MEASURES,
    head_contributions,
    head_output_contributions,
    token_contributions,
)
from lens_alti.decompose import RECONSTRUCTION_TOLERANCE, check_reconstruction, decompose
from lens_alti.errors import LensAltiError, NonFiniteError, WeightProcessingWarning
from lens_alti.reading import cache_and_model, check_hooks, model_layout
from lens_alti.records import AttentionBlock
from lens_alti.result import AltiResult
from lens_alti.rollout import rollout

# Attention a real query may give a padded key before we call the mask inconsistent.
_MASK_LEAK_TOLERANCE = 1e-6
# A half-precision cache holds activations rounded at every step of the real forward
# pass, so an exact fp32 decomposition of its inputs can only match them this well.
_HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def hook_names(model: Any, parallel_mlp: str = "exclude") -> list[str]:
    """Every hook `attribute` reads for `model`: usable as `run_with_cache(names_filter=...)`."""
    return model_layout(model, parallel_mlp).hook_names()


def _prepare_mask(attention_mask: Tensor | None, batch: int, pos: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    mask = torch.as_tensor(attention_mask, device=device)
    if mask.shape != (batch, pos):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, but the cache has [batch, pos] = [{batch}, {pos}]"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return mask.bool()


def _check_finite(block: AttentionBlock, valid: Tensor) -> None:
    rows = valid[:, None, :, None]
    checks = {
        "hook_pattern": torch.where(rows, block.pattern, 0),
        "hook_v": torch.where(valid[:, :, None, None], block.values, 0),
        "residual stream": torch.where(valid[..., None], block.residual, 0),
        "block output": torch.where(valid[..., None], block.target, 0),
    }
    for what, t in checks.items():
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{block.name}: the cache holds NaN or Inf in its {what} (layer {block.layer})")


def _masked_block(block: AttentionBlock, valid: Tensor) -> AttentionBlock:
    """Zero padded receivers' rows and padded sources' columns of the pattern.

    Raises if real receivers gave padded sources real attention: the cache was then made
    without the mask given here.
    """
    if bool(valid.all()):
        return block
    pattern = block.pattern
    leak = (pattern * valid[:, None, :, None] * ~valid[:, None, None, :]).amax() if pattern.numel() else 0
    if float(leak) > _MASK_LEAK_TOLERANCE:
        raise LensAltiError(
            f"{block.name}: real tokens attend to positions that attention_mask marks as padding "
            f"(attention up to {float(leak):.3g}); pass the same attention_mask to run_with_cache"
        )
    keep = (valid[:, None, :, None] & valid[:, None, None, :]).to(pattern.dtype)
    return AttentionBlock(**{**block.__dict__, "pattern": pattern * keep})


def _str_tokens(model: Any, tokens: Any, batch: int) -> list[list[str]] | None:
    if tokens is None:
        return None
    if isinstance(tokens, Tensor):
        rows = tokens if tokens.dim() == 2 else tokens[None]
        out = [list(model.to_str_tokens(row)) for row in rows]
    elif tokens and isinstance(tokens[0], str):
        out = [list(tokens)]
    else:
        out = [list(t) for t in tokens]
    if len(out) != batch:
        raise ValueError(f"tokens has {len(out)} rows but the cache has batch size {batch}")
    return out


def _progress(iterable: Any, enabled: bool | None, n_pos: int, total: int, desc: str) -> Any:
    if enabled is None:
        enabled = n_pos >= 512 and sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


@torch.no_grad()
def attribute(
    cache: Any,
    *,
    measure: str = "l1",
    heads: bool = False,
    attention_mask: Tensor | None = None,
    check: bool = True,
    tokens: Any = None,
    parallel_mlp: str = "exclude",
    dtype: torch.dtype = torch.float32,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
) -> AltiResult:
    """ALTI contributions for every layer (and head), with rollout, from a cache.

    Args:
        cache: the ActivationCache of `logits, cache = model.run_with_cache(tokens)` for a
            TransformerLens TransformerBridge (weights are read from `cache.model`).
        measure: "l1" (ALTI, default), "l2", "koba" (‖T_i(x_j)‖₂) or "attention" (head-mean
            attention weights, a baseline).
        heads: also compute per-head (token-through-head) contributions, always with L1.
        attention_mask: `[batch, pos]` 1 for real tokens, 0 for padding (left or right); the
            same mask the cache was produced with.
        check: verify each block's decomposition reproduces the real activation to
            max|Δ| ≤ 1e-4·max|y| and raise ReconstructionError otherwise.
        tokens: token ids `[batch, pos]` or strings, used only for labels.
        parallel_mlp: for parallel attention+MLP blocks (GPT-J, NeoX): "exclude" (y = x + attn)
            or "residual" (the MLP output, a function of x_i alone, joins x_i's own term).
        dtype: computation dtype (fp16/bf16 caches are always computed in at least fp32).
        max_chunk_bytes: memory budget for one chunk of receivers' intermediates.
        progress: show a progress bar over layers (default: for long inputs in a terminal).

    Returns:
        An AltiResult with `layers`, `rollout` (`[batch, layer, query, key]`) and, with
        `heads=True`, `heads` (`[batch, layer, head, query, key]`) and `heads_residual`.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {', '.join(MEASURES)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    cache, model = cache_and_model(cache)
    layout = model_layout(model, parallel_mlp)
    check_hooks(cache, layout)
    if layout.weight_processing != "raw":
        warnings.warn(
            "the model's weights were processed (enable_compatibility_mode / process_weights): "
            "ALTI is exact for this processed model but its numbers differ from the raw model's. "
            "Boot the bridge without compatibility mode for the unprocessed numbers.",
            WeightProcessingWarning,
            stacklevel=2,
        )

    readers = layout.blocks["self"]
    first = cache[readers[0].hooks[0]]
    batch, pos, device = first.shape[0], first.shape[-1], first.device
    valid = _prepare_mask(attention_mask, batch, pos, device)
    rowmask = valid[:, :, None].to(dtype)

    layers, head_list, head_res, out_list, out_res, errors = [], [], [], [], [], []
    for reader in _progress(readers, progress, pos, len(readers), "lens_alti"):
        block = reader.build(cache)
        _check_finite(block, valid)
        block = _masked_block(block, valid)
        tv = decompose(block, dtype=dtype, valid_rows=valid)
        tolerance = _HALF_TOLERANCE.get(block.target.dtype, RECONSTRUCTION_TOLERANCE)
        errors.append(check_reconstruction(tv, block, valid, tolerance) if check else float("nan"))
        layers.append(token_contributions(tv, measure, max_chunk_bytes) * rowmask)
        if heads:
            h, r = head_contributions(tv, max_chunk_bytes)
            head_list.append(h * rowmask[:, None])
            head_res.append(r * valid.to(dtype))
            o, o_r = head_output_contributions(tv)
            out_list.append(o * valid[:, None].to(dtype))
            out_res.append(o_r * valid.to(dtype))
        del tv, block

    stacked = torch.stack(layers, dim=1)
    return AltiResult(
        layers=stacked,
        rollout=rollout(stacked),
        attention_mask=valid.long(),
        reconstruction_error=torch.tensor(errors, dtype=torch.float64),
        measure=measure,
        architecture=layout.architecture,
        weight_processing=layout.weight_processing,
        heads=torch.stack(head_list, dim=1) if heads else None,
        heads_residual=torch.stack(head_res, dim=1) if heads else None,
        head_outputs=torch.stack(out_list, dim=1) if heads else None,
        head_outputs_residual=torch.stack(out_res, dim=1) if heads else None,
        str_tokens=_str_tokens(model, tokens, batch),
    )
