"""How `attribute` runs: a source of blocks, one plan per model family, and the result it assembles.

A *source* hands every block of a layout to a callback: `CacheSource` reads them from an
ActivationCache, `StreamSource` from a forward pass it runs (each block as soon as its
activations exist, then dropped). A *plan* (`self_attention`, `encoder_decoder`, `merged`) knows
the stacks of its family — which blocks, which masks, which receivers — and assembles the result;
it does not care where the blocks come from. `measure_stacks` is the one loop in between.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_alti.alti.collect import LayerCollector, StackResults
from lens_alti.alti.memory import BlockShape, attribute_memory_check
from lens_alti.alti.prepare import StackChecks, block_vectors
from lens_alti.alti.rollout import encoder_decoder_rollout, split_merged, split_merged_heads
from lens_alti.alti.sinks import SinkMeter, sink_positions
from lens_alti.api.inputs import no_decoder_mask, receivers, token_labels, valid_mask
from lens_alti.api.options import AltiOptions
from lens_alti.errors import UnsupportedModelError
from lens_alti.reading import ModelLayout, check_hooks
from lens_alti.reading.cache import check_decoder_input
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.sinks import cached_input_ids, first_is_special
from lens_alti.reading.stream import forward_inputs, stream_blocks
from lens_alti.results import AltiResult, Seq2SeqAltiResult

OnBlock = Callable[[str, int, AttentionBlock], None]


@dataclass(frozen=True)
class Lengths:
    """The sizes a plan needs: batch, source (or only) length, target length (encoder-decoders), device."""

    batch: int
    source: int
    target: int | None
    device: torch.device


@dataclass(frozen=True)
class Inputs:
    """What the user passed besides the options: masks, receivers of interest, labels, where results go."""

    attention_mask: Any = None
    decoder_attention_mask: Any = None
    positions: Any = None
    tokens: Any = None  # ids or token strings, for labels
    decoder_tokens: Any = None
    output_device: torch.device | str | None = None
    progress: bool | None = None


class CacheSource:
    """Blocks read from an ActivationCache (every hook the layout reads must be in it)."""

    streaming = False

    def __init__(self, cache: Any, model: Any, layout: ModelLayout) -> None:
        check_hooks(cache, layout)
        self.cache, self.model, self.layout = cache, model, layout

    def lengths(self) -> Lengths:
        blocks, cache = self.layout.blocks, self.cache
        if self.layout.family != "encoder_decoder":
            first = cache[blocks["self"][0].hooks[0]]  # [b, h, q, k] pattern, or [b, pos, d] for a mixer layer
            batch, pos = first.shape[0], (first.shape[-1] if first.dim() == 4 else first.shape[1])
            return Lengths(batch, pos, None, first.device)
        enc = blocks["encoder"]
        batch, _, _, src = enc[0].pattern_shape(cache)
        if "merged" in blocks:
            tgt = blocks["merged"][0].pattern_shape(cache)[2]  # [b, h, tgt, tgt + src]
        else:
            tgt = blocks["decoder_self"][0].pattern_shape(cache)[-1]
        return Lengths(batch, src, tgt, cache[enc[0].hooks[0]].device)

    def check_memory(self, options: AltiOptions) -> None:
        """Refuse early (InsufficientMemoryError) when the results and one layer's work cannot fit."""
        cache, layout = self.cache, self.layout
        d_model = int(getattr(getattr(self.model, "cfg", None), "d_model", 0) or 0)
        shapes = []
        for readers in layout.blocks.values():
            if not readers or readers[0].hooks[0] not in cache.keys() or len(readers[0].pattern_shape(cache)) != 4:
                continue
            batch, n_heads, queries, keys = readers[0].pattern_shape(cache)  # [batch, head, query, key]
            channels = max(r.channels_per_head for r in readers)  # per-channel output gates: head·d_head channels
            shapes.append(BlockShape(len(readers), batch, n_heads * channels, queries, keys, d_model))
        device = cache[next(iter(layout.blocks.values()))[0].hooks[0]].device
        size = torch.finfo(options.dtype).bits // 8
        attribute_memory_check(
            shapes, heads=options.heads, max_chunk_bytes=options.max_chunk_bytes, device=device, element_size=size
        )

    def check_target(self, decoder_tokens: Any, allow_shifted_source: bool) -> None:
        """Refuse an encoder-decoder cache that was run without a target (unless allowed)."""
        if not allow_shifted_source:
            check_decoder_input(self.cache, decoder_tokens)

    def input_ids(self, tokens: Any) -> Any:
        """The ids the cache was run on (`tokens` when the cache did not record them and they are ids)."""
        ids = cached_input_ids(self.cache)
        return tokens if ids is None and isinstance(tokens, Tensor) else ids

    def run(self, kinds: list[str], on_block: OnBlock) -> None:
        for kind in kinds:
            for layer, reader in enumerate(self.layout.blocks[kind]):
                on_block(kind, layer, reader.build(self.cache))


class StreamSource:
    """Blocks read from one forward pass of the model on `tokens` (the full cache never exists)."""

    streaming = True

    def __init__(
        self, model: Any, layout: ModelLayout, tokens: Tensor, decoder_tokens: Tensor | None, inputs: Inputs
    ) -> None:
        if "merged" in layout.blocks:  # T5Gemma2: one decoder block over [target ; source] (reading/merged.py)
            raise UnsupportedModelError(
                f"{layout.architecture}: attribute(model, tokens) does not stream merged self+cross attention; run "
                "`_, cache = model.run_with_cache(src, decoder_input=tgt)` and pass the cache"
            )
        self.model, self.layout, self.tokens, self.decoder_tokens = model, layout, tokens, decoder_tokens
        self.forward = forward_inputs(
            model, layout, tokens, inputs.attention_mask, decoder_tokens, inputs.decoder_attention_mask
        )

    def lengths(self) -> Lengths:
        batch, src = self.tokens.shape
        tgt = None if self.decoder_tokens is None else self.decoder_tokens.shape[-1]
        return Lengths(batch, src, tgt, self.tokens.device)

    def check_memory(self, options: AltiOptions) -> None:
        """Streaming holds one layer at a time; its results are checked as the collectors allocate them."""

    def check_target(self, decoder_tokens: Any, allow_shifted_source: bool) -> None:
        """The target prefix is what the model runs on: nothing to check."""

    def input_ids(self, tokens: Any) -> Any:
        """The ids the model runs on."""
        return self.tokens

    def run(self, kinds: list[str], on_block: OnBlock) -> None:
        stream_blocks(self.model, self.layout, self.forward, on_block)


Source = CacheSource | StreamSource


@dataclass
class Stack:
    """One stack of blocks (encoder, decoder self, cross, merged...) measured by one collector."""

    collector: LayerCollector
    valid_q: Bool[Tensor, "b q"]
    valid_k: Bool[Tensor, "b k"]
    checks: StackChecks


def stack(
    n_layers: int,
    valid_q: Tensor,
    valid_k: Tensor,
    options: AltiOptions,
    checks: StackChecks,
    *,
    positions: Int[Tensor, "b r"] | None,
    self_stack: bool,
    device: torch.device | str | None,
) -> Stack:
    """A stack's collector: self-attention stacks restrict their rows to `positions` and roll out."""
    collector = LayerCollector(
        n_layers, valid_q, valid_k, measure=options.measure, heads=options.heads,
        max_chunk_bytes=options.max_chunk_bytes, backend=options.backend, positions=positions,
        restrict_layers=self_stack, rollout=self_stack, device=device,
    )
    return Stack(collector, valid_q, valid_k, checks)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool | None, n_pos: int, total: int) -> Any:
    """A tqdm bar over blocks (default: inputs of ≥ 512 tokens, in a terminal or a notebook), or a no-op."""
    if enabled is None:
        enabled = n_pos >= 512 and (sys.stderr.isatty() or "ipykernel" in sys.modules)
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lens_alti", unit="block")


def measure_stacks(
    source: Source, stacks: dict[str, Stack], options: AltiOptions, progress: bool | None, n_pos: int,
    meter: SinkMeter | None = None,
) -> dict[str, StackResults]:
    """Hand every block of `stacks` from `source` to its collector (checked, masked, decomposed, measured);
    `meter` also sees the attention patterns of the "self" stack (docs/spec.md §10)."""
    total = sum(s.collector.n_layers for s in stacks.values())
    bar = progress_bar(progress, n_pos, total)

    def on_block(kind: str, layer: int, block: AttentionBlock) -> None:
        attention = not block.recurrent and not block.output_gated and block.channels_per_head == 1
        if meter is not None and kind == "self" and attention:
            meter.add(block.pattern)
        s = stacks[kind]
        vectors = block_vectors(block, s.valid_q, s.valid_k, dtype=options.dtype, check=options.check, checks=s.checks)
        s.collector.add(layer, *vectors)
        bar.update(1)

    try:
        source.run(list(stacks), on_block)
    finally:
        bar.close()
    return {kind: s.collector.finish() for kind, s in stacks.items()}


# ------------------------------------------------------------------ the plans, one per family


def self_attention(source: Source, inputs: Inputs, options: AltiOptions) -> AltiResult:
    """Decoder-only and encoder models: one self-attention stack, rolled out."""
    layout = source.layout
    no_decoder_mask(inputs.decoder_attention_mask, layout.architecture)
    n = source.lengths()
    valid = valid_mask(inputs.attention_mask, n.batch, n.source, n.device, "attention_mask")
    positions = receivers(inputs.positions, valid)
    checks = StackChecks(options.measure, options.heads, causal=layout.family == "decoder")
    stacks = {
        "self": stack(len(layout.blocks["self"]), valid, valid, options, checks, positions=positions,
                      self_stack=True, device=inputs.output_device),
    }
    special = first_is_special(source.model, source.input_ids(inputs.tokens), valid)
    meter = None if special is not None and bool(special.all()) else SinkMeter(valid, layout.family == "decoder")
    out = measure_stacks(source, stacks, options, inputs.progress, n.source, meter)["self"]
    labels = token_labels(source.model, inputs.tokens, n.batch, n.source)
    sinks = sink_positions(valid, special, None if meter is None else meter.measured())
    return self_result(out, valid, layout, options.measure, labels, positions, sinks)


def encoder_decoder(source: Source, inputs: Inputs, options: AltiOptions) -> Seq2SeqAltiResult:
    """Encoder-decoders with separate self and cross attention: three stacks, combined by ALTI+ (docs/spec.md §4)."""
    layout, blocks = source.layout, source.layout.blocks
    n = source.lengths()
    assert n.target is not None  # internal: an encoder-decoder source has a target
    src_valid = valid_mask(inputs.attention_mask, n.batch, n.source, n.device, "attention_mask")
    tgt_valid = valid_mask(inputs.decoder_attention_mask, n.batch, n.target, n.device, "decoder_attention_mask")
    positions = receivers(inputs.positions, tgt_valid)
    where = inputs.output_device
    m, h = options.measure, options.heads
    stacks = {
        "encoder": stack(len(blocks["encoder"]), src_valid, src_valid, options, StackChecks(m, h, causal=False),
                         positions=None, self_stack=True, device=where),
        "decoder_self": stack(len(blocks["decoder_self"]), tgt_valid, tgt_valid, options,
                              StackChecks(m, h, causal=True, mask_name="decoder_attention_mask"),
                              positions=positions, self_stack=False, device=where),
        "cross": stack(len(blocks["cross"]), tgt_valid, src_valid, options, StackChecks(m, h),
                       positions=positions, self_stack=False, device=where),
    }
    out = measure_stacks(source, stacks, options, inputs.progress, max(n.source, n.target))
    enc, dec, crs = out["encoder"], out["decoder_self"], out["cross"]
    encoder = self_result(enc, src_valid, layout, m, token_labels(source.model, inputs.tokens, n.batch, n.source), None)
    return seq2seq_result(
        encoder, dec.layers, crs.layers, src_valid, tgt_valid,
        {"encoder": enc.errors, "decoder_self": dec.errors, "cross": crs.errors},
        (dec.heads, dec.heads_residual, crs.heads, crs.heads_residual), layout, m,
        token_labels(source.model, inputs.decoder_tokens, n.batch, n.target, "decoder_tokens"), positions,
    )


def merged(source: Source, inputs: Inputs, options: AltiOptions) -> Seq2SeqAltiResult:
    """ALTI+ of an encoder-decoder whose decoder blocks attend to [target prefix ; source] in one softmax.

    Each merged block's contributions `[T, T+S]` are split by `alti.rollout.split_merged` into a
    self block and a cross block (residual column = the target's whole share) whose ALTI+ rollout
    is exactly the merged block's (per head: `split_merged_heads`, the same split; docs/spec-layouts.md);
    `reconstruction_error["decoder_self"]` and `["cross"]` are both the merged blocks' errors.
    """
    layout, blocks = source.layout, source.layout.blocks
    n = source.lengths()
    assert n.target is not None  # internal: an encoder-decoder source has a target
    src_valid = valid_mask(inputs.attention_mask, n.batch, n.source, n.device, "attention_mask")
    tgt_valid = valid_mask(inputs.decoder_attention_mask, n.batch, n.target, n.device, "decoder_attention_mask")
    keys_valid = torch.cat([tgt_valid, src_valid], dim=1)
    positions = receivers(inputs.positions, tgt_valid)
    m, h, where = options.measure, options.heads, inputs.output_device
    stacks = {
        "encoder": stack(len(blocks["encoder"]), src_valid, src_valid, options, StackChecks(m, h, False),
                         positions=None, self_stack=True, device=where),
        "merged": stack(len(blocks["merged"]), tgt_valid, keys_valid, options, StackChecks(m, h),
                        positions=positions, self_stack=False, device=where),
    }
    out = measure_stacks(source, stacks, options, inputs.progress, max(n.source, n.target))
    enc, mrg = out["encoder"], out["merged"]
    encoder = self_result(enc, src_valid, layout, m, token_labels(source.model, inputs.tokens, n.batch, n.source), None)
    decoder_self, cross = split_merged(mrg.layers, n.target)
    head_parts: tuple[Tensor | None, ...] = (None, None, None, None)
    if mrg.heads is not None and mrg.heads_residual is not None:
        head_parts = split_merged_heads(mrg.heads, mrg.heads_residual, n.target)
    return seq2seq_result(
        encoder, decoder_self, cross, src_valid, tgt_valid,
        {"encoder": enc.errors, "decoder_self": mrg.errors, "cross": mrg.errors}, head_parts, layout, m,
        token_labels(source.model, inputs.decoder_tokens, n.batch, n.target, "decoder_tokens"), positions,
    )


def plan_for(layout: ModelLayout) -> Callable[[Source, Inputs, AltiOptions], AltiResult | Seq2SeqAltiResult]:
    """The plan of the layout's family."""
    if layout.family != "encoder_decoder":
        return self_attention
    return merged if "merged" in layout.blocks else encoder_decoder


# ------------------------------------------------------------------ assembling results


def self_result(
    out: StackResults,
    valid: Tensor,
    layout: ModelLayout,
    measure: str,
    str_tokens: list[list[str]] | None,
    positions: Tensor | None,
    sinks: Tensor | None = None,
) -> AltiResult:
    """The AltiResult of one rolled-out self-attention stack (`sinks[b, pos]`: docs/spec.md §10)."""
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
        sinks=None if sinks is None else sinks.to(device),
    )


def seq2seq_result(
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
