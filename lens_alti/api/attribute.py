"""`attribute`: ALTI contributions of every layer (and head), with rollout, from a cache or a model.

The steps: check the options; open a source of blocks (the cache, a forward pass of the model on
the given input, or — for a few positions — the model's layers run again one at a time,
`lens_alti.api.sources`); check the call fits in memory; choose the backend once; run the plan
(`lens_alti.api.plans`). `attention_rollout` and `hook_names` are the small entry points beside it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.backend import resolve as resolve_backend
from lens_alti.alti.contributions import DEFAULT_CHUNK_BYTES
from lens_alti.alti.rollout import attention_rollout_layers, rollout
from lens_alti.api.inputs import valid_mask
from lens_alti.api.options import AltiOptions
from lens_alti.api.plans import plan_for, reads_top_down
from lens_alti.api.sources import CacheSource, Inputs, open_source
from lens_alti.errors import (
    InvalidArgumentError,
    WeightProcessingWarning,
)
from lens_alti.reading import ModelLayout, cache_and_model, model_layout
from lens_alti.reading.cache import layer_patterns
from lens_alti.results import AltiResult, Seq2SeqAltiResult
from lens_alti.validation import check_type


def hook_names(model: Any, parallel_mlp: str = "exclude") -> list[str]:
    """Every hook `attribute` reads for `model`: usable as `run_with_cache(names_filter=...)`."""
    return model_layout(model, parallel_mlp).hook_names()


@torch.no_grad()
def attribute(
    cache: Any,
    *,
    measure: str = "l1",
    heads: bool = False,
    attention_mask: Tensor | None = None,
    decoder_attention_mask: Tensor | None = None,
    check: bool = True,
    tokens: Any = None,
    decoder_tokens: Any = None,
    parallel_mlp: str = "exclude",
    dtype: torch.dtype = torch.float32,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
    progress: bool | None = None,
    positions: Any = None,
    output_device: torch.device | str | None = None,
    allow_shifted_source: bool = False,
    attention: str = "auto",
) -> AltiResult | Seq2SeqAltiResult:
    """ALTI contributions for every layer (and head), with rollout, from a cache or a model.

    Args:
        cache: the ActivationCache of `logits, cache = model.run_with_cache(tokens)` for a
            TransformerLens TransformerBridge (weights are read from `cache.model`); for an
            encoder-decoder, `model.run_with_cache(src, decoder_input=tgt)`.
            Or the model itself (streaming): `attribute(model, tokens=ids_or_text, ...)` runs
            the forward pass with hooks that measure each block as soon as its activations
            exist and then drop them, so the full cache never exists. Same numbers. With
            `positions=` (decoder-only and encoder models) the model runs once recording each
            layer's input, and its layers run again one at a time from the top: memory linear
            in the input's length (docs/spec.md §12).
        measure: "l1" (ALTI, default), "l2", "koba" (‖T_i(x_j)‖₂) or "attention" (head-mean
            attention weights, a baseline).
        heads: also compute per-head (token-through-head) contributions, always with L1.
        attention_mask: `[batch, pos]` 1 for real tokens, 0 for padding (left or right); the
            same mask the cache was produced with (streaming: the mask to run with; texts
            are left-padded and masked automatically). For encoder-decoders: the source mask.
        decoder_attention_mask: `[batch, tgt]` the target mask of an encoder-decoder.
        check: verify each block's decomposition reproduces the real activation to
            max|Δ| ≤ 1e-4·max|y| and raise ReconstructionError otherwise.
        tokens: with a cache, token ids `[batch, pos]` or strings, used only for labels. With a
            model, the input to run (ids, a text or a list of texts).
        decoder_tokens: encoder-decoders: with a cache, target labels; with a model, the target
            prefix ids `[batch, tgt]` (decoder start first).
        parallel_mlp: for parallel attention+MLP blocks (GPT-J, NeoX): "exclude" (y = x + attn)
            or "residual" (the MLP output, a function of x_i alone, joins x_i's own term).
        dtype: computation dtype (fp16/bf16 caches are always computed in at least fp32).
        max_chunk_bytes: memory budget for one chunk of receivers' intermediates.
        backend: "native" (C kernels, CPU), "compiled" (torch.compile'd fused kernels), "eager"
            (same numbers, slower, more memory per chunk) or "auto" (chosen once per call from
            the whole call's work and start-up costs: `lens_alti.alti.backend`).
        progress: show a progress bar over blocks (default: inputs of ≥ 512 tokens, in a terminal or notebook).
        positions: receivers of interest ("last", ints, `[batch, r]` ints or a `[batch, pos]`
            boolean mask; negative ints count back from each item's last real token). The
            per-head kernels run for those rows only and `layers`, `rollout`, `heads`... hold
            those rows (`result.positions[b, r]` says which); the rollout stays exact.
            Encoder-decoders: target positions, restricting the decoder's per-head results.
        output_device: where results are gathered (default: where the first block lives);
            each block is computed on the device of its activations and weights.
        allow_shifted_source: encoder-decoders: accept a decoder input equal to the source shifted
            right (a real identity translation). Without it such a cache is refused with
            MissingTargetError (TransformerLens feeds exactly that when `decoder_input` is
            forgotten) unless `decoder_tokens` are given as ids equal to the decoder input.
        attention: with a model and `positions=`, how its attention runs: "recomputed" (memory-efficient
            attention; the rows ALTI reads are recomputed from queries and keys, docs/spec.md §9),
            "eager" (the model's eager attention, `[head, n, n]` per layer) or "auto" (default:
            recomputed where the model's attention can be, eager otherwise).

    Returns:
        Decoder-only and encoder models: an AltiResult with `layers`, `rollout`
        (`[batch, layer, query, key]`), `sinks` (`[batch, pos]`, the attention sinks, docs/spec.md §10)
        and, with `heads=True`, `heads` (`[batch, layer, head, query, key]`) and `heads_residual`.
        Encoder-decoder models: a Seq2SeqAltiResult (`encoder`, `decoder_self`, `cross`,
        `total`, `source_contribution`).
    """
    options = AltiOptions.checked(
        measure=measure, heads=heads, dtype=dtype, check=check, max_chunk_bytes=max_chunk_bytes, backend=backend
    )
    check_type("allow_shifted_source", allow_shifted_source, bool, "True or False")
    inputs = Inputs(attention_mask, decoder_attention_mask, positions, tokens, decoder_tokens, output_device, progress)
    source, inputs = open_source(
        cache, inputs, parallel_mlp, attention=attention, top_down=lambda layout: reads_top_down(layout, positions)
    )
    source.check_memory(options)
    source.check_target(decoder_tokens, allow_shifted_source)
    warn_if_processed(source.layout)
    # The backend is chosen once for the whole call (alti/backend.py); streaming decides per block.
    cache_arg = source.cache if isinstance(source, CacheSource) else None
    chosen = resolve_backend(options.backend, cache_arg, source.layout, heads=options.heads, dtype=options.dtype)
    return plan_for(source, inputs)(source, inputs, options.resolved(chosen))


def warn_if_processed(layout: ModelLayout) -> None:
    """WeightProcessingWarning when the model's weights were folded or centred (numbers differ from raw)."""
    if layout.weight_processing != "raw":
        warnings.warn(
            f"the model's weights were {layout.weight_processing}: ALTI is exact for this processed model but "
            "its numbers differ from the raw model's. For the unprocessed numbers boot the bridge without "
            "compatibility mode, or load a HookedTransformer with from_pretrained_no_processing.",
            WeightProcessingWarning,
            stacklevel=3,
        )


@torch.no_grad()
def attention_rollout(cache: Any, *, attention_mask: Tensor | None = None) -> Tensor:
    """Attention rollout baseline (Abnar & Zuidema 2020; docs/spec.md §4): `[batch, layer, query, key]`.

    Per layer `0.5·mean_h A + 0.5·I`, rows renormalised, multiplied across layers like ALTI's
    rollout. Decoder-only and encoder models.
    """
    cache, model = cache_and_model(cache)
    layout = model_layout(model)
    if layout.family == "encoder_decoder":
        raise InvalidArgumentError("cache", "an encoder-decoder cache", "a decoder-only or encoder model's cache")
    patterns = layer_patterns(cache, layout).float()
    batch, pos = patterns.shape[0], patterns.shape[-1]
    valid = valid_mask(attention_mask, batch, pos, patterns.device, "attention_mask")
    return rollout(attention_rollout_layers(patterns, valid) * valid[:, None, :, None])
