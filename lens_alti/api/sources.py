"""Where the blocks of an explanation come from: a cache, a forward pass, or a model's layers run again.

A *source* hands a plan (`lens_alti.api.plans`) the blocks of a layout:

- `CacheSource`: an ActivationCache the user made; `run` hands every block over, `store(layer)`
  is the cache itself;
- `StreamSource`: one forward pass of the model with hooks (`lens_alti.reading.stream`); each
  block is handed over as soon as its activations exist, then dropped (the bottom-up plans);
- `ReplaySource`: the model run once, recording each layer's input, then its layers run again
  one at a time on demand, `store(layer)` (`lens_alti.reading.replay`, docs/spec.md §12): the
  source of every entry point that explains a few positions of a model (`attribute(...,
  positions=...)`, `logit_attribution`, `routes`), memory linear in n.

How a model's attention runs (`attention=`, `ReplaySource` only): "recomputed" runs it with
memory-efficient attention and recomputes the attention rows a plan reads from the queries and
keys (`lens_alti.reading.efficient`, docs/spec.md §9), refused naming why where that is not
possible; "eager" runs the model's eager attention (one layer's `[head, n, n]` pattern at a
time); "auto" (default) recomputes where possible.

Every source that runs the model estimates the memory of the call before the forward pass and
refuses it with `InsufficientMemoryError` naming the knob to turn (`check_memory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.memory import (
    ATTRIBUTE_ADVICE,
    EAGER_ADVICE,
    RUN_ADVICE,
    BlockShape,
    ModelShape,
    attribute_memory_check,
    check_fits,
    replay_bytes,
    stream_bytes,
)
from lens_alti.api.inputs import input_device, model_input
from lens_alti.api.options import AltiOptions
from lens_alti.api.sinks import input_ids as cached_ids
from lens_alti.errors import InvalidArgumentError, UnsupportedModelError
from lens_alti.reading import ModelLayout, cache_and_model, check_hooks, is_cache, model_layout
from lens_alti.reading.cache import check_decoder_input
from lens_alti.reading.efficient import recomputable
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.replay import LayerReplay, replayable
from lens_alti.reading.stream import forward_inputs, stream_blocks
from lens_alti.validation import check_choice

ATTENTION = ("auto", "recomputed", "eager")

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
        return cached_ids(self.cache, tokens)

    def store(self, layer: int) -> Any:
        """The activations of layer `layer`: the cache itself."""
        return self.cache

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
        """Refuse (InsufficientMemoryError) before the forward pass when the results, one layer's eager forward
        pass and working set and the running rollout cannot fit."""
        shape = model_shape(self.model, *self.tokens.shape)
        lengths = [self.tokens.shape[-1]] + ([] if self.decoder_tokens is None else [self.decoder_tokens.shape[-1]])
        n = max(lengths)
        blocks = [BlockShape(len(readers), shape.batch, shape.heads, n, n, shape.d_model)
                  for readers in self.layout.blocks.values()]
        size = torch.finfo(options.dtype).bits // 8
        need = stream_bytes(replace(shape, pos=n), blocks, heads=options.heads,
                            max_chunk_bytes=options.max_chunk_bytes, element_size=size)
        check_fits(need, self.tokens.device, "attribute", ATTRIBUTE_ADVICE + " " + EAGER_ADVICE.format(why=""))

    def check_target(self, decoder_tokens: Any, allow_shifted_source: bool) -> None:
        """The target prefix is what the model runs on: nothing to check."""

    def input_ids(self, tokens: Any) -> Any:
        """The ids the model runs on."""
        return self.tokens

    def run(self, kinds: list[str], on_block: OnBlock) -> None:
        stream_blocks(self.model, self.layout, self.forward, on_block)


class ReplaySource:
    """The layers of one forward pass of `model` on `tokens`, run again on demand (see the module doc).

    `extra_hooks[layer]`: hooks kept besides the layer's reader's (a logit attribution's MLP write,
    the embedding, the final residual).
    """

    streaming = True

    def __init__(
        self, model: Any, layout: ModelLayout, tokens: Tensor, attention_mask: Tensor | None, *,
        attention: str = "auto", extra_hooks: dict[int, tuple[str, ...]] | None = None, rows: int = 1,
    ) -> None:
        why = replayable(model, layout)
        if why is not None:
            raise UnsupportedModelError(why)
        self.efficient, self.why_eager = attention_mode(attention, model, layout)
        self.model, self.layout, self.tokens = model, layout, tokens
        self.replay = LayerReplay(model, layout, efficient=self.efficient, extra_hooks=extra_hooks or {})
        self.forward = forward_inputs(model, layout, tokens, attention_mask, None, None)
        self.rows = rows
        self._recorded = False

    def lengths(self) -> Lengths:
        batch, pos = self.tokens.shape
        return Lengths(batch, pos, None, self.tokens.device)

    def estimate(self, *, max_chunk_bytes: int, dtype: torch.dtype, results: int = 0) -> int:
        """Estimated peak extra memory of explaining a few positions of this input, layer by layer."""
        shape = model_shape(self.model, *self.tokens.shape)
        size = torch.finfo(dtype).bits // 8
        return replay_bytes(shape, eager=not self.efficient, max_chunk_bytes=max_chunk_bytes, dtype_size=size,
                            results=results)

    def check_memory(self, options: AltiOptions, what: str = "attribute", results: int | None = None) -> None:
        """Refuse (InsufficientMemoryError) before the forward pass when the call cannot fit.

        `results`: bytes of the results (default: those of `attribute` with these options for `rows`
        explained positions: `layers` and `rollout` rows, and per-head rows with `heads=True`).
        """
        batch, pos = self.tokens.shape
        if results is None:
            numbers = batch * self.replay.n_layers * self.rows * pos
            per_head = model_shape(self.model, batch, pos).heads if options.heads else 0
            results = numbers * (2 + per_head) * torch.finfo(options.dtype).bits // 8
        need = self.estimate(max_chunk_bytes=options.max_chunk_bytes, dtype=options.dtype, results=results)
        advice = RUN_ADVICE
        if not self.efficient:
            advice += " " + EAGER_ADVICE.format(why=f" ({self.why_eager})" if self.why_eager else "")
        check_fits(need, self.tokens.device, what, advice)

    def check_target(self, decoder_tokens: Any, allow_shifted_source: bool) -> None:
        """Decoder-only and encoder models: nothing to check."""

    def input_ids(self, tokens: Any) -> Any:
        """The ids the model runs on."""
        return self.tokens

    def store(self, layer: int) -> Any:
        """Layer `layer`'s activations (the forward pass runs on the first call)."""
        if not self._recorded:
            self.replay.record(self.forward)
            self._recorded = True
        return self.replay.layer(layer)


Source = CacheSource | StreamSource | ReplaySource


def attention_mode(attention: str, model: Any, layout: ModelLayout) -> tuple[bool, str | None]:
    """(run with recomputed attention?, why not) for `attention=` ("auto", "recomputed" or "eager")."""
    check_choice("attention", attention, ATTENTION)
    why = recomputable(model, layout) if attention != "eager" else "attention='eager' was asked for"
    if attention == "recomputed" and why is not None:
        raise UnsupportedModelError(f"attention='recomputed': {why}. Use attention='eager' (or 'auto')")
    return why is None, why


def model_shape(model: Any, batch: int, pos: int) -> ModelShape:
    """The sizes a forward pass of `model` on `[batch, pos]` tokens holds (from its config)."""
    cfg = model.cfg
    d_model = int(getattr(cfg, "d_model", 0) or 0)
    try:
        size = next(model.parameters()).element_size()
    except (StopIteration, AttributeError):
        size = 4
    return ModelShape(
        layers=int(cfg.n_layers), batch=batch, pos=pos, heads=int(cfg.n_heads), d_model=d_model,
        d_mlp=int(getattr(cfg, "d_mlp", 0) or 4 * d_model), element_size=size,
    )


def model_tokens(model: Any, tokens: Any, attention_mask: Any) -> tuple[Tensor, Tensor | None]:
    """(ids on the model's device, the mask to run with): texts are tokenised, left-padded and masked."""
    ids, text_mask = model_input(model, tokens, "tokens")
    if text_mask is not None:
        if attention_mask is not None:
            raise InvalidArgumentError(
                "attention_mask", "a mask", "None with a list of texts (they are padded and masked for you); "
                "or pass token ids with their attention_mask"
            )
        attention_mask = text_mask
    return ids.to(input_device(model)), attention_mask


def open_source(
    cache_or_model: Any, inputs: Inputs, parallel_mlp: str = "exclude", *, attention: str = "auto",
    top_down: Callable[[ModelLayout], bool] = lambda layout: False,
) -> tuple[Source, Inputs]:
    """The source of blocks (a cache, a forward pass, or a model's layers run again) and the inputs as it runs them.

    Given a model, `inputs.tokens` (ids, a text or a list of texts) is what it runs on: texts are
    tokenised and left-padded, their mask becomes `attention_mask`, and the ids become the labels.
    `top_down(layout)`: the plan reads layers from the top, so a model whose layers can run again
    alone is given a `ReplaySource`.
    """
    if is_cache(cache_or_model):
        cache, model = cache_and_model(cache_or_model)
        return CacheSource(cache, model, model_layout(model, parallel_mlp)), inputs
    model = cache_or_model
    layout = model_layout(model, parallel_mlp)
    check_choice("attention", attention, ATTENTION)
    ids, mask = model_tokens(model, inputs.tokens, inputs.attention_mask)
    dec_ids = None
    if layout.family == "encoder_decoder" and inputs.decoder_tokens is not None:
        dec_ids = model_input(model, inputs.decoder_tokens, "decoder_tokens")[0].to(ids.device)
    ran = replace(inputs, attention_mask=mask, tokens=ids, decoder_tokens=dec_ids)
    if top_down(layout) and replayable(model, layout) is None:
        return ReplaySource(model, layout, ids, mask, attention=attention, rows=count_positions(inputs.positions)), ran
    return StreamSource(model, layout, ids, dec_ids, ran), ran


def count_positions(positions: Any) -> int:
    """How many receivers `positions=` asks for per batch item (for the memory estimate; checked later)."""
    if positions is None:
        return 0
    if isinstance(positions, (str, int)):
        return 1
    t = torch.as_tensor(positions)
    if t.dtype == torch.bool:
        return int(t.sum(-1).max()) if t.numel() else 0
    return int(t.shape[-1]) if t.dim() else 1
