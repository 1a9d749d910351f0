"""Orchestration of `logit_attribution` (spec §7): cache or model in, result out (routes: prediction_routes.py).

Reading (`lens_alti.reading`, `lens_alti.reading.logit`) gives records; the mathematics is in
`lens_alti.alti.logit` and `lens_alti.alti.routes`; this module checks arguments, picks the
explained rows, runs the steps top-down and assembles the results.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.decompose import HALF_TOLERANCE, RECONSTRUCTION_TOLERANCE, check_reconstruction
from lens_alti.alti.logit import (
    COMPLETENESS_TOLERANCE,
    _rows,
    attention_update,
    completeness_gap,
    readout_direction,
    to_input_tokens,
    write_update,
)
from lens_alti.alti.masking import MASK_LEAK_TOLERANCE, isolate_padding, leaked_attention
from lens_alti.errors import (
    CompletenessError,
    LensAltiError,
    MaskMismatchError,
    MissingHooksError,
    NonFiniteError,
    UnsupportedModelError,
)
from lens_alti.reading import ModelLayout, cache_and_model, is_cache, model_layout
from lens_alti.reading.logit import DirectWrite, LogitLayout, logit_layout
from lens_alti.reading.records import AttentionBlock
from lens_alti.results import AltiResult, Seq2SeqAltiResult
from lens_alti.results.logit import LogitAttribution


def run_model(
    model: Any,
    tokens: Any,
    attention_mask: Tensor | None,
    decoder_tokens: Any,
) -> Any:
    """`model.run_with_cache` recording only the hooks lens_alti reads (a model was given instead of a cache)."""
    if tokens is None:
        raise LensAltiError(
            "given a model instead of a cache, pass the input as tokens=... (ids [batch, pos] or a text)"
        )
    if isinstance(tokens, str):
        if not hasattr(model, "to_tokens"):
            raise LensAltiError("this model has no to_tokens: pass token ids [batch, pos] as tokens=...")
        tokens = model.to_tokens(tokens)
    layout = model_layout(model)
    wanted = set(layout.hook_names()) | set(logit_layout(model, layout).hooks)
    wanted |= {"unembed.hook_in", "unembed.hook_out", "ln_final.hook_out", "decoder_ln_final.hook_out"}
    wanted |= {"embed.hook_in", "decoder_embed.hook_in"}  # attribute's check of the decoder input
    kwargs: dict[str, Any] = {"names_filter": lambda name: name in wanted}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if decoder_tokens is not None:
        kwargs["decoder_input"] = decoder_tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, **kwargs)
    return cache, tokens


def logit_inputs(
    cache_or_model: Any,
    tokens: Any,
    attention_mask: Tensor | None,
    decoder_tokens: Any,
    what: str,
    decoder_only: bool = False,
) -> tuple[Any, Any, Any, ModelLayout, LogitLayout]:
    """(cache, tokens, model, layout, logit layout) for a method that explains logits.

    Runs the model when given one (else `cache_or_model` is the cache), reads its layout and
    checks that the cache holds every hook the logit layout needs (MissingHooksError naming
    `what`). `decoder_only`: refuse encoders and encoder-decoders (UnsupportedModelError).
    """
    if is_cache(cache_or_model):
        cache = cache_or_model
    else:
        cache, tokens = run_model(cache_or_model, tokens, attention_mask, decoder_tokens)
    cache, model = cache_and_model(cache)
    layout = model_layout(model)
    if decoder_only and layout.family != "decoder":
        raise UnsupportedModelError(
            f"{layout.architecture}: {what} is implemented for decoder-only models; for encoders and "
            "encoder-decoders use attribute(heads=True)"
        )
    llayout = logit_layout(model, layout)
    have = set(cache.keys())
    missing = [h for h in llayout.hooks if h not in have]
    if missing:
        raise MissingHooksError(
            missing,
            f"{what} reads these hooks (run_with_cache without names_filter records them all; eager "
            "attention is needed for hook_pattern).",
        )
    return cache, tokens, model, layout, llayout


def _valid(mask: Tensor | None, batch: int, pos: int, device: torch.device, what: str) -> Tensor:
    if mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (batch, pos):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, but the cache has [batch, pos] = [{batch}, {pos}]")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{what} must hold only 0 (padding) and 1 (real token)")
    return mask.bool()


def explained_rows(position: Any, valid: Tensor) -> Tensor:
    """One explained position per batch item: negative counts from the last real token."""
    batch, pos = valid.shape
    if isinstance(position, int):
        position = [position] * batch
    positions = torch.as_tensor(position).flatten().tolist()
    if len(positions) != batch:
        raise ValueError(f"position has {len(positions)} entries but the batch has {batch} items")
    rows = []
    for b, p in enumerate(positions):
        real = torch.nonzero(valid[b]).flatten()
        if len(real) == 0:
            raise ValueError(f"batch item {b} has no real tokens")
        if p < 0:
            if -p > len(real):
                raise ValueError(f"position {p} is out of range: batch item {b} has {len(real)} real tokens")
            rows.append(int(real[p]))
        else:
            if p >= pos or not bool(valid[b, p]):
                raise ValueError(f"position {p} is not a real token of batch item {b} (length {pos}, mask)")
            rows.append(int(p))
    return torch.tensor(rows, dtype=torch.long, device=valid.device)


def token_ids(model: Any, which: Any, batch: int, what: str) -> Tensor:
    """Token ids `[batch]` from an int, a per-item list/tensor, or token strings."""
    if isinstance(which, (str, int)):
        which = [which] * batch
    if isinstance(which, Tensor):
        which = which.flatten().tolist()
    which = list(which)
    if len(which) != batch:
        raise ValueError(f"{what} has {len(which)} entries but the batch has {batch} items")
    ids = []
    vocab = int(model.W_U.shape[-1])
    for item in which:
        if isinstance(item, str):
            tok = getattr(model, "tokenizer", None)
            if tok is None:
                raise LensAltiError(f"{what} {item!r} is a string but the model has no tokenizer: pass token ids")
            vocab_ids = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
            if item in vocab_ids:  # a token as the tokenizer spells it (e.g. "ĠMary")
                ids.append(int(vocab_ids[item]))
                continue
            enc = tok.encode(item, add_special_tokens=False)
            bos = getattr(tok, "bos_token_id", None)
            if len(enc) > 1 and bos is not None and enc[0] == bos and not item.startswith(str(tok.bos_token)):
                enc = enc[1:]  # tokenizers that add BOS even when asked not to
            if len(enc) != 1:
                pieces = tok.convert_ids_to_tokens(enc)
                raise LensAltiError(
                    f"{what} {item!r} is {len(enc)} tokens ({pieces}), not one; pass a single token "
                    "(e.g. with its leading space, ' Mary') or its id"
                )
            item = enc[0]
        item = int(item)
        if not 0 <= item < vocab:
            raise ValueError(f"{what} id {item} is outside the vocabulary (0..{vocab - 1})")
        ids.append(item)
    return torch.tensor(ids, dtype=torch.long)


def _labels(model: Any, tokens: Any, batch: int) -> list[list[str]] | None:
    if tokens is None or isinstance(tokens, str):
        return None
    if isinstance(tokens, Tensor):
        rows = tokens if tokens.dim() == 2 else tokens[None]
        tok = model.tokenizer
        out = [list(tok.convert_ids_to_tokens(r.tolist())) for r in rows]
    else:
        out = [list(t) for t in tokens] if not isinstance(tokens[0], str) else [list(tokens)]
    if len(out) != batch:
        raise ValueError(f"tokens has {len(out)} rows but the cache has batch size {batch}")
    return out


def _row_block(block: AttentionBlock, rows: Tensor, valid_k: Tensor) -> AttentionBlock:
    """Neutralise padded sources (as `attribute` does); refuse real attention to padding from the explained rows."""
    if bool(valid_k.all()):
        return block
    explained = torch.zeros(block.pattern.shape[0], block.pattern.shape[2], dtype=torch.bool, device=rows.device)
    explained.scatter_(1, rows.view(rows.shape[0], -1), True)  # rows: [batch] (or [batch, r]) explained positions
    leak = leaked_attention(block.pattern, explained, valid_k)
    if leak > MASK_LEAK_TOLERANCE:
        raise MaskMismatchError(
            f"{block.name}: the explained position attends to positions that the mask marks as padding "
            f"(attention up to {leak:.3g}); pass the attention_mask that run_with_cache was given"
        )
    return isolate_padding(block, torch.ones_like(explained), valid_k)


def _check_finite_rows(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{name}: the cache holds NaN or Inf at the explained position")


def _gather_row(t: Tensor, rows: Tensor) -> Tensor:
    return _rows(t, rows, 1)[:, 0]


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
) -> LogitAttribution:
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
        target: token ids (an int, or one per batch item as a list or tensor) or token
            strings (each exactly one token, e.g. " Mary").
        contrast: None, or token ids / strings as for `target`: the logit difference
            `target − contrast` is then explained.
        position: the position whose next-token logit is explained: an int (negative counts from
            the last real token of each item) or one per batch item. Encoder-decoders: a target
            (decoder input) position.
        heads: keep the per-head, per-source parts `heads[b, layer, head, k]` (head totals always).
        attention_mask: `[batch, pos]` 1 = real token, as for `attribute` (encoder-decoders: source).
        decoder_attention_mask: `[batch, tgt]` the target mask of an encoder-decoder.
        tokens: ids or strings for labels (and the input when a model is given).
        decoder_tokens: encoder-decoders: target ids or strings (the target prefix with a model).
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
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    cache, tokens, model, layout, llayout = logit_inputs(
        cache_or_model, tokens, attention_mask, decoder_tokens, "logit_attribution"
    )
    seq2seq = llayout.family == "encoder_decoder"
    x0 = cache[llayout.embedding_hook]
    batch, pos = x0.shape[:2]
    device = x0.device
    if seq2seq:
        src_len = layout.blocks["encoder"][0].pattern_shape(cache)[-1]
        src_valid = _valid(attention_mask, batch, src_len, device, "attention_mask")
        valid = _valid(decoder_attention_mask, batch, pos, device, "decoder_attention_mask")
    else:
        if decoder_attention_mask is not None:
            raise ValueError(f"decoder_attention_mask is only for encoder-decoder models, not {layout.architecture}")
        src_len = 0
        src_valid = None
        valid = _valid(attention_mask, batch, pos, device, "attention_mask")
    rows = explained_rows(position, valid)
    tgt_ids = token_ids(model, target, batch, "target")
    ctr_ids = None if contrast is None else token_ids(model, contrast, batch, "contrast")

    readout = llayout.readout(cache)
    W_U = readout.W_U.to(device=device, dtype=dtype)
    u = W_U[:, tgt_ids.to(device)].T
    u_bias = torch.zeros(batch, dtype=dtype, device=device)
    b_U = None if readout.b_U is None else readout.b_U.to(device=device, dtype=dtype)
    if b_U is not None:
        u_bias = b_U[tgt_ids.to(device)]
    real = readout.real_logits
    items = torch.arange(batch, device=device)
    logit = real[items, rows, tgt_ids.to(device)].to(dtype)
    if ctr_ids is not None:
        u = u - W_U[:, ctr_ids.to(device)].T
        if b_U is not None:
            u_bias = u_bias - b_U[ctr_ids.to(device)]
        logit = logit - real[items, rows, ctr_ids.to(device)].to(dtype)
    x_final = _gather_row(readout.final_residual, rows)
    _check_finite_rows("final residual stream", x_final)
    norm = readout.norm
    w, readout_bias = readout_direction(x_final, norm.kind, norm.gain, norm.bias, norm.eps, u, u_bias)

    n_layers = 1 + max(s.layer for s in llayout.steps)
    self_heads: Tensor | None = None
    cross_heads: Tensor | None = None
    mlp = torch.zeros(batch, n_layers, dtype=dtype, device=device)
    attn_bias = torch.zeros(batch, n_layers, dtype=dtype, device=device)
    write_bias = torch.zeros(batch, dtype=dtype, device=device)
    errors = []
    for step in reversed(llayout.steps):
        record = step.build(cache)
        if isinstance(record, DirectWrite):
            out = _gather_row(record.output, rows)
            _check_finite_rows(record.name, out)
            norm_rows = None if record.norm is None else replace(record.norm, scale=_rows(record.norm.scale, rows, 1))
            value, bias, w = write_update(out, norm_rows, w)
            mlp[:, step.layer] += value
            write_bias += bias
            continue
        valid_k = src_valid if step.kind == "cross" and src_valid is not None else valid  # cross: seq2seq only
        block = _row_block(record, rows, valid_k)
        upd = attention_update(block, rows, w, dtype)
        if check:
            tol = HALF_TOLERANCE.get(block.target.dtype, RECONSTRUCTION_TOLERANCE)
            errors.append(check_reconstruction(upd.tv, upd.row_block, None, tol))
        if step.kind == "cross":
            if cross_heads is None:
                cross_heads = upd.heads.new_zeros(batch, n_layers, *upd.heads.shape[1:])
            cross_heads[:, step.layer] = upd.heads
        else:
            if self_heads is None:
                self_heads = upd.heads.new_zeros(batch, n_layers, *upd.heads.shape[1:])
            if upd.heads.shape[1] != self_heads.shape[2]:
                raise UnsupportedModelError(
                    f"{layout.architecture}: {block.name} has {upd.heads.shape[1]} heads and a later layer "
                    f"{self_heads.shape[2]} (a hybrid or per-layer head counts; a mixer without heads counts as one): "
                    "logit_attribution's heads[batch, layer, head, src] need one head count"
                )
            self_heads[:, step.layer] = upd.heads
        attn_bias[:, step.layer] += upd.bias
        w = upd.below
    embedding = (_gather_row(x0, rows).to(dtype) * w).sum(-1)
    bias = attn_bias.sum(1) + write_bias + readout_bias
    if self_heads is None:
        raise UnsupportedModelError(f"{layout.architecture}: no attention (or mixer) block to attribute the logit to")
    head_totals = self_heads.sum(-1)
    cross_totals = None if cross_heads is None else cross_heads.sum(-1)
    parts = [embedding[:, None], head_totals, mlp, attn_bias, write_bias[:, None], readout_bias[:, None]]
    if cross_totals is not None:
        parts.append(cross_totals)
    gap, scale = completeness_gap(logit, parts)
    if check:
        tol = HALF_TOLERANCE.get(x0.dtype, COMPLETENESS_TOLERANCE)
        bad = (gap.abs() > tol * scale).nonzero().flatten()
        if len(bad):
            b = int(bad[0])
            raise CompletenessError(
                float(gap[b]), float(logit[b]), float(scale[b]), tol, b,
                "The final norm, the unembedding or a block of this model is not read the way it runs; "
                "pass check=False only if you know why.",
            )

    # To input tokens (spec §7): Δ^l @ R^(l−1).
    from lens_alti.api.attribute import attribute

    if seq2seq:
        assert src_valid is not None and cross_heads is not None  # internal: both set for encoder-decoder models
        res = attribute(
            cache, attention_mask=src_valid.long(), decoder_attention_mask=valid.long(), check=check, dtype=dtype
        )
        assert isinstance(res, Seq2SeqAltiResult)  # internal: an encoder-decoder cache
        r_enc = res.encoder.rollout[:, -1].to(dtype)
        total = res.total.to(dtype)
        eye = torch.eye(pos, dtype=dtype, device=device).expand(batch, pos, pos)
        first = torch.cat([torch.zeros(batch, pos, src_len, dtype=dtype, device=device), eye], dim=-1)
        by_layer = []
        for layer in range(n_layers):
            below = first if layer == 0 else total[:, layer - 1]
            row = to_input_tokens(self_heads[:, layer], below)
            row[:, :src_len] += to_input_tokens(cross_heads[:, layer], r_enc)
            by_layer.append(row)
        by = torch.stack(by_layer, 1)
        emb_col = rows + src_len
    else:
        res = attribute(cache, attention_mask=valid.long(), check=check, dtype=dtype)
        assert isinstance(res, AltiResult)  # internal: a decoder-only or encoder-only cache
        ro = res.rollout.to(dtype)
        by = torch.stack(
            [
                to_input_tokens(self_heads[:, layer], None if layer == 0 else ro[:, layer - 1])
                for layer in range(n_layers)
            ],
            1,
        )
        emb_col = rows
    tok = by.sum(1)
    tok[items, emb_col] += embedding
    labels = _labels(model, tokens, batch)
    if seq2seq and labels is not None:
        dec = _labels(model, decoder_tokens, batch)
        labels = [s + t for s, t in zip(labels, dec, strict=True)] if dec is not None else None
    tok_name = getattr(model, "tokenizer", None)
    names = lambda ids: None if ids is None or tok_name is None else tok_name.convert_ids_to_tokens(ids.tolist())  # noqa: E731
    return LogitAttribution(
        by_layer=by,
        tokens=tok,
        heads=self_heads if heads else None,
        head_totals=head_totals,
        mlp=mlp,
        attn_bias=attn_bias,
        embedding=embedding,
        bias=bias,
        logit=logit,
        completeness_gap=gap,
        target=tgt_ids,
        contrast=ctr_ids,
        position=rows,
        attention_mask=valid.long(),
        architecture=layout.architecture,
        weight_processing=layout.weight_processing,
        softcap=readout.softcap,
        n_source=src_len,
        cross_heads=cross_heads if heads else None,
        cross_head_totals=cross_totals,
        str_tokens=labels,
        target_str=names(tgt_ids),
        contrast_str=names(ctr_ids),
        extra={"reconstruction_error": errors, "source_mask": None if src_valid is None else src_valid.long()},
    )
