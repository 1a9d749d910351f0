"""`attribute`: the one entry point from a cache to ALTI contributions."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.backend import resolve as resolve_backend
from lens_alti.alti.collect import LayerCollector, StackResults
from lens_alti.alti.contributions import BACKENDS, DEFAULT_CHUNK_BYTES, MEASURES
from lens_alti.alti.memory import BlockShape, attribute_memory_check
from lens_alti.alti.prepare import StackChecks, block_vectors
from lens_alti.alti.receivers import resolve_positions
from lens_alti.alti.rollout import (
    attention_rollout_layers,
    encoder_decoder_rollout,
    rollout,
    split_merged,
    split_merged_heads,
)
from lens_alti.errors import (
    InvalidArgumentError,
    MissingHooksError,
    MissingTargetError,
    UnsupportedModelError,
    WeightProcessingWarning,
)

# Entry points whose work lives in its own module (re-exported here, documented there).
from lens_alti.reading import BlockReader, ModelLayout, cache_and_model, check_hooks, is_cache, model_layout
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.stream import forward_inputs, stream_blocks, tokenize
from lens_alti.results import AltiResult, Seq2SeqAltiResult
from lens_alti.validation import check_choice, check_size, check_str_tokens, check_token_ids, check_type


def hook_names(model: Any, parallel_mlp: str = "exclude") -> list[str]:
    """Every hook `attribute` reads for `model`: usable as `run_with_cache(names_filter=...)`."""
    return model_layout(model, parallel_mlp).hook_names()


def _prepare_mask(attention_mask: Tensor | None, batch: int, pos: int, device: torch.device, what: str) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    mask = torch.as_tensor(attention_mask, device=device)
    if mask.shape != (batch, pos):
        raise InvalidArgumentError(what, f"shape {tuple(mask.shape)}", f"the cache's [batch, pos] = [{batch}, {pos}]")
    if not ((mask == 0) | (mask == 1)).all():
        raise InvalidArgumentError(what, attention_mask, "only 0 (padding) and 1 (real token)")
    return mask.bool()


def _collector(
    n_layers: int,
    valid_q: Tensor,
    valid_k: Tensor,
    opts: dict[str, Any],
    *,
    positions: Tensor | None,
    self_stack: bool,
    device: torch.device | str | None,
) -> LayerCollector:
    return LayerCollector(
        n_layers, valid_q, valid_k, measure=opts["measure"], heads=opts["heads"],
        max_chunk_bytes=opts["max_chunk_bytes"], backend=opts["backend"], positions=positions,
        restrict_layers=self_stack, rollout=self_stack, device=device,
    )


def _run_blocks(
    readers: list[BlockReader],
    cache: Any,
    collector: LayerCollector,
    valid_q: Tensor,
    valid_k: Tensor,
    *,
    dtype: torch.dtype,
    check: bool,
    checks: StackChecks,
    progress: Any,
) -> StackResults:
    """Read, decompose and measure every block of one kind (encoder, decoder self, cross...).

    Each layer's results are written into tensors allocated once for all layers, so the
    peak memory is the results plus one layer's working set.
    """
    for layer, reader in enumerate(readers):
        block = reader.build(cache)
        collector.add(layer, *block_vectors(block, valid_q, valid_k, dtype=dtype, check=check, checks=checks))
        progress.update(1)
    return collector.finish()


def _check_memory(cache: Any, layout: ModelLayout, model: Any, heads: bool, max_chunk_bytes: int, dtype: Any) -> None:
    """Refuse early (InsufficientMemoryError) when the results and one layer's work cannot fit (alti/memory.py)."""
    d_model = int(getattr(getattr(model, "cfg", None), "d_model", 0) or 0)

    def shape(r: list[BlockReader]) -> BlockShape:
        batch, n_heads, queries, keys = r[0].pattern_shape(cache)  # hook_pattern [batch, head, query, key]
        channels = max(x.channels_per_head for x in r)  # per-channel output gates: head·d_head channels
        return BlockShape(len(r), batch, n_heads * channels, queries, keys, d_model)

    shapes = [
        shape(r)
        for r in layout.blocks.values()
        if r and r[0].hooks[0] in cache.keys() and len(r[0].pattern_shape(cache)) == 4
    ]
    device = cache[layout.blocks[next(iter(layout.blocks))][0].hooks[0]].device
    size = torch.finfo(dtype).bits // 8
    attribute_memory_check(shapes, heads=heads, max_chunk_bytes=max_chunk_bytes, device=device, element_size=size)


def _str_tokens(
    model: Any, tokens: Any, batch: int, pos: int | None = None, name: str = "tokens"
) -> list[list[str]] | None:
    if tokens is None:
        return None
    if pos is not None and not isinstance(tokens, (list, tuple)):  # token ids: one row per batch item, pos long
        ids = tokens = check_token_ids(name, tokens, dims=(1, 2))
        n_rows = ids.shape[0] if ids.dim() == 2 else 1
        if ids.shape[-1] != pos or n_rows != batch:
            raise InvalidArgumentError(
                name, f"ids of shape {tuple(ids.shape)}", f"[batch, pos] = [{batch}, {pos}], the cache's shape "
                f"(tokens has {n_rows} rows but the cache has batch size {batch}; labels would be misaligned)"
            )
    if pos is not None and isinstance(tokens, (str, list, tuple)):
        check_str_tokens(name, tokens, [pos] * batch)
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
        raise InvalidArgumentError("tokens", f"{len(out)} rows", f"one row per batch item ({batch})")
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


def _check_decoder_input(cache: Any, decoder_tokens: Any = None) -> None:
    """TransformerLens feeds the source shifted right when decoder_input is missing.

    The decoder input alone cannot tell that from a real identity translation; decoder token
    ids passed to `attribute` and equal to the decoder input can (someone who forgot the
    target has none to pass), and `allow_shifted_source=True` overrides the check.
    """
    if "embed.hook_in" not in cache.keys() or "decoder_embed.hook_in" not in cache.keys():
        return
    src, tgt = cache["embed.hook_in"], cache["decoder_embed.hook_in"]
    if src.dtype.is_floating_point or tgt.shape != src.shape or src.shape[-1] < 2:
        return
    if isinstance(decoder_tokens, Tensor) and decoder_tokens.numel() == tgt.numel():
        if decoder_tokens.reshape(tgt.shape).cpu().equal(tgt.cpu()):
            return  # the caller holds the target ids the cache was run with
    if torch.equal(tgt[:, 1:], src[:, :-1]) and bool((tgt[:, 0] == tgt[0, 0]).all()):
        raise MissingTargetError(
            "this encoder-decoder cache was run without a target: TransformerLens then feeds the "
            "source shifted right as the decoder input. Run "
            "`model.run_with_cache(src_tokens, decoder_input=tgt_tokens)` with the target prefix to explain. "
            "If the target prefix really is the source shifted right (an identity translation), pass "
            "decoder_tokens=tgt_tokens or allow_shifted_source=True."
        )


def _model_tokens(model: Any, tokens: Any, what: str) -> tuple[Tensor, Tensor | None]:
    """(ids `[batch, pos]`, mask from tokenising several texts or None) for streaming."""
    if tokens is None:
        raise ValueError(f"attribute(model, ...) runs the model itself: pass {what}= (token ids or text)")
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        return tokenize(model, tokens if isinstance(tokens, str) else list(tokens))
    ids = torch.as_tensor(tokens)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"{what} must be integer token ids [batch, pos] (or text), got {tuple(ids.shape)} {ids.dtype}")
    return ids, None


def _input_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _stream(
    model: Any,
    layout: ModelLayout,
    inputs: dict[str, Any],
    stacks: dict[str, tuple[LayerCollector, Tensor, Tensor]],
    *,
    dtype: torch.dtype,
    check: bool,
    checks: dict[str, StackChecks],
    progress: Any,
) -> None:
    """Run the model once; measure each block as soon as its activations exist."""

    def on_block(kind: str, layer: int, block: AttentionBlock) -> None:
        collector, valid_q, valid_k = stacks[kind]
        vectors = block_vectors(block, valid_q, valid_k, dtype=dtype, check=check, checks=checks[kind])
        collector.add(layer, *vectors)
        progress.update(1)

    stream_blocks(model, layout, inputs, on_block)


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
) -> AltiResult | Seq2SeqAltiResult:
    """ALTI contributions for every layer (and head), with rollout, from a cache or a model.

    Args:
        cache: the ActivationCache of `logits, cache = model.run_with_cache(tokens)` for a
            TransformerLens TransformerBridge (weights are read from `cache.model`); for an
            encoder-decoder, `model.run_with_cache(src, decoder_input=tgt)`.
            Or the model itself (streaming): `attribute(model, tokens=ids_or_text, ...)` runs
            the forward pass with hooks that measure each block as soon as its activations
            exist and then drop them, so the full cache never exists. Same numbers.
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

    Returns:
        Decoder-only and encoder models: an AltiResult with `layers`, `rollout`
        (`[batch, layer, query, key]`) and, with `heads=True`, `heads`
        (`[batch, layer, head, query, key]`) and `heads_residual`.
        Encoder-decoder models: a Seq2SeqAltiResult (`encoder`, `decoder_self`, `cross`,
        `total`, `source_contribution`).
    """
    if measure not in MEASURES:
        raise InvalidArgumentError("measure", measure, f"one of {', '.join(MEASURES)} (unknown measure {measure!r})")
    check_choice("backend", backend, BACKENDS)
    check_choice("dtype", dtype, (torch.float32, torch.float64))
    max_chunk_bytes = check_size("max_chunk_bytes", max_chunk_bytes, minimum=1)
    for flag, value in (("heads", heads), ("check", check), ("allow_shifted_source", allow_shifted_source)):
        check_type(flag, value, bool, "True or False")
    streaming = not is_cache(cache)
    if streaming:
        model = cache
        layout = model_layout(model, parallel_mlp)
        device = _input_device(model)
        ids, text_mask = _model_tokens(model, tokens, "tokens")
        ids = ids.to(device)
        if text_mask is not None:
            if attention_mask is not None:
                raise ValueError("pass either a list of texts (padded and masked for you) or ids with attention_mask")
            attention_mask = text_mask
        dec_ids = None
        if layout.family == "encoder_decoder" and decoder_tokens is not None:
            dec_ids = _model_tokens(model, decoder_tokens, "decoder_tokens")[0].to(device)
        tokens, decoder_tokens = ids, dec_ids
    else:
        cache, model = cache_and_model(cache)
        layout = model_layout(model, parallel_mlp)
        check_hooks(cache, layout)
        _check_memory(cache, layout, model, heads, max_chunk_bytes, dtype)
    if layout.weight_processing != "raw":
        warnings.warn(
            f"the model's weights were {layout.weight_processing}: ALTI is exact for this processed model but "
            "its numbers differ from the raw model's. For the unprocessed numbers boot the bridge without "
            "compatibility mode, or load a HookedTransformer with from_pretrained_no_processing.",
            WeightProcessingWarning,
            stacklevel=2,
        )
    # The backend is chosen once for the whole call (alti/backend.py); streaming decides per block.
    chosen = resolve_backend(backend, None if streaming else cache, layout, heads=heads, dtype=dtype)
    opts = {"measure": measure, "heads": heads, "max_chunk_bytes": max_chunk_bytes, "backend": chosen}
    run: dict[str, Any] = {"dtype": dtype, "check": check}
    n_blocks = sum(len(r) for r in layout.blocks.values())

    if layout.family != "encoder_decoder":
        if decoder_attention_mask is not None:
            raise InvalidArgumentError(
                "decoder_attention_mask", "a mask", f"None (only encoder-decoders take it, not {layout.architecture})"
            )
        readers = layout.blocks["self"]
        if streaming:
            (batch, pos), where = tokens.shape, tokens.device
        else:
            first = cache[readers[0].hooks[0]].shape  # [b, h, q, k] pattern, or [b, pos, d] for a mixer layer
            batch, pos = first[0], (first[-1] if len(first) == 4 else first[1])
            where = cache[readers[0].hooks[0]].device
        valid = _prepare_mask(attention_mask, batch, pos, where, "attention_mask")
        pos_idx = resolve_positions(positions, valid)
        col = _collector(len(readers), valid, valid, opts, positions=pos_idx, self_stack=True, device=output_device)
        bar = _progress(progress, pos, n_blocks)
        self_checks = StackChecks(measure, heads, causal=layout.family == "decoder")
        try:
            if streaming:
                inputs = forward_inputs(model, layout, tokens, attention_mask, None, None)
                stacks = {"self": (col, valid, valid)}
                _stream(model, layout, inputs, stacks, checks={"self": self_checks}, progress=bar, **run)
                out = col.finish()
            else:
                out = _run_blocks(readers, cache, col, valid, valid, checks=self_checks, progress=bar, **run)
        finally:
            bar.close()
        return _self_result(out, valid, layout, measure, _str_tokens(model, tokens, batch, pos), pos_idx)

    if "merged" in layout.blocks:  # T5Gemma2: one decoder block over [target ; source] (reading/merged.py)
        if streaming:
            raise UnsupportedModelError(
                f"{layout.architecture}: attribute(model, tokens) does not stream merged self+cross attention; run "
                "`_, cache = model.run_with_cache(src, decoder_input=tgt)` and pass the cache"
            )
        return _merged_seq2seq(
            cache, model, layout, tokens, decoder_tokens, attention_mask, decoder_attention_mask, positions,
            opts, run, progress, output_device, allow_shifted_source,
        )
    enc, dec, crs = layout.blocks["encoder"], layout.blocks["decoder_self"], layout.blocks["cross"]
    if streaming:
        if decoder_tokens is None:
            forward_inputs(model, layout, tokens, None, None, None)  # raises: the target prefix is needed
        (batch, src_len), tgt_len, device = tokens.shape, decoder_tokens.shape[-1], tokens.device
    else:
        if not allow_shifted_source:
            _check_decoder_input(cache, decoder_tokens)
        batch, _, _, src_len = enc[0].pattern_shape(cache)
        tgt_len = dec[0].pattern_shape(cache)[-1]
        device = cache[enc[0].hooks[0]].device
    src_valid = _prepare_mask(attention_mask, batch, src_len, device, "attention_mask")
    tgt_valid = _prepare_mask(decoder_attention_mask, batch, tgt_len, device, "decoder_attention_mask")
    pos_idx = resolve_positions(positions, tgt_valid)
    where = {"device": output_device}
    enc_col = _collector(len(enc), src_valid, src_valid, opts, positions=None, self_stack=True, **where)
    self_col = _collector(len(dec), tgt_valid, tgt_valid, opts, positions=pos_idx, self_stack=False, **where)
    cross_col = _collector(len(crs), tgt_valid, src_valid, opts, positions=pos_idx, self_stack=False, **where)
    bar = _progress(progress, max(src_len, tgt_len), n_blocks)
    checks = {
        "encoder": StackChecks(measure, heads, causal=False),
        "decoder_self": StackChecks(measure, heads, causal=True, mask_name="decoder_attention_mask"),
        "cross": StackChecks(measure, heads),
    }
    try:
        if streaming:
            inputs = forward_inputs(model, layout, tokens, attention_mask, decoder_tokens, decoder_attention_mask)
            stacks = {
                "encoder": (enc_col, src_valid, src_valid),
                "decoder_self": (self_col, tgt_valid, tgt_valid),
                "cross": (cross_col, tgt_valid, src_valid),
            }
            _stream(model, layout, inputs, stacks, checks=checks, progress=bar, **run)
            enc_out, self_out, cross_out = enc_col.finish(), self_col.finish(), cross_col.finish()
        else:
            common = {"progress": bar, **run}
            enc_out = _run_blocks(enc, cache, enc_col, src_valid, src_valid, checks=checks["encoder"], **common)
            self_out = _run_blocks(dec, cache, self_col, tgt_valid, tgt_valid, checks=checks["decoder_self"], **common)
            cross_out = _run_blocks(crs, cache, cross_col, tgt_valid, src_valid, checks=checks["cross"], **common)
    finally:
        bar.close()
    encoder = _self_result(enc_out, src_valid, layout, measure, _str_tokens(model, tokens, batch, src_len), None)
    return _seq2seq_result(
        encoder, self_out.layers, cross_out.layers, src_valid, tgt_valid,
        {"encoder": enc_out.errors, "decoder_self": self_out.errors, "cross": cross_out.errors},
        (self_out.heads, self_out.heads_residual, cross_out.heads, cross_out.heads_residual),
        layout, measure, _str_tokens(model, decoder_tokens, batch, tgt_len, "decoder_tokens"), pos_idx,
    )


def _merged_seq2seq(
    cache: Any, model: Any, layout: ModelLayout, tokens: Any, decoder_tokens: Any, attention_mask: Any,
    decoder_attention_mask: Any, positions: Any, opts: dict[str, Any], run: dict[str, Any], progress: Any,
    output_device: Any, allow_shifted_source: bool,
) -> Seq2SeqAltiResult:
    """ALTI+ of an encoder-decoder whose decoder blocks attend to [target prefix ; source] in one softmax.

    Each merged block's contributions `[T, T+S]` are split by `alti.rollout.split_merged` into a
    self block and a cross block (residual column = the target's whole share) whose ALTI+ rollout
    is exactly the merged block's (per head: `split_merged_heads`, the same split);
    `reconstruction_error["decoder_self"]` and `["cross"]` are both the merged blocks' errors.
    """
    measure, heads = opts["measure"], opts["heads"]
    if not allow_shifted_source:
        _check_decoder_input(cache, decoder_tokens)
    enc, mrg = layout.blocks["encoder"], layout.blocks["merged"]
    batch, _, _, src_len = enc[0].pattern_shape(cache)
    tgt_len = mrg[0].pattern_shape(cache)[2]
    device = cache[enc[0].hooks[0]].device
    src_valid = _prepare_mask(attention_mask, batch, src_len, device, "attention_mask")
    tgt_valid = _prepare_mask(decoder_attention_mask, batch, tgt_len, device, "decoder_attention_mask")
    keys_valid = torch.cat([tgt_valid, src_valid], dim=1)
    pos_idx = resolve_positions(positions, tgt_valid)
    enc_col = _collector(len(enc), src_valid, src_valid, opts, positions=None, self_stack=True, device=output_device)
    mrg_col = _collector(len(mrg), tgt_valid, keys_valid, opts, positions=pos_idx, self_stack=False,
                         device=output_device)
    bar = _progress(progress, max(src_len, tgt_len), len(enc) + len(mrg))
    try:
        enc_out = _run_blocks(enc, cache, enc_col, src_valid, src_valid, checks=StackChecks(measure, heads, False),
                              progress=bar, **run)
        mrg_out = _run_blocks(mrg, cache, mrg_col, tgt_valid, keys_valid, checks=StackChecks(measure, heads),
                              progress=bar, **run)
    finally:
        bar.close()
    encoder = _self_result(enc_out, src_valid, layout, measure, _str_tokens(model, tokens, batch, src_len), None)
    decoder_self, cross = split_merged(mrg_out.layers, tgt_len)
    head_parts: tuple[Tensor | None, ...] = (None, None, None, None)
    if mrg_out.heads is not None and mrg_out.heads_residual is not None:
        head_parts = split_merged_heads(mrg_out.heads, mrg_out.heads_residual, tgt_len)
    return _seq2seq_result(
        encoder, decoder_self, cross, src_valid, tgt_valid,
        {"encoder": enc_out.errors, "decoder_self": mrg_out.errors, "cross": mrg_out.errors},
        head_parts, layout, measure, _str_tokens(model, decoder_tokens, batch, tgt_len, "decoder_tokens"), pos_idx,
    )


def _seq2seq_result(
    encoder: AltiResult,
    decoder_self: Tensor,
    cross: Tensor,
    src_valid: Tensor,
    tgt_valid: Tensor,
    errors: dict[str, Tensor],
    head_parts: tuple[Tensor | None, ...],
    layout: ModelLayout,
    measure: str,
    target_str_tokens: list[list[str]] | None,
    positions: Tensor | None,
) -> Seq2SeqAltiResult:
    """The ALTI+ result from the encoder's result and the decoder's per-layer self and cross
    contributions; `head_parts` = (self heads, self heads' residual, cross heads, cross heads' residual)."""
    total = encoder_decoder_rollout(encoder.rollout[:, -1], cross, decoder_self)
    tgt_mask = tgt_valid.to(total.device)
    return Seq2SeqAltiResult(
        encoder=encoder,
        decoder_self=decoder_self,
        cross=cross,
        total=total * tgt_mask[:, None, :, None].to(total.dtype),
        source_mask=src_valid.long().to(total.device),
        target_mask=tgt_mask.long(),
        reconstruction_error=errors,
        measure=measure,
        architecture=layout.architecture,
        weight_processing=layout.weight_processing,
        decoder_self_heads=head_parts[0],
        decoder_self_heads_residual=head_parts[1],
        cross_heads=head_parts[2],
        cross_heads_residual=head_parts[3],
        source_str_tokens=encoder.str_tokens,
        target_str_tokens=target_str_tokens,
        positions=None if positions is None else positions.to(total.device),
    )


def _self_result(
    out: StackResults,
    valid: Tensor,
    layout: ModelLayout,
    measure: str,
    str_tokens: list[list[str]] | None,
    positions: Tensor | None,
) -> AltiResult:
    device = out.layers.device
    assert out.rollout is not None  # internal: a self-attention stack's collector computes the rollout
    return AltiResult(
        layers=out.layers,
        rollout=out.rollout,
        attention_mask=valid.long().to(device),
        reconstruction_error=out.errors,
        measure=measure,
        architecture=layout.architecture,
        weight_processing=layout.weight_processing,
        heads=out.heads,
        heads_residual=out.heads_residual,
        head_outputs=out.head_outputs,
        head_outputs_residual=out.head_outputs_residual,
        str_tokens=str_tokens,
        positions=None if positions is None else positions.to(device),
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
        raise InvalidArgumentError("cache", "an encoder-decoder cache", "a decoder-only or encoder model's cache")
    names = [r.hooks[0] for r in layout.blocks["self"]]
    not_attention = [r.name for r in layout.blocks["self"] if not r.hooks[0].endswith("hook_pattern")]
    if not_attention:  # linear-recurrent mixers (reading/mixers) have no attention pattern to roll out
        raise UnsupportedModelError(
            f"{layout.architecture}: attention rollout needs an attention pattern in every layer, but "
            f"{', '.join(not_attention[:4])}{' ...' if len(not_attention) > 4 else ''} are not attention layers "
            "with a cached pattern; use attribute(cache).rollout (ALTI's rollout covers them)"
        )
    missing = [n for n in names if n not in cache.keys()]
    if missing:
        raise MissingHooksError(missing, "attention_rollout reads every layer's hook_pattern.")
    patterns = torch.stack([cache[n].float() for n in names], dim=1)
    batch, pos = patterns.shape[0], patterns.shape[-1]
    valid = _prepare_mask(attention_mask, batch, pos, patterns.device, "attention_mask")
    return rollout(attention_rollout_layers(patterns, valid) * valid[:, None, :, None])
