"""`logit_attribution` (ALTI-Logit, docs/spec.md §7): a logit (difference) split exactly into parts.

The steps: open the run (a cache; or a model, whose layers are run again one at a time from the
top, `lens_alti.api.sources.ReplaySource`, after a memory check) and check the arguments; read
the readout direction of the explained rows; walk the stack top-down collecting every attention
block's and MLP's direct part and, in the same walk, pushing each layer's update down through the
ALTI contributions of the layers below it (decoder-only: `lens_alti.alti.topdown`; encoder-decoders
map them through ALTI+ afterwards); check completeness; assemble the result. Reading gives records
(`lens_alti.reading`, `lens_alti.reading.logit`); the mathematics is in `lens_alti.alti.logit`.
`routes` (`lens_alti.api.routes`) shares the run and the readout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_alti.alti.context import expected_unembedding, expected_value
from lens_alti.alti.contributions import DEFAULT_CHUNK_BYTES
from lens_alti.alti.decompose import HALF_TOLERANCE
from lens_alti.alti.logit import (
    COMPLETENESS_TOLERANCE,
    completeness_gap,
    explained_update,
    readout_direction,
    to_input_tokens,
    write_update,
)
from lens_alti.alti.masking import check_declared_padding
from lens_alti.alti.memory import RUN_ADVICE, BlockShape, attribute_bytes, check_fits, forward_cache_bytes
from lens_alti.alti.rows import RowWise, gather_rows
from lens_alti.alti.topdown import RowRollout
from lens_alti.api.inputs import (
    contrast_distribution,
    decode_pieces,
    explained_rows,
    no_decoder_mask,
    token_ids,
    token_labels,
    valid_mask,
)
from lens_alti.api.options import DTYPES, AltiOptions
from lens_alti.api.sinks import SinkFinder
from lens_alti.api.sources import ATTENTION, CacheSource, ReplaySource, model_shape, model_tokens
from lens_alti.errors import (
    CompletenessError,
    InvalidArgumentError,
    MissingHooksError,
    NonFiniteError,
    UnsupportedModelError,
)
from lens_alti.reading import ModelLayout, cache_and_model, is_cache, model_layout
from lens_alti.reading.logit import DirectWrite, LogitLayout, logit_layout, recorded_hooks
from lens_alti.reading.replay import replayable
from lens_alti.results import LogitAttribution, Seq2SeqAltiResult
from lens_alti.validation import check_choice, check_positions, check_type


@dataclass(frozen=True)
class LogitRun:
    """A run ready for logit attribution: where its layers come from, the model, its layouts, the input.

    `source`: a `CacheSource` (the cache given; or, for a model whose layers cannot run again
    alone — encoder-decoders, mixers — its `run_with_cache` after a memory check) or a
    `ReplaySource` (the model's layers run again one at a time, memory linear in n).
    `tokens` / `attention_mask`: as given, or, when a model was run, the ids it ran and their mask.
    """

    source: CacheSource | ReplaySource
    model: Any
    layout: ModelLayout
    logit_layout: LogitLayout
    tokens: Any
    attention_mask: Any

    def store(self, layer: int) -> Any:
        """The activations of layer `layer` (the whole cache, or that layer run again)."""
        return self.source.store(layer)

    @property
    def cache(self) -> Any:
        """The whole cache (encoder-decoders read their stacks from it)."""
        assert isinstance(self.source, CacheSource)  # internal: encoder-decoders always run with a cache
        return self.source.cache

    @property
    def top_layer(self) -> int:
        return max(step.layer for step in self.logit_layout.steps)


def open_run(
    cache_or_model: Any, tokens: Any, attention_mask: Any, decoder_tokens: Any, what: str, decoder_only: bool = False,
    *, attention: str = "auto", max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, dtype: torch.dtype = torch.float32,
) -> LogitRun:
    """The run of a method that explains logits, from a cache or from a model it runs now.

    A decoder-only model whose layers can run again alone is recorded and replayed layer by
    layer (`ReplaySource`, `attention=` as for `attribute`); any other model is run with
    `run_with_cache` recording only the hooks lens_alti reads. Either way the memory the call
    needs is estimated before the forward pass (InsufficientMemoryError naming the knob).
    Checks a cache holds every hook the logit layout needs (MissingHooksError naming `what`);
    `decoder_only` refuses encoders and encoder-decoders (UnsupportedModelError).
    """
    check_choice("attention", attention, ATTENTION)
    if is_cache(cache_or_model):
        cache, model = cache_and_model(cache_or_model)
        layout, llayout = _layouts(model, what, decoder_only)
        missing = [h for h in llayout.hooks if h not in set(cache.keys())]
        if missing:
            raise MissingHooksError(
                missing,
                f"{what} reads these hooks (run_with_cache without names_filter records them all; eager "
                "attention is needed for hook_pattern).",
            )
        return LogitRun(CacheSource(cache, model, layout), model, layout, llayout, tokens, attention_mask)
    model = cache_or_model
    layout, llayout = _layouts(model, what, decoder_only)
    ids, mask = model_tokens(model, tokens, attention_mask)
    if layout.family == "decoder" and replayable(model, layout) is None:
        source = ReplaySource(model, layout, ids, mask, attention=attention, extra_hooks=llayout.layer_hooks())
        shape = model_shape(model, *ids.shape)
        results = shape.batch * shape.layers * (shape.heads + 2) * shape.pos * 8  # by_layer, heads (float64 at most)
        source.check_memory(AltiOptions(dtype=dtype, max_chunk_bytes=max_chunk_bytes), what=what, results=results)
        return LogitRun(source, model, layout, llayout, ids, mask)
    cache = _run_model(model, layout, ids, mask, decoder_tokens, what)
    return LogitRun(CacheSource(cache, model, layout), model, layout, llayout, ids, mask)


def _layouts(model: Any, what: str, decoder_only: bool) -> tuple[ModelLayout, LogitLayout]:
    """The model's layout and logit layout; `decoder_only` refuses encoders and encoder-decoders."""
    layout = model_layout(model)
    if decoder_only and layout.family != "decoder":
        raise UnsupportedModelError(
            f"{layout.architecture}: {what} is implemented for decoder-only models; for encoders and "
            "encoder-decoders use attribute(heads=True)"
        )
    return layout, logit_layout(model, layout)


def _run_model(model: Any, layout: ModelLayout, ids: Tensor, mask: Any, decoder_tokens: Any, what: str) -> Any:
    """`model.run_with_cache` on `ids`, recording only what lens_alti reads, after a memory estimate of the
    cache and of the ALTI rollout under it (InsufficientMemoryError naming the knob)."""
    shape = model_shape(model, *ids.shape)
    n = max(ids.shape[-1], 0 if decoder_tokens is None else int(torch.as_tensor(decoder_tokens).shape[-1]))
    d_vocab = int(getattr(model.cfg, "d_vocab", 0) or 0)
    need = forward_cache_bytes(shape.batch, n, n_layers=shape.layers, n_heads=shape.heads, d_model=shape.d_model,
                               d_mlp=shape.d_mlp, d_vocab=d_vocab, element_size=shape.element_size)
    need += attribute_bytes([BlockShape(shape.layers, shape.batch, shape.heads, n, n, shape.d_model)], heads=False,
                            max_chunk_bytes=0)
    check_fits(need, ids.device, f"{what} on {layout.architecture} (its layers cannot run again one at a time, so "
               "the whole cache is recorded)", RUN_ADVICE)
    wanted = recorded_hooks(model, layout)
    kwargs: dict[str, Any] = {"names_filter": lambda name: name in wanted}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if decoder_tokens is not None:
        kwargs["decoder_input"] = decoder_tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, **kwargs)
    return cache


_SOFT = "the mean logit under the contrast distribution"


@dataclass(frozen=True)
class ReadoutParts:
    """The explained logit of each item, read back through the final norm at its real scale.

    `w[b, d]`: the direction at the final residual stream whose dot product with any part of it is
    that part's logit update; `bias[b]`: the readout's own terms (final norm β, unembedding bias);
    `logit[b]`: the real logit (difference); `target` / `contrast`: the ids `[b]`; `softcap`: the
    logit soft-capping constant (the logit is explained before it) or None; `soft_contrast`: the
    contrast was a distribution over the vocabulary (`contrast` is then None); `scale[b]`: then
    `|logit_target| + Σ_v p_v·|logit_v|`, the size of the logits whose difference is explained, which
    the completeness check is judged against too (the difference vanishes as p(target) → 1).
    """

    w: Float[Tensor, "b d"]
    bias: Float[Tensor, " b"]
    logit: Float[Tensor, " b"]
    target: Int[Tensor, " b"]
    contrast: Int[Tensor, " b"] | None
    softcap: float | None
    soft_contrast: bool = False
    scale: Float[Tensor, " b"] | None = None


def readout_parts(
    run: LogitRun, target: Any, contrast: Any, items: Int[Tensor, " k"], rows: Int[Tensor, " k"], dtype: torch.dtype
) -> ReadoutParts:
    """The readout direction of `target` (minus `contrast`) at position `rows[i]` of batch item `items[i]`.

    Explained item i is row `rows[i]` of batch item `items[i]` (an item may be explained at several
    rows); only the explained positions are read out (the logits of other positions are never formed).
    """
    store = run.store(run.top_layer)
    items, rows = items.cpu(), rows.cpu()
    slot = torch.zeros_like(items)  # each explained row's place among its batch item's rows
    for b in items.unique().tolist():
        picked = (items == b).nonzero().flatten()
        slot[picked] = torch.arange(len(picked))
    at = torch.zeros(_n_items(run), max(1, int(slot.max()) + 1 if len(slot) else 1), dtype=torch.long)
    at[items, slot] = rows
    read = run.logit_layout.readout(store, at)
    device = read.final_residual.device
    readout = replace(read, final_residual=read.final_residual[items.to(device), slot.to(device)][:, None],
                      real_logits=read.real_logits[items.to(device), slot.to(device)][:, None])
    items = torch.arange(len(rows), device=device)
    vocab = int(readout.W_U.shape[-1])
    tgt = token_ids(run.model, target, len(items), "target", vocab).to(device)
    if callable(contrast):
        contrast = _contrast_from_logits(contrast, readout, items)
    soft = contrast_distribution(contrast, len(items), vocab)
    ctr = None if contrast is None or soft is not None else token_ids(
        run.model, contrast, len(items), "contrast", vocab).to(device)
    W_U = readout.W_U.to(device=device, dtype=dtype)
    b_U = None if readout.b_U is None else readout.b_U.to(device=device, dtype=dtype)
    u, logit = W_U[:, tgt].T, readout.real_logits[items, 0, tgt].to(dtype)
    u_bias = torch.zeros(len(items), dtype=dtype, device=device) if b_U is None else b_U[tgt]
    if ctr is not None:
        u, logit = u - W_U[:, ctr].T, logit - readout.real_logits[items, 0, ctr].to(dtype)
        u_bias = u_bias if b_U is None else u_bias - b_U[ctr]
    scale = None
    if soft is not None:  # the weighted mean logit under a distribution (docs/spec.md §13b)
        p = soft.to(device)
        scale = (logit.abs() + expected_value(readout.real_logits[items, 0].abs(), p)).to(dtype)
        u = u - expected_unembedding(readout.W_U, p).to(dtype)
        logit = logit - expected_value(readout.real_logits[items, 0], p).to(dtype)
        u_bias = u_bias if b_U is None else u_bias - expected_value(b_U.expand(len(items), -1), p).to(dtype)
    x_final = readout.final_residual[items, 0]
    check_finite_rows("final residual stream", x_final)
    norm = readout.norm
    w, bias = readout_direction(x_final, norm.kind, norm.gain, norm.bias, norm.eps, u, u_bias)
    return ReadoutParts(w, bias, logit, tgt, ctr, readout.softcap, soft is not None, scale)


def _contrast_from_logits(fn: Any, readout: Any, items: Tensor) -> Tensor:
    """A contrast distribution computed from the model's logits `[k, vocab]` at the explained rows (after
    soft-capping, as the model outputs them), e.g. its own prediction `softmax` (docs/spec.md §13b)."""
    shown = readout.real_logits[items, 0]
    if readout.softcap is not None:
        shown = readout.softcap * torch.tanh(shown / readout.softcap)
    out = fn(shown)
    if not isinstance(out, Tensor) or not out.dtype.is_floating_point:
        raise InvalidArgumentError(
            "contrast", f"a function returning {type(out).__name__}", "a function of the logits [k, vocab] that "
            "returns distributions [k, vocab] (a float tensor)",
        )
    return out


@torch.no_grad()
def next_token_logits(
    model: Any, tokens: Any, position: Any = -1, *, attention_mask: Any = None, attention: str = "auto"
) -> Float[Tensor, "b vocab"]:
    """The logits `[b, vocab]` a decoder-only model predicts at `position` of each item (before soft-capping).

    Only those positions are read out; a model whose layers can run again alone runs its forward
    pass up to its last layer as `logit_attribution` does (after the same memory check).
    """
    run = open_run(model, tokens, attention_mask, None, "next_token_logits", decoder_only=True, attention=attention)
    n = run.source.lengths()
    rows = explained_rows(position, valid_mask(run.attention_mask, n.batch, n.source, n.device, "attention_mask"))
    return run.logit_layout.readout(run.store(run.top_layer), rows).real_logits[:, 0]


def _n_items(run: LogitRun) -> int:
    """The batch size of the run."""
    return run.source.lengths().batch


def check_finite_rows(name: str, t: Tensor) -> None:
    """NonFiniteError when the cache holds NaN or Inf at the explained position."""
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{name}: the cache holds NaN or Inf at the explained position")


@dataclass
class DirectParts:
    """The direct parts of the explained logits, filled top-down (`LogitAttribution` documents each).

    `by_layer[b, layer, src]`: each layer's update mapped to the input tokens (decoder-only, filled
    by the same walk; None for encoder-decoders, which map them through ALTI+ afterwards).
    `activation_dtype`: the dtype the model's activations are in (the completeness tolerance).
    """

    self_heads: Float[Tensor, "b layer head k"] | None
    cross_heads: Float[Tensor, "b layer head s"] | None
    mlp: Float[Tensor, "b layer"]
    attn_bias: Float[Tensor, "b layer"]
    write_bias: Float[Tensor, " b"]
    embedding: Float[Tensor, " b"]
    errors: list[float]
    by_layer: Float[Tensor, "b layer src"] | None = None
    activation_dtype: torch.dtype = torch.float32


def direct_parts(
    run: LogitRun, rows: Int[Tensor, "b m"], w: Float[Tensor, "k d"], valid: Tensor, src_valid: Tensor | None,
    dtype: torch.dtype, check: bool, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, sinks: SinkFinder | None = None,
) -> DirectParts:
    """Walk the stack top-down: each step's logit update for the direction `w` above it, and `w` below it.

    Batch item b is explained at rows `rows[b, :]`; explained item `k = b·m + j` is row `rows[b, j]`
    (`w[k]` its readout direction): the rows of one batch item share each block's work.
    Decoder-only, in the same walk (docs/spec.md §7d, §11): after attention block l, the updates of
    the layers above are pushed one layer down through its ALTI contributions (l1), and its own
    update Δ^l joins them, so `by_layer[l] = Δ^l @ R^(l−1)` is complete at the bottom; `sinks`
    sees every self-attention block (docs/spec.md §10).
    """
    steps, (batch, m) = run.logit_layout.steps, rows.shape
    n_layers, n_items = 1 + max(s.layer for s in steps), batch * m
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=w.device)  # noqa: E731
    flat = lambda t: t.reshape(n_items, *t.shape[2:])  # noqa: E731  [b, m, ...] → [k, ...]
    parts = DirectParts(None, None, zeros(n_items, n_layers), zeros(n_items, n_layers), zeros(n_items),
                        zeros(n_items), [])
    roll = RowRollout(batch, valid.shape[1], dtype, w.device) if src_valid is None else None
    w = w.view(batch, m, -1)
    for step in reversed(steps):
        record = step.build(run.store(step.layer))
        if isinstance(record, DirectWrite):
            out = gather_rows(record.output, rows, 1)
            check_finite_rows(record.name, out)
            norm = None if record.norm is None else replace(record.norm, scale=gather_rows(record.norm.scale, rows, 1))
            value, bias, w = write_update(out, norm, w)
            parts.mlp[:, step.layer] += flat(value)
            parts.write_bias += flat(bias)
            continue
        valid_k = src_valid if step.kind == "cross" and src_valid is not None else valid  # cross: seq2seq only
        if sinks is not None and step.kind == "self":
            sinks.add(record)
        block = RowWise(record, valid, valid_k, dtype=dtype, check=check)
        upd = explained_update(block, rows, w)
        if check:
            parts.errors.append(upd.error)
        _store_heads(parts, step.kind, step.layer, n_layers, flat(upd.heads), run.layout.architecture, record.name)
        parts.attn_bias[:, step.layer] += flat(upd.bias)
        w = upd.below
        if roll is not None:
            roll.through(block, "l1", max_chunk_bytes=max_chunk_bytes)  # the layers above: one layer further down
            roll.add(upd.heads.sum(2))
        del record, block, upd  # one layer at a time: dropped before the next one is read
    embedded = run.store(0)[run.logit_layout.embedding_hook]
    parts.embedding = flat((gather_rows(embedded, rows, 1).to(dtype) * w).sum(-1))
    parts.activation_dtype = embedded.dtype
    if parts.self_heads is None:
        arch = run.layout.architecture
        raise UnsupportedModelError(f"{arch}: no attention (or mixer) block to attribute the logit to")
    if roll is not None:  # added from the top layer down, m rows per layer
        by_layer = roll.vectors.view(batch, -1, m, roll.vectors.shape[-1]).flip(1)
        parts.by_layer = by_layer.transpose(1, 2).reshape(n_items, -1, by_layer.shape[-1])
    return parts


def _store_heads(parts: DirectParts, kind: str, layer: int, n_layers: int, heads: Tensor, arch: str, name: str) -> None:
    """Write one block's per-head, per-source updates `[b, head, k]` into the self or cross stack."""
    if kind == "cross":
        if parts.cross_heads is None:
            parts.cross_heads = heads.new_zeros(heads.shape[0], n_layers, *heads.shape[1:])
        parts.cross_heads[:, layer] = heads
        return
    if parts.self_heads is None:
        parts.self_heads = heads.new_zeros(heads.shape[0], n_layers, *heads.shape[1:])
    if heads.shape[1] != parts.self_heads.shape[2]:
        raise UnsupportedModelError(
            f"{arch}: {name} has {heads.shape[1]} heads and a later layer {parts.self_heads.shape[2]} (a hybrid or "
            "per-layer head counts; a mixer without heads counts as one): logit_attribution's "
            "heads[batch, layer, head, src] need one head count"
        )
    parts.self_heads[:, layer] = heads


def check_completeness(
    parts: DirectParts, readout: ReadoutParts, check: bool, dtype_in: torch.dtype
) -> Float[Tensor, " b"]:
    """The completeness gap `[b]` (logit − Σ direct parts), refused beyond the tolerance when `check`."""
    assert parts.self_heads is not None  # internal: direct_parts refuses stacks without blocks
    terms = [parts.embedding[:, None], parts.self_heads.sum(-1), parts.mlp, parts.attn_bias]
    terms += [parts.write_bias[:, None], readout.bias[:, None]]
    if parts.cross_heads is not None:
        terms.append(parts.cross_heads.sum(-1))
    gap, scale = completeness_gap(readout.logit, terms)
    scale = scale if readout.scale is None else torch.maximum(scale, readout.scale.to(scale))
    if check:
        tol = HALF_TOLERANCE.get(dtype_in, COMPLETENESS_TOLERANCE)
        bad = (gap.abs() > tol * scale).nonzero().flatten()
        if len(bad):
            b = int(bad[0])
            raise CompletenessError(
                float(gap[b]), float(readout.logit[b]), float(scale[b]), tol, b,
                "The final norm, the unembedding or a block of this model is not read the way it runs; "
                "pass check=False only if you know why.",
            )
    return gap


def to_tokens(
    run: LogitRun, parts: DirectParts, valid: Tensor, src_valid: Tensor | None, check: bool, dtype: torch.dtype
) -> Float[Tensor, "b layer src"]:
    """ALTI-Logit^l = Δ^l @ R^(l−1) for every layer (docs/spec.md §7): `[b, layer, src]`.

    Decoder-only: filled by the top-down walk (`direct_parts`). Encoder-decoders: decoder-input
    tokens through the ALTI+ `total` below, source tokens through cross-attention and the encoder rollout.
    """
    if parts.by_layer is not None:
        return parts.by_layer
    from lens_alti.api.attribute import attribute

    heads = parts.self_heads
    assert heads is not None and src_valid is not None  # internal: direct_parts refuses stacks without blocks
    batch, n_layers = heads.shape[:2]
    assert parts.cross_heads is not None  # internal: set for encoder-decoder models
    res = attribute(run.cache, attention_mask=src_valid.long(), decoder_attention_mask=valid.long(), check=check,
                    dtype=dtype)
    assert isinstance(res, Seq2SeqAltiResult)  # internal: an encoder-decoder cache
    r_enc, total = res.encoder.rollout[:, -1].to(dtype), res.total.to(dtype)
    pos, src_len, device = valid.shape[1], src_valid.shape[1], heads.device
    eye = torch.eye(pos, dtype=dtype, device=device).expand(batch, pos, pos)
    first = torch.cat([torch.zeros(batch, pos, src_len, dtype=dtype, device=device), eye], dim=-1)
    by_layer = []
    for layer in range(n_layers):
        row = to_input_tokens(heads[:, layer], first if layer == 0 else total[:, layer - 1])
        row[:, :src_len] += to_input_tokens(parts.cross_heads[:, layer], r_enc)
        by_layer.append(row)
    return torch.stack(by_layer, 1)


def explained_masks(
    run: LogitRun, attention_mask: Any, decoder_attention_mask: Any
) -> tuple[Bool[Tensor, "b pos"], Bool[Tensor, "b src"] | None]:
    """(valid positions of the explained stack, valid source positions of an encoder-decoder or None).

    A decoder-only cache's own padding must be the declared one (docs/spec.md §1h), checked on its
    first block as `attribute` does.
    """
    if run.logit_layout.family != "encoder_decoder":
        no_decoder_mask(decoder_attention_mask, run.layout.architecture)
        n = run.source.lengths()
        valid = valid_mask(run.attention_mask, n.batch, n.source, n.device, "attention_mask")
        if isinstance(run.source, CacheSource):
            first = run.layout.blocks["self"][0].build(run.cache)
            if first.pattern_is_distribution:  # attention, not a mixer's operator (as attribute checks)
                check_declared_padding(first, valid, causal=True, mask_name="attention_mask")
        return valid, None
    x0 = run.cache[run.logit_layout.embedding_hook]
    (batch, pos), device = x0.shape[:2], x0.device
    src_len = run.layout.blocks["encoder"][0].pattern_shape(run.cache)[-1]
    src_valid = valid_mask(attention_mask, batch, src_len, device, "attention_mask")
    return valid_mask(decoder_attention_mask, batch, pos, device, "decoder_attention_mask"), src_valid


@torch.no_grad()
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
    attention: str = "auto",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LogitAttribution:
    """ALTI-Logit (Ferrando et al. 2023; docs/spec.md §7): a logit (difference) split exactly into parts.

    Explains the logit of `target` (minus that of `contrast`) predicted at `position`: every
    attention head's update at that position split over its sources, each MLP's, the
    embedding's and the biases', read through the final norm linearised at its real scale
    (LayerNorm, RMSNorm or Gemma's `1 + w`, read from the module's behaviour), and each layer's
    update mapped to the input tokens through the ALTI rollout below it.

    Args:
        cache_or_model: an ActivationCache (`model.run_with_cache(tokens)`; encoder-decoders:
            `run_with_cache(src, decoder_input=tgt)`), or the model itself with `tokens=`.
            A decoder-only model is run once recording each layer's input, and its layers run
            again one at a time from the top (memory linear in the input's length,
            docs/spec.md §12); other models are run with the hooks lens_alti reads. Either way the
            memory is estimated first and a call that cannot fit is refused (InsufficientMemoryError).
        target: token ids (an int, or one per batch item as a list or tensor) or token
            strings (each exactly one token, e.g. " Mary").
        contrast: None, or token ids / strings as for `target`: the logit difference
            `target − contrast` is then explained; or a distribution over the vocabulary (a float
            tensor `[vocab]` or `[batch, vocab]`, rows summing to 1): `logit_target − Σ_v p_v·logit_v`
            is then explained, e.g. with p the model's own prediction, the first-order split of
            log p(target) (docs/spec.md §13b); or a function that computes such distributions
            `[batch, vocab]` from the model's logits at the explained positions (as the model
            outputs them, after any soft-capping), e.g. `lambda z: z.double().softmax(-1)`.
        position: the position whose next-token logit is explained: an int (negative counts from
            the last real token of each item) or one per batch item. Encoder-decoders: a target
            (decoder input) position.
        heads: keep the per-head, per-source parts `heads[b, layer, head, k]` (head totals always).
        attention_mask: `[batch, pos]` 1 = real token, as for `attribute` (encoder-decoders: source).
        decoder_attention_mask: `[batch, tgt]` the target mask of an encoder-decoder.
        tokens: ids or strings for labels (and the input when a model is given: ids, a text or
            a list of texts, left-padded and masked for you).
        decoder_tokens: encoder-decoders: target ids or strings (the target prefix with a model).
        check: verify each attention block's decomposition at the explained position and that
            the direct parts sum to the real logit (difference) within 1e-4 relative (fp32
            caches), else ReconstructionError / CompletenessError naming the gap.
        dtype: torch.float32 (default) or torch.float64.
        attention: with a decoder-only model, how its attention runs: "recomputed", "eager" or
            "auto" (default), as for `attribute` (docs/spec.md §9).
        max_chunk_bytes: memory budget of one chunk of receivers while the updates are mapped to the
            input tokens.

    Returns:
        A LogitAttribution: `by_layer[b, layer, src]`, `tokens[b, src]`, `heads[b, layer, head, k]`,
        `head_totals[b, layer, head]`, `mlp[b, layer]`, `attn_bias[b, layer]`, `embedding[b]`,
        `bias[b]`, `logit[b]` (the real logit (difference)), `completeness_gap[b]`, `sinks[b, src]`
        and `sink[b]` (the attention sinks and their share, docs/spec.md §10; `top_tokens` sets them
        aside); for encoder-decoders also `cross_heads`, `cross_head_totals` and `src` = source then
        target tokens.
        Soft-capped logits (Gemma-2) are explained before the cap (`result.softcap` says so).
    """
    chunk = _checked_options(dtype, heads, check, max_chunk_bytes)
    run = open_run(cache_or_model, tokens, attention_mask, decoder_tokens, "logit_attribution", attention=attention,
                   max_chunk_bytes=chunk, dtype=dtype)
    valid, src_valid = explained_masks(run, attention_mask, decoder_attention_mask)
    rows = explained_rows(position, valid)
    return _attribute_rows(run, rows[:, None], target, contrast, valid, src_valid, heads=heads, check=check,
                           dtype=dtype, chunk=chunk, decoder_tokens=decoder_tokens)


@torch.no_grad()
def logit_attribution_at(
    cache_or_model: Any,
    target: Any,
    contrast: Any = None,
    *,
    positions: Any,
    tokens: Any = None,
    heads: bool = False,
    check: bool = True,
    dtype: torch.dtype = torch.float32,
    attention: str = "auto",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LogitAttribution:
    """ALTI-Logit at several positions of one sequence, in one walk down the stack (decoder-only).

    Item i of the result explains `target[i]` (minus `contrast[i]`) predicted at `positions[i]`,
    exactly as `logit_attribution(..., position=positions[i])` would (the same numbers: a causal
    model's position does not see the ones after it), but the model runs once and each layer's
    rows and ALTI contributions are computed once for all positions. Used by `context_attribution`
    to explain every token of a response.

    Args:
        cache_or_model: a decoder-only model (with `tokens=`: one sequence) or its cache (batch 1).
        target: one token id or one-token string per position.
        contrast: None, one token per position, distributions `[len(positions), vocab]`, or a
            function of the logits at the positions, as `logit_attribution`'s `contrast` with one
            item per position.
        positions: the explained positions (ints; negative count from the end), in any order.
        tokens, heads, check, dtype, attention, max_chunk_bytes: as for `logit_attribution`.

    Returns:
        A LogitAttribution whose batch axis is the positions (`position[i] = positions[i]`).
    """
    chunk = _checked_options(dtype, heads, check, max_chunk_bytes)
    run = open_run(cache_or_model, tokens, None, None, "logit_attribution_at", decoder_only=True,
                   attention=attention, max_chunk_bytes=chunk, dtype=dtype)
    valid, _ = explained_masks(run, None, None)
    if valid.shape[0] != 1:
        raise InvalidArgumentError("tokens", tokens, f"one sequence (got a batch of {valid.shape[0]})")
    rows = check_positions("positions", positions, valid[0].cpu())
    if not rows:
        raise InvalidArgumentError("positions", positions, "at least one position")
    rows_2d = torch.tensor([rows], dtype=torch.long, device=valid.device)
    return _attribute_rows(run, rows_2d, target, contrast, valid, None, heads=heads, check=check, dtype=dtype,
                           chunk=chunk, decoder_tokens=None)


def _checked_options(dtype: torch.dtype, heads: bool, check: bool, max_chunk_bytes: int) -> int:
    """Check the options every logit attribution takes; the chunk budget."""
    check_choice("dtype", dtype, DTYPES)
    for flag, value in (("heads", heads), ("check", check)):
        check_type(flag, value, bool, "True or False")
    return AltiOptions.checked(max_chunk_bytes=max_chunk_bytes).max_chunk_bytes


def _attribute_rows(
    run: LogitRun, rows: Int[Tensor, "b m"], target: Any, contrast: Any, valid: Tensor, src_valid: Tensor | None,
    *, heads: bool, check: bool, dtype: torch.dtype, chunk: int, decoder_tokens: Any,
) -> LogitAttribution:
    """Explain row `rows[b, j]` of batch item b as result item `b·m + j`: readout, top-down walk, result."""
    batch, m = rows.shape
    items = torch.arange(batch).repeat_interleave(m)
    readout = readout_parts(run, target, contrast, items, rows.flatten(), dtype)
    sinks = None if src_valid is not None else SinkFinder(
        run.model, run.source.input_ids(run.tokens), valid, run.layout.family == "decoder", chunk
    )
    parts = direct_parts(run, rows.to(readout.w.device), readout.w, valid, src_valid, dtype, check, chunk, sinks)
    gap = check_completeness(parts, readout, check, parts.activation_dtype)
    by_layer = to_tokens(run, parts, valid, src_valid, check, dtype)
    found = None if sinks is None else sinks.sinks()
    return _result(run, parts, readout, by_layer, gap, items, rows.flatten(), valid, src_valid, heads,
                   decoder_tokens, found)


def _result(
    run: LogitRun, parts: DirectParts, readout: ReadoutParts, by_layer: Tensor, gap: Tensor, items: Tensor,
    rows: Tensor, valid: Tensor, src_valid: Tensor | None, keep_heads: bool, decoder_tokens: Any,
    sinks: Tensor | None,
) -> LogitAttribution:
    """Assemble the LogitAttribution of the explained items (item i: row `rows[i]` of batch item `items[i]`):
    token totals (with the embedding on the explained token), labels and the attention sinks of
    decoder-only runs (docs/spec.md §10; `sink` = their share of `tokens`)."""
    assert parts.self_heads is not None  # internal: direct_parts refuses stacks without blocks
    n_items, src_len = len(rows), 0 if src_valid is None else src_valid.shape[1]
    tok = by_layer.sum(1)
    tok[torch.arange(n_items, device=tok.device), rows.to(tok.device) + src_len] += parts.embedding
    labels = token_labels(run.model, run.tokens, valid.shape[0])
    if src_valid is not None and labels is not None:
        dec = token_labels(run.model, decoder_tokens, valid.shape[0], name="decoder_tokens")
        labels = [s + t for s, t in zip(labels, dec, strict=True)] if dec is not None else None
    labels = None if labels is None else [labels[int(i)] for i in items]
    valid, sinks = valid[items.to(valid.device)], None if sinks is None else sinks[items.to(sinks.device)]
    source_mask = None if src_valid is None else src_valid[items.to(src_valid.device)].long()
    has_tokenizer = getattr(run.model, "tokenizer", None) is not None
    name = lambda ids: None if ids is None or not has_tokenizer else decode_pieces(run.model, ids.tolist())  # noqa: E731
    return LogitAttribution(
        by_layer=by_layer,
        tokens=tok,
        heads=parts.self_heads if keep_heads else None,
        head_totals=parts.self_heads.sum(-1),
        mlp=parts.mlp,
        attn_bias=parts.attn_bias,
        embedding=parts.embedding,
        bias=parts.attn_bias.sum(1) + parts.write_bias + readout.bias,
        logit=readout.logit,
        completeness_gap=gap,
        target=readout.target,
        contrast=readout.contrast,
        position=rows,
        attention_mask=valid.long(),
        architecture=run.layout.architecture,
        weight_processing=run.layout.weight_processing,
        softcap=readout.softcap,
        n_source=src_len,
        cross_heads=parts.cross_heads if keep_heads else None,
        cross_head_totals=None if parts.cross_heads is None else parts.cross_heads.sum(-1),
        str_tokens=labels,
        target_str=name(readout.target),
        contrast_str=[_SOFT] * n_items if readout.soft_contrast else name(readout.contrast),
        extra={"reconstruction_error": parts.errors, "source_mask": source_mask,
               "soft_contrast": readout.soft_contrast},
        sinks=sinks,
    )
