"""How `attribute` runs: one plan per model family and way of reading, and the result it assembles.

A *plan* knows the stacks of its family — which blocks, which masks, which receivers — and
assembles the result; it does not care where the blocks come from (a source,
`lens_alti.api.sources`). The bottom-up plans (`self_attention`, `encoder_decoder`, `merged`)
take every block as the source hands it over; `measure_stacks` is the one loop in between.
`top_down` (decoder-only and encoder models with `positions=`) reads the layers from the top,
one at a time, and pushes the rollout rows of the explained positions down (docs/spec.md §12).
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
from lens_alti.alti.contributions import block_contributions, head_output_contributions
from lens_alti.alti.masking import check_declared_padding
from lens_alti.alti.prepare import StackChecks, block_vectors
from lens_alti.alti.rollout import encoder_decoder_rollout, split_merged, split_merged_heads
from lens_alti.alti.rows import RowWise
from lens_alti.alti.topdown import RowRollout
from lens_alti.api.inputs import no_decoder_mask, receivers, token_labels, valid_mask
from lens_alti.api.options import AltiOptions
from lens_alti.api.sinks import SinkFinder
from lens_alti.api.sources import CacheSource, Inputs, ReplaySource, Source
from lens_alti.errors import UnsupportedModelError
from lens_alti.reading import ModelLayout
from lens_alti.reading.records import AttentionBlock
from lens_alti.results import AltiResult, Seq2SeqAltiResult

Plan = Callable[[Source, Inputs, AltiOptions], AltiResult | Seq2SeqAltiResult]


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
    sinks: SinkFinder | None = None,
) -> dict[str, StackResults]:
    """Hand every block of `stacks` from `source` to its collector (checked, masked, decomposed, measured);
    `sinks` also sees the blocks of the "self" stack (docs/spec.md §10)."""
    total = sum(s.collector.n_layers for s in stacks.values())
    bar = progress_bar(progress, n_pos, total)

    def on_block(kind: str, layer: int, block: AttentionBlock) -> None:
        if sinks is not None and kind == "self":
            sinks.add(block)
        s = stacks[kind]
        vectors = block_vectors(block, s.valid_q, s.valid_k, dtype=options.dtype, check=options.check, checks=s.checks)
        s.collector.add(layer, *vectors)
        bar.update(1)

    assert not isinstance(source, ReplaySource)  # internal: plan_for gives a replay to top_down only
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
    sinks = finder(source, inputs, valid, options)
    out = measure_stacks(source, stacks, options, inputs.progress, n.source, sinks)["self"]
    labels = token_labels(source.model, inputs.tokens, n.batch, n.source)
    return self_result(out, valid, layout, options.measure, labels, positions, sinks.sinks())


def finder(source: Source, inputs: Inputs, valid: Tensor, options: AltiOptions) -> SinkFinder:
    """The attention sinks' finder of a decoder-only or encoder run (docs/spec.md §10)."""
    causal = source.layout.family == "decoder"
    return SinkFinder(source.model, source.input_ids(inputs.tokens), valid, causal, options.max_chunk_bytes)


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


def reads_top_down(layout: ModelLayout, positions: Any) -> bool:
    """`positions` given, and a stack of attention layers each readable on its own (decoders, encoders):
    the `top_down` plan."""
    readers = layout.blocks.get("self", [])
    return positions is not None and layout.family in ("decoder", "encoder") and bool(readers) and all(
        r.rows for r in readers
    )


def plan_for(source: Source, inputs: Inputs) -> Plan:
    """The plan of the source's layout: `top_down` for a few positions where a cache or a replay gives the
    layers one by one, else the bottom-up plan of the family."""
    layout = source.layout
    if isinstance(source, (CacheSource, ReplaySource)) and reads_top_down(layout, inputs.positions):
        return top_down
    if layout.family != "encoder_decoder":
        return self_attention
    return merged if "merged" in layout.blocks else encoder_decoder


def top_down(source: Source, inputs: Inputs, options: AltiOptions) -> AltiResult:
    """Decoder-only and encoder models with `positions=`: every layer read once, from the top (docs/spec.md §12).

    Per layer: the contribution rows of the explained positions (`layers`), their per-head
    contributions with `heads=True`, and every rollout row pushed one layer down
    (`alti.topdown.RowRollout`; the rows `e_p` of layer l are added before its own block). The
    numbers are those of `self_attention`, up to the order of the rollout's float sums.
    """
    assert isinstance(source, (CacheSource, ReplaySource))  # internal: plan_for gives this plan those sources
    layout, n = source.layout, source.lengths()
    no_decoder_mask(inputs.decoder_attention_mask, layout.architecture)
    valid = valid_mask(inputs.attention_mask, n.batch, n.source, n.device, "attention_mask")
    positions = receivers(inputs.positions, valid)
    assert positions is not None  # internal: this plan runs with positions
    readers = layout.blocks["self"]
    if isinstance(source, CacheSource):  # the cache's padding must be the declared one (docs/spec.md §1h)
        first = readers[0].build(source.cache)
        if first.pattern_is_distribution:
            check_declared_padding(first, valid, causal=layout.family == "decoder", mask_name="attention_mask")
    where = torch.device(inputs.output_device) if inputs.output_device is not None else n.device
    roll = RowRollout(n.batch, n.source, options.dtype, where)
    layers = torch.zeros(n.batch, len(readers), positions.shape[1], n.source, dtype=options.dtype, device=where)
    heads: list[tuple[Tensor, ...]] = []
    injected: list[slice] = []
    errors: list[float] = []
    bar = progress_bar(inputs.progress, n.source, len(readers))
    sinks = finder(source, inputs, valid, options)
    try:
        for layer in reversed(range(len(readers))):
            record = readers[layer].build(source.store(layer))
            sinks.add(record)
            block = RowWise(record, valid, valid, dtype=options.dtype, check=options.check)
            injected.insert(0, roll.add(one_hot(positions.to(where), n.source, options.dtype)))
            kept, err = roll.through(block, options.measure, keep=positions, max_chunk_bytes=options.max_chunk_bytes,
                                     backend=options.backend)
            assert kept is not None  # internal: the positions' rows are always kept
            layers[:, layer] = kept[..., : n.source].to(where)
            errors.insert(0, err)
            if options.heads:
                heads.insert(0, head_rows(block, positions, options))
            del record, block  # one layer at a time: dropped before the next one is read
            bar.update(1)
    finally:
        bar.close()
    out = StackResults(layers=layers, errors=torch.tensor(errors, dtype=torch.float64))
    out.rollout = torch.stack([roll.vectors[:, rows] for rows in injected], 1)
    if heads:
        stack_heads(out, heads)
    labels = token_labels(source.model, inputs.tokens, n.batch, n.source)
    return self_result(out, valid, layout, options.measure, labels, positions, sinks.sinks())


def one_hot(positions: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """`[b, r, n]` rows e_p for the positions `[b, r]`."""
    out = torch.zeros(*positions.shape, n, dtype=dtype, device=positions.device)
    return out.scatter_(2, positions[..., None], 1.0)


def head_rows(block: RowWise, positions: Tensor, options: AltiOptions) -> tuple[Tensor, ...]:
    """Per-head contributions (docs/spec.md §3) of the explained rows: heads, residual, head outputs, residual."""
    tv, _ = block.vectors(positions)
    key_mask = None if bool(block.valid_k.all()) else block.valid_k
    hc = block_contributions(tv, "l1", heads=True, key_mask=key_mask, max_chunk_bytes=options.max_chunk_bytes,
                             backend=options.backend)
    outputs, outputs_residual = head_output_contributions(tv)
    assert hc.heads is not None and hc.heads_residual is not None  # internal: computed with heads=True
    return hc.heads, hc.heads_residual, outputs, outputs_residual


def stack_heads(out: StackResults, rows: list[tuple[Tensor, ...]]) -> None:
    """Stack the layers' per-head rows into `out`, refusing layers with different head counts."""
    counts = sorted({r[0].shape[1] for r in rows})
    if len(counts) > 1:
        raise UnsupportedModelError(
            f"per-head results need one head count for every layer, but the layers have {counts} heads "
            "(per-layer head counts, e.g. Laguna); use heads=False"
        )
    where = out.layers.device
    out.heads, out.heads_residual, out.head_outputs, out.head_outputs_residual = (
        torch.stack([r[i] for r in rows], 1).to(where) for i in range(4)
    )


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
