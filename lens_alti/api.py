"""`attribute`: the one entry point from a cache to ALTI contributions."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.contributions import (
    BACKENDS,
    DEFAULT_CHUNK_BYTES,
    MEASURES,
    block_contributions,
    head_output_contributions,
)
from lens_alti.alti.decompose import RECONSTRUCTION_TOLERANCE, check_reconstruction, decompose
from lens_alti.alti.rollout import attention_rollout_layers, encoder_decoder_rollout, rollout
from lens_alti.errors import LensAltiError, MissingHooksError, NonFiniteError, WeightProcessingWarning
from lens_alti.reading import BlockReader, ModelLayout, cache_and_model, check_hooks, model_layout
from lens_alti.reading.records import AttentionBlock
from lens_alti.results import AltiResult, Seq2SeqAltiResult

# Attention a real query may give a padded key before we call the mask inconsistent.
_MASK_LEAK_TOLERANCE = 1e-6
# A half-precision cache holds activations rounded at every step of the real forward
# pass, so an exact fp32 decomposition of its inputs can only match them this well.
_HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def hook_names(model: Any, parallel_mlp: str = "exclude") -> list[str]:
    """Every hook `attribute` reads for `model`: usable as `run_with_cache(names_filter=...)`."""
    return model_layout(model, parallel_mlp).hook_names()


def _prepare_mask(attention_mask: Tensor | None, batch: int, pos: int, device: torch.device, what: str) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    mask = torch.as_tensor(attention_mask, device=device)
    if mask.shape != (batch, pos):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, but the cache has [batch, pos] = [{batch}, {pos}]")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{what} must hold only 0 (padding) and 1 (real token)")
    return mask.bool()


def _check_finite(block: AttentionBlock, valid_q: Tensor, valid_k: Tensor) -> None:
    checks = {
        "hook_pattern": torch.where(valid_q[:, None, :, None], block.pattern, 0),
        "hook_v": torch.where(valid_k[:, :, None, None], block.values, 0),
        "residual stream": torch.where(valid_q[..., None], block.residual, 0),
        "block output": torch.where(valid_q[..., None], block.target, 0),
    }
    for what, t in checks.items():
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{block.name}: the cache holds NaN or Inf in its {what} (layer {block.layer})")


def _masked_block(block: AttentionBlock, valid_q: Tensor, valid_k: Tensor) -> AttentionBlock:
    """Zero padded receivers' rows and padded sources' columns of the pattern.

    Raises if real receivers gave padded sources real attention: the cache was then made
    without the mask given here.
    """
    if bool(valid_q.all()) and bool(valid_k.all()):
        return block
    pattern = block.pattern
    leak = (pattern * valid_q[:, None, :, None] * ~valid_k[:, None, None, :]).amax() if pattern.numel() else 0
    if float(leak) > _MASK_LEAK_TOLERANCE:
        raise LensAltiError(
            f"{block.name}: real tokens attend to positions that the mask marks as padding "
            f"(attention up to {float(leak):.3g}); pass the same attention_mask "
            "(and decoder_attention_mask) that run_with_cache was given"
        )
    keep = (valid_q[:, None, :, None] & valid_k[:, None, None, :]).to(pattern.dtype)
    return AttentionBlock(**{**block.__dict__, "pattern": pattern * keep})


@dataclass
class _Stacked:
    """Per-layer outputs of one kind of block, stacked along dim 1."""

    layers: Tensor
    errors: Tensor
    heads: Tensor | None = None
    heads_residual: Tensor | None = None
    head_outputs: Tensor | None = None
    head_outputs_residual: Tensor | None = None


def _run_blocks(
    readers: list[BlockReader],
    cache: Any,
    valid_q: Tensor,
    valid_k: Tensor,
    *,
    measure: str,
    heads: bool,
    check: bool,
    dtype: torch.dtype,
    max_chunk_bytes: int,
    backend: str,
    progress: Any,
) -> _Stacked:
    """Read, decompose and measure every block of one kind (encoder, decoder self, cross...).

    Each layer's results are written into tensors allocated once for all layers, so the
    peak memory is the results plus one layer's working set.
    """
    q_mask = valid_q.to(dtype)
    n = len(readers)
    out: _Stacked | None = None
    errors = []
    for layer, reader in enumerate(readers):
        block = reader.build(cache)
        _check_finite(block, valid_q, valid_k)
        block = _masked_block(block, valid_q, valid_k)
        tv = decompose(block, dtype=dtype, valid_rows=valid_q)
        tolerance = _HALF_TOLERANCE.get(block.target.dtype, RECONSTRUCTION_TOLERANCE)
        errors.append(check_reconstruction(tv, block, valid_q, tolerance) if check else float("nan"))
        key_mask = None if bool(valid_k.all()) else valid_k
        c = block_contributions(
            tv, measure, heads=heads, key_mask=key_mask, max_chunk_bytes=max_chunk_bytes, backend=backend
        )
        head_out = head_output_contributions(tv) if heads else None
        if out is None:
            alloc = lambda t: None if t is None else t.new_zeros(t.shape[0], n, *t.shape[1:])  # noqa: E731
            out = _Stacked(
                layers=alloc(c.tokens),
                errors=torch.empty(0),
                heads=alloc(c.heads),
                heads_residual=alloc(c.heads_residual),
                head_outputs=alloc(head_out[0] if head_out else None),
                head_outputs_residual=alloc(head_out[1] if head_out else None),
            )
        torch.mul(c.tokens, q_mask[:, :, None], out=out.layers[:, layer])
        if heads:
            torch.mul(c.heads, q_mask[:, None, :, None], out=out.heads[:, layer])
            torch.mul(c.heads_residual, q_mask, out=out.heads_residual[:, layer])
            torch.mul(head_out[0], q_mask[:, None], out=out.head_outputs[:, layer])
            torch.mul(head_out[1], q_mask, out=out.head_outputs_residual[:, layer])
        del tv, block, c, head_out
        progress.update(1)
    out.errors = torch.tensor(errors, dtype=torch.float64)
    return out


def _str_tokens(model: Any, tokens: Any, batch: int) -> list[list[str]] | None:
    if tokens is None:
        return None
    if isinstance(tokens, Tensor):
        rows = tokens if tokens.dim() == 2 else tokens[None]
        if hasattr(model, "to_str_tokens"):
            out = [list(model.to_str_tokens(row)) for row in rows]
        else:  # HookedEncoder / HookedEncoderDecoder of TransformerLens 3.x
            out = [list(model.tokenizer.convert_ids_to_tokens(row.tolist())) for row in rows]
    elif tokens and isinstance(tokens[0], str):
        out = [list(tokens)]
    else:
        out = [list(t) for t in tokens]
    if len(out) != batch:
        raise ValueError(f"tokens has {len(out)} rows but the cache has batch size {batch}")
    return out


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool | None, n_pos: int, total: int) -> Any:
    if enabled is None:  # long inputs, in a terminal or a Jupyter kernel
        enabled = n_pos >= 512 and (sys.stderr.isatty() or "ipykernel" in sys.modules)
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lens_alti", unit="block")


def _check_decoder_input(cache: Any) -> None:
    """TransformerLens feeds the source shifted right when decoder_input is missing."""
    if "embed.hook_in" not in cache.keys() or "decoder_embed.hook_in" not in cache.keys():
        return
    src, tgt = cache["embed.hook_in"], cache["decoder_embed.hook_in"]
    if src.dtype.is_floating_point or tgt.shape != src.shape or src.shape[-1] < 2:
        return
    if torch.equal(tgt[:, 1:], src[:, :-1]) and bool((tgt[:, 0] == tgt[0, 0]).all()):
        raise LensAltiError(
            "this encoder-decoder cache was run without a target: TransformerLens then feeds the "
            "source shifted right as the decoder input. Run "
            "`model.run_with_cache(src_tokens, decoder_input=tgt_tokens)` with the target prefix to explain."
        )


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
) -> AltiResult | Seq2SeqAltiResult:
    """ALTI contributions for every layer (and head), with rollout, from a cache.

    Args:
        cache: the ActivationCache of `logits, cache = model.run_with_cache(tokens)` for a
            TransformerLens TransformerBridge (weights are read from `cache.model`); for an
            encoder-decoder, `model.run_with_cache(src, decoder_input=tgt)`.
        measure: "l1" (ALTI, default), "l2", "koba" (‖T_i(x_j)‖₂) or "attention" (head-mean
            attention weights, a baseline).
        heads: also compute per-head (token-through-head) contributions, always with L1.
        attention_mask: `[batch, pos]` 1 for real tokens, 0 for padding (left or right); the
            same mask the cache was produced with. For encoder-decoders: the source mask.
        decoder_attention_mask: `[batch, tgt]` the target mask of an encoder-decoder.
        check: verify each block's decomposition reproduces the real activation to
            max|Δ| ≤ 1e-4·max|y| and raise ReconstructionError otherwise.
        tokens / decoder_tokens: token ids `[batch, pos]` or strings, used only for labels.
        parallel_mlp: for parallel attention+MLP blocks (GPT-J, NeoX): "exclude" (y = x + attn)
            or "residual" (the MLP output, a function of x_i alone, joins x_i's own term).
        dtype: computation dtype (fp16/bf16 caches are always computed in at least fp32).
        max_chunk_bytes: memory budget for one chunk of receivers' intermediates.
        backend: "compiled" (torch.compile'd fused kernels), "eager" (same numbers, slower,
            more memory per chunk) or "auto" (compiled for blocks large enough to repay the
            one-off compilation; eager if compilation is unavailable).
        progress: show a progress bar over blocks (default: inputs of ≥ 512 tokens, in a terminal or notebook).

    Returns:
        Decoder-only and encoder models: an AltiResult with `layers`, `rollout`
        (`[batch, layer, query, key]`) and, with `heads=True`, `heads`
        (`[batch, layer, head, query, key]`) and `heads_residual`.
        Encoder-decoder models: a Seq2SeqAltiResult (`encoder`, `decoder_self`, `cross`,
        `total`, `source_contribution`).
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {', '.join(MEASURES)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    cache, model = cache_and_model(cache)
    layout = model_layout(model, parallel_mlp)
    check_hooks(cache, layout)
    if layout.weight_processing != "raw":
        warnings.warn(
            f"the model's weights were {layout.weight_processing}: ALTI is exact for this processed model but "
            "its numbers differ from the raw model's. For the unprocessed numbers boot the bridge without "
            "compatibility mode, or load a HookedTransformer with from_pretrained_no_processing.",
            WeightProcessingWarning,
            stacklevel=2,
        )
    opts = {
        "measure": measure,
        "heads": heads,
        "check": check,
        "dtype": dtype,
        "max_chunk_bytes": max_chunk_bytes,
        "backend": backend,
    }
    n_blocks = sum(len(r) for r in layout.blocks.values())

    if layout.family != "encoder_decoder":
        if decoder_attention_mask is not None:
            raise ValueError(f"decoder_attention_mask is only for encoder-decoder models, not {layout.architecture}")
        readers = layout.blocks["self"]
        batch, _, _, pos = cache[readers[0].hooks[0]].shape
        valid = _prepare_mask(attention_mask, batch, pos, cache[readers[0].hooks[0]].device, "attention_mask")
        bar = _progress(progress, pos, n_blocks)
        try:
            out = _run_blocks(readers, cache, valid, valid, progress=bar, **opts)
        finally:
            bar.close()
        return _self_result(out, valid, layout, measure, _str_tokens(model, tokens, batch))

    _check_decoder_input(cache)
    enc, dec, crs = layout.blocks["encoder"], layout.blocks["decoder_self"], layout.blocks["cross"]
    batch, _, _, src_len = cache[enc[0].hooks[0]].shape
    tgt_len = cache[dec[0].hooks[0]].shape[-1]
    device = cache[enc[0].hooks[0]].device
    src_valid = _prepare_mask(attention_mask, batch, src_len, device, "attention_mask")
    tgt_valid = _prepare_mask(decoder_attention_mask, batch, tgt_len, device, "decoder_attention_mask")
    bar = _progress(progress, max(src_len, tgt_len), n_blocks)
    try:
        enc_out = _run_blocks(enc, cache, src_valid, src_valid, progress=bar, **opts)
        self_out = _run_blocks(dec, cache, tgt_valid, tgt_valid, progress=bar, **opts)
        cross_out = _run_blocks(crs, cache, tgt_valid, src_valid, progress=bar, **opts)
    finally:
        bar.close()
    encoder = _self_result(enc_out, src_valid, layout, measure, _str_tokens(model, tokens, batch))
    total = encoder_decoder_rollout(encoder.rollout[:, -1], cross_out.layers, self_out.layers)
    return Seq2SeqAltiResult(
        encoder=encoder,
        decoder_self=self_out.layers,
        cross=cross_out.layers,
        total=total * tgt_valid[:, None, :, None].to(total.dtype),
        source_mask=src_valid.long(),
        target_mask=tgt_valid.long(),
        reconstruction_error={"encoder": enc_out.errors, "decoder_self": self_out.errors, "cross": cross_out.errors},
        measure=measure,
        architecture=layout.architecture,
        weight_processing=layout.weight_processing,
        decoder_self_heads=self_out.heads,
        decoder_self_heads_residual=self_out.heads_residual,
        cross_heads=cross_out.heads,
        cross_heads_residual=cross_out.heads_residual,
        source_str_tokens=encoder.str_tokens,
        target_str_tokens=_str_tokens(model, decoder_tokens, batch),
    )


def _self_result(
    out: _Stacked, valid: Tensor, layout: ModelLayout, measure: str, str_tokens: list[list[str]] | None
) -> AltiResult:
    return AltiResult(
        layers=out.layers,
        rollout=rollout(out.layers),
        attention_mask=valid.long(),
        reconstruction_error=out.errors,
        measure=measure,
        architecture=layout.architecture,
        weight_processing=layout.weight_processing,
        heads=out.heads,
        heads_residual=out.heads_residual,
        head_outputs=out.head_outputs,
        head_outputs_residual=out.head_outputs_residual,
        str_tokens=str_tokens,
    )


@torch.no_grad()
def attention_rollout(cache: Any, *, attention_mask: Tensor | None = None) -> Tensor:
    """Attention rollout baseline (Abnar & Zuidema 2020; spec §4): `[batch, layer, query, key]`.

    Per layer `0.5·mean_h A + 0.5·I`, rows renormalised, multiplied across layers like ALTI's
    rollout. Decoder-only and encoder models.
    """
    cache, model = cache_and_model(cache)
    layout = model_layout(model)
    if layout.family == "encoder_decoder":
        raise ValueError("attention_rollout is for decoder-only and encoder models")
    names = [r.hooks[0] for r in layout.blocks["self"]]
    missing = [n for n in names if n not in cache.keys()]
    if missing:
        raise MissingHooksError(missing, "attention_rollout reads every layer's hook_pattern.")
    patterns = torch.stack([cache[n].float() for n in names], dim=1)
    batch, pos = patterns.shape[0], patterns.shape[-1]
    valid = _prepare_mask(attention_mask, batch, pos, patterns.device, "attention_mask")
    return rollout(attention_rollout_layers(patterns, valid) * valid[:, None, :, None])


def logit_attribution(
    cache_or_model: Any,
    target: Any,
    contrast: Any = None,
    *,
    position: Any = -1,
    heads: bool = True,
    attention_mask: Tensor | None = None,
    decoder_attention_mask: Tensor | None = None,
    tokens: Any = None,
    decoder_tokens: Any = None,
    check: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """ALTI-Logit (Ferrando et al. 2023; spec §7): a logit (difference) split exactly into parts.

    Explains the logit of `target` (minus that of `contrast`) predicted at `position`: every
    attention head's update at that position split over its sources, each MLP's, the
    embedding's and the biases', read through the final norm linearised at its real scale
    (LayerNorm, RMSNorm or Gemma's `1 + w`, read from the module's behaviour), and each layer's
    update mapped to the input tokens through the ALTI rollout below it.

    Args:
        cache_or_model: an ActivationCache (`model.run_with_cache(tokens)`; encoder-decoders:
            `run_with_cache(src, decoder_input=tgt)`), or the model itself with `tokens=`
            (then run here with the needed hooks).
        target / contrast: token ids (an int, or one per batch item as a list or tensor) or token
            strings (each exactly one token, e.g. " Mary"). With a contrast the logit
            difference `target − contrast` is explained.
        position: the position whose next-token logit is explained: an int (negative counts from
            the last real token of each item) or one per batch item. Encoder-decoders: a target
            (decoder input) position.
        heads: keep the per-head, per-source parts `heads[b, layer, head, k]` (head totals always).
        attention_mask / decoder_attention_mask: `[batch, pos]` 1 = real token, as for `attribute`.
        tokens / decoder_tokens: ids or strings for labels (and the input when a model is given).
        check: verify each attention block's decomposition at the explained position and that
            the direct parts sum to the real logit (difference) within 1e-4 relative (fp32
            caches), else ReconstructionError / CompletenessError naming the gap.
        dtype: torch.float32 (default) or torch.float64.

    Returns:
        A LogitAttribution: `by_layer[b, layer, src]`, `tokens[b, src]`, `heads[b, layer, head, k]`,
        `head_totals[b, layer, head]`, `mlp[b, layer]`, `attn_bias[b, layer]`, `embedding[b]`,
        `bias[b]`, `logit[b]` (the real logit (difference)), `completeness_gap[b]`; for
        encoder-decoders also `cross_heads`, `cross_head_totals` and `src` = source then target tokens.
        Soft-capped logits (Gemma-2) are explained before the cap (`result.softcap` says so).
    """
    from lens_alti.prediction import logit_attribution as _impl

    return _impl(
        cache_or_model, target, contrast, position=position, heads=heads, attention_mask=attention_mask,
        decoder_attention_mask=decoder_attention_mask, tokens=tokens, decoder_tokens=decoder_tokens,
        check=check, dtype=dtype,
    )


def routes(
    cache_or_model: Any,
    position: Any = -1,
    *,
    threshold: float = 0.04,
    target: Any = None,
    contrast: Any = None,
    batch: int = 0,
    attention_mask: Tensor | None = None,
    tokens: Any = None,
    logit_mode: str = "direct",
    logit_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Any:
    """Information-flow routes (Ferrando & Voita 2024; spec §8) of one position of one batch item.

    Built top-down from the node (n_layers, position): each reached receiver's parts (every head
    and source, the residual, the MLP) are scored by proximity share (`max(0, ‖y‖₁ − ‖y − part‖₁)`
    normalised over the receiver's parts, spec §3); edges with weight ≥ `threshold` are kept and
    only their sources are expanded, so unreached receivers are never computed. Decoder-only models.

    Args:
        cache_or_model: an ActivationCache or the model with `tokens=`.
        position: the explained position (negative counts from the last real token).
        threshold: edges below this weight are pruned (default 0.04, as in the paper).
        target / contrast: with a target (id or one-token string) the graph explains the prediction
            of `target` (minus `contrast`): edges are weighted by positive logit updates (spec §7,
            normalised) instead of proximity where `logit_mode` says:
            "direct" (default): the top node's parts are all direct parts of the logit (every
            head's output at `position` from each source, in every layer; every MLP; the
            embedding), each an edge from the node it reads; below them, proximity;
            "column": the receivers at `position` in the top `logit_layers` layers (default all)
            weight their own parts (heads, residual, MLP).
        batch: which batch item of the cache to explain.
        attention_mask: `[batch, pos]` as for `attribute`.
        tokens: ids or strings for node labels (and the input when a model is given).

    Returns:
        A Routes graph: `.edges` (DataFrame: layer, kind, head ("mlp"/"residual" or the head index),
        source, receiver, weight, ...), `.head_importance[layer, head]`, `.node_importance`,
        `.to_networkx()`, `.computed_receivers[layer]`.
    """
    from lens_alti.prediction_routes import routes as _impl

    return _impl(
        cache_or_model, position, threshold=threshold, target=target, contrast=contrast, batch=batch,
        attention_mask=attention_mask, tokens=tokens, logit_mode=logit_mode, logit_layers=logit_layers, dtype=dtype,
        progress=progress,
    )
