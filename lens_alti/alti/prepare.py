"""Prepare one block record for the decomposition: checks, padding, and the checked vectors.

Between the records (`lens_alti.reading.records`) and the contributions: refuse what a record
cannot support (measure="attention" on gated layers and mixers, heads on channel operators),
reject NaN/Inf at real positions, check the padding the mask declares, isolate padded positions,
check the pattern is a distribution, decompose and check the reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lens_alti.alti.contributions import normalise_rows
from lens_alti.alti.decompose import (
    HALF_TOLERANCE,
    RECONSTRUCTION_TOLERANCE,
    TransformedVectors,
    check_pattern_distribution,
    check_reconstruction,
    decompose,
)
from lens_alti.alti.masking import MASK_LEAK_TOLERANCE, check_declared_padding, isolate_padding, leaked_attention
from lens_alti.errors import MaskMismatchError, NonFiniteError, UnsupportedModelError

if TYPE_CHECKING:  # the records are the interface; alti never imports reading at run time
    from lens_alti.reading.records import AttentionBlock


def check_finite(block: AttentionBlock, valid_q: Tensor, valid_k: Tensor) -> None:
    """Raise NonFiniteError if the record holds NaN or Inf at a real (unpadded) position."""
    checks = {
        "attention pattern": torch.where(valid_q[:, None, :, None], block.pattern, 0),
        "values": torch.where(valid_k[:, :, None, None], block.values, 0),
        "residual stream": torch.where(valid_q[..., None], block.residual, 0),
        "block output": torch.where(valid_q[..., None], block.target, 0),
    }
    for what, t in checks.items():
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{block.name}: the cache holds NaN or Inf in its {what} (layer {block.layer})")


def masked_block(block: AttentionBlock, valid_q: Tensor, valid_k: Tensor) -> AttentionBlock:
    """Zero padded receivers' rows and padded sources' columns of the pattern.

    Raises if real receivers gave padded sources real attention: the cache was then made
    without the mask given here.
    """
    if bool(valid_q.all()) and bool(valid_k.all()):
        return block
    if block.padding_unmasked:  # recomputed without the padding mask (reading/relative_bias.py)
        keys = valid_k[:, None, None, :].to(block.pattern.dtype)
        block = replace(block, pattern=normalise_rows(block.pattern * keys))
    # |pattern|: a recurrent mixer's operator (pattern_is_distribution=False) can be negative.
    leak = leaked_attention(block.pattern.abs(), valid_q, valid_k)
    if leak > MASK_LEAK_TOLERANCE and block.recurrent:
        raise UnsupportedModelError(
            f"{block.name} (layer {block.layer}) is a linear-recurrent mixer that reads padded positions under "
            f"this attention_mask (up to {leak:.3g}): either the model itself mixes padding into the real tokens "
            "(RWKV and RecurrentGemma ignore the attention mask: padding before a real token enters its state; "
            "right padding is fine), or the cache does not show which positions the layer zeroed (lens_alti "
            "reads that only for Mamba, Mamba-2 and LFM2 mixers). Run the sequences one at a time without padding."
        )
    if leak > MASK_LEAK_TOLERANCE:
        raise MaskMismatchError(
            f"{block.name}: real tokens attend to positions that the mask marks as padding "
            f"(attention up to {leak:.3g}); pass the same attention_mask "
            "(and decoder_attention_mask) that run_with_cache was given"
        )
    return isolate_padding(block, valid_q, valid_k)


@dataclass
class StackChecks:
    """Per-stack checks of `block_vectors`: the measure and heads asked for, and the mask check.

    `causal` None skips the check for padding the mask does not declare (alti/masking.py);
    it runs once, on the first attention block of the stack.
    """

    measure: str
    heads: bool
    causal: bool | None = None
    mask_name: str = "attention_mask"
    padding_checked: bool = False


def block_vectors(
    block: AttentionBlock,
    valid_q: Tensor,
    valid_k: Tensor,
    *,
    dtype: torch.dtype,
    check: bool,
    checks: StackChecks,
) -> tuple[TransformedVectors, float]:
    """Check, mask and decompose one block on the device it lives on; (vectors, relative error)."""
    device = block.pattern.device
    valid_q, valid_k = valid_q.to(device), valid_k.to(device)
    if checks.measure == "attention" and block.recurrent:
        raise UnsupportedModelError(
            f"{block.name} (layer {block.layer}) is a linear-recurrent mixer: it has no attention weights, "
            "so measure='attention' is undefined for it; use 'l1', 'l2' or 'koba'"
        )
    if checks.measure == "attention" and block.output_gated:
        raise UnsupportedModelError(
            f"{block.name} (layer {block.layer}) gates its heads' output per receiver before W_O: its token "
            "mixing is the gated operator g_i·A, not the attention weights, so measure='attention' would average "
            "gate-scaled weights; use 'l1', 'l2' or 'koba' (lens_alti.attention_rollout(cache) reads the raw "
            "attention weights where every layer is attention)"
        )
    if checks.heads and not block.has_heads:  # a mixer whose channels form no heads (reading/mixers)
        raise UnsupportedModelError(
            f"{block.name} (layer {block.layer}) is a linear-recurrent mixer whose operator is per channel, "
            "not per head (its channels form no heads: Mamba-1, short convolutions, NemotronH's MLP-only layers, "
            "or Falcon-H1's parallel attention + mixer block): per-head contributions are not available for it; "
            "call attribute(..., heads=False)"
        )
    check_finite(block, valid_q, valid_k)
    if not checks.padding_checked and checks.causal is not None and block.pattern_is_distribution:
        check_declared_padding(block, valid_q, causal=checks.causal, mask_name=checks.mask_name)
        checks.padding_checked = True
    block = masked_block(block, valid_q, valid_k)
    if check:
        check_pattern_distribution(block, valid_q, valid_k, 10 * HALF_TOLERANCE.get(block.pattern.dtype, 1e-4))
    tv = decompose(block, dtype=dtype, valid_rows=valid_q)
    tolerance = HALF_TOLERANCE.get(block.target.dtype, RECONSTRUCTION_TOLERANCE)
    return tv, (check_reconstruction(tv, block, valid_q, tolerance) if check else float("nan"))
