"""What the user passes to an entry point, checked once: input ids and texts, masks, positions, labels.

One implementation each, shared by `attribute`, `logit_attribution`, `routes`, the analysis
functions and the command line. Every refusal is a `lens_alti.errors` argument error that names
the argument, the value and what is valid (`InvalidArgumentError`, `OutOfRangeError`,
`ArgumentTypeError`, `PaddedPositionError`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError, PaddedPositionError
from lens_alti.validation import check_choice, check_int, check_position, check_str_tokens, check_token_ids, check_type


def valid_mask(
    mask: Any, batch: int, pos: int, device: torch.device, name: str = "attention_mask"
) -> Bool[Tensor, "b p"]:
    """`[batch, pos]` True for real tokens: `mask` checked (shape, only 0 and 1), or all True when None."""
    if mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    t = torch.as_tensor(mask, device=device)
    if t.shape != (batch, pos):
        raise InvalidArgumentError(name, f"shape {tuple(t.shape)}", f"the inputs' [batch, pos] = [{batch}, {pos}]")
    if not ((t == 0) | (t == 1)).all():
        raise InvalidArgumentError(name, mask, "only 0 (padding) and 1 (real token)")
    return t.bool()


def no_decoder_mask(decoder_attention_mask: Any, architecture: str) -> None:
    """Refuse a decoder mask for a model that is not an encoder-decoder."""
    if decoder_attention_mask is not None:
        raise InvalidArgumentError(
            "decoder_attention_mask", "a mask", f"None (only encoder-decoders take it, not {architecture})"
        )


def left_pad(rows: Sequence[Tensor], pad: int | None) -> tuple[Int[Tensor, "b p"], Int[Tensor, "b p"]]:
    """Token ids `[batch, pos]` of 1-D `rows`, left-padded with `pad` (0 when None), and the `[batch, pos]` mask."""
    n = max(len(r) for r in rows)
    like = rows[0]
    ids = torch.full((len(rows), n), 0 if pad is None else int(pad), dtype=like.dtype, device=like.device)
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=like.device)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return ids, mask


def pad_token_id(model: Any) -> int | None:
    """The tokenizer's pad token id, or None."""
    return getattr(getattr(model, "tokenizer", None), "pad_token_id", None)


def tokenize(model: Any, texts: str | Sequence[str], name: str = "tokens") -> tuple[Tensor, Tensor | None]:
    """Token ids `[batch, pos]` of one text or a list of texts, and the mask (None for one text).

    Each text is tokenised alone with `model.to_tokens` (the model's default BOS, so a pad token
    that doubles as BOS is never taken for padding) and rows are left-padded.
    """
    if not hasattr(model, "to_tokens"):
        raise ArgumentTypeError(name, texts, f"token ids (a tensor): {type(model).__name__} has no to_tokens")
    if isinstance(texts, str):
        return model.to_tokens(texts), None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidArgumentError(name, texts, "a text or a non-empty list of texts (one per batch item)")
    return left_pad([model.to_tokens(t)[0] for t in texts], pad_token_id(model))


def is_text(tokens: Any) -> bool:
    """True for a string or a non-empty list/tuple of strings."""
    if isinstance(tokens, str):
        return True
    return isinstance(tokens, (list, tuple)) and bool(tokens) and isinstance(tokens[0], str)


def model_input(model: Any, tokens: Any, name: str = "tokens") -> tuple[Int[Tensor, "b p"], Tensor | None]:
    """(ids `[batch, pos]`, the mask of tokenised texts or None) of the input a model is to run on."""
    if tokens is None:
        raise ArgumentTypeError(
            name, tokens, "the input to run: token ids [batch, pos] or a text (a model was given instead of a cache)"
        )
    if is_text(tokens):
        return tokenize(model, tokens if isinstance(tokens, str) else list(tokens), name)
    if isinstance(tokens, (list, tuple)) and not tokens:
        raise InvalidArgumentError(name, tokens, "a non-empty input: token ids [batch, pos] or a text")
    ids = check_token_ids(name, tokens, dims=(1, 2))
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape[-1] == 0:
        raise InvalidArgumentError(name, tokens, "at least one token per batch item")
    return ids, None


def input_device(model: Any) -> torch.device:
    """Where the model's parameters live (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def token_labels(
    model: Any, tokens: Any, batch: int, pos: int | None = None, name: str = "tokens"
) -> list[list[str]] | None:
    """Token labels per batch item (decoded text pieces), or None when `tokens` is None (or, without `pos`, a text).

    `tokens`: ids `[batch, pos]` (decoded with the model's tokenizer) or token strings (one list
    per batch item). With `pos`, each row must have that length (labels would be misaligned).
    """
    if tokens is None or (isinstance(tokens, str) and pos is None):
        return None
    if isinstance(tokens, Tensor) or (pos is not None and not isinstance(tokens, (list, tuple))):
        ids = check_token_ids(name, tokens, dims=(1, 2))
        rows = ids if ids.dim() == 2 else ids[None]
        if rows.shape[0] != batch or (pos is not None and rows.shape[-1] != pos):
            raise InvalidArgumentError(
                name, f"ids of shape {tuple(ids.shape)}", f"[batch, pos] = [{batch}, {pos}], the inputs' shape "
                f"(tokens has {rows.shape[0]} rows for {batch} batch items; labels would be misaligned)"
            )
        return [decode_pieces(model, row.tolist()) for row in rows]
    if pos is not None:
        return check_str_tokens(name, tokens, [pos] * batch)
    out = [list(tokens)] if tokens and isinstance(tokens[0], str) else [list(t) for t in tokens]
    if len(out) != batch:
        raise InvalidArgumentError(name, f"{len(out)} rows", f"one row per batch item ({batch})")
    return out


def decode_pieces(model: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for (" Mary", not "ĠMary"), as `model.to_str_tokens` gives it."""
    if hasattr(model, "to_str_tokens"):
        return [str(s) for s in model.to_str_tokens(torch.as_tensor(list(ids)))]
    tok = model.tokenizer  # TransformerLens 3.x HookedEncoder(Decoder): decode each id, never a raw piece ("ĠMary")
    return [str(tok.decode([int(i)], clean_up_tokenization_spaces=False)) for i in ids]


def explained_rows(position: Any, valid: Bool[Tensor, "b p"], name: str = "position") -> Int[Tensor, " b"]:
    """One explained position per batch item (an int, or one per item).

    Negative positions count back from each item's last real token; padding is refused.
    """
    batch, pos = valid.shape
    if isinstance(position, Tensor):
        position = position.flatten().tolist()
    positions = [position] * batch if not isinstance(position, (list, tuple)) else list(position)
    if len(positions) != batch:
        raise InvalidArgumentError(name, position, f"an int, or one position per batch item ({batch})")
    rows = [
        check_position(name, p, valid[b].cpu(), where=f"batch item {b}" if batch > 1 else "")
        for b, p in enumerate(positions)
    ]
    return torch.tensor(rows, dtype=torch.long, device=valid.device)


def token_ids(model: Any, which: Any, batch: int, name: str, vocab_size: int | None = None) -> Int[Tensor, " b"]:
    """Token ids `[batch]` from an int, a one-token string, or one of these per batch item (list or tensor)."""
    if isinstance(which, (str, int)) and not isinstance(which, bool):
        which = [which] * batch
    if isinstance(which, Tensor):
        which = which.flatten().tolist()
    check_type(name, which, (list, tuple), "a token id, a one-token string, or one per batch item")
    if len(which) != batch:
        raise InvalidArgumentError(name, which, f"one token per batch item ({batch}), or a single one for all")
    ids = [_one_token(model, item, name) if isinstance(item, str) else item for item in which]
    return check_token_ids(name, ids, vocab_size=vocab_size)


def _one_token(model: Any, text: str, name: str) -> int:
    """The id of a string that is exactly one token (as the tokenizer spells it, e.g. "ĠMary", or as text, " Mary")."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ArgumentTypeError(name, text, "a token id: the model has no tokenizer to read a string with")
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    if text in vocab:
        return int(vocab[text])
    enc = tok.encode(text, add_special_tokens=False)
    bos = getattr(tok, "bos_token_id", None)
    if len(enc) > 1 and bos is not None and enc[0] == bos and not text.startswith(str(tok.bos_token)):
        enc = enc[1:]  # tokenizers that add BOS even when asked not to
    if len(enc) != 1:
        pieces = [tok.decode([i]) for i in enc]  # decoded text, never raw pieces
        raise InvalidArgumentError(
            name, text, f"exactly one token, but it is {len(enc)} ({pieces}); pass a single token "
            "(e.g. with its leading space, ' Mary') or its id"
        )
    return int(enc[0])


def pick_item(which: Any, batch: int, n_batch: int) -> Any:
    """The entry of batch item `batch` when `which` holds one per item (a list, tuple or tensor of n_batch > 1)."""
    if isinstance(which, (list, tuple, Tensor)) and not isinstance(which, str) and len(which) == n_batch > 1:
        return which[batch]
    return which


def check_threshold(name: str, value: Any) -> float:
    """A number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(name, value, "a number in (0, 1)")
    if not 0 < value < 1:
        raise InvalidArgumentError(name, value, "a number in (0, 1)")
    return float(value)


def receivers(positions: Any, valid: Bool[Tensor, "b p"], name: str = "positions") -> Int[Tensor, "b r"] | None:
    """Receivers of interest as `[batch, r]` positions, or None for all.

    `positions`: "last", an int, a list of ints (the same for every batch item; negative ones
    count back from each item's last real token, so -1 is the last real token under left or
    right padding), a `[batch, r]` integer tensor, or a `[batch, pos]` boolean mask selecting the
    same number of receivers in every item. Padding cannot be selected.
    """
    if positions is None:
        return None
    batch, pos = valid.shape
    kinds = "'last', an int, a list of ints, a [batch, r] integer tensor or a [batch, pos] boolean mask"
    if isinstance(positions, str):
        if positions != "last":
            raise InvalidArgumentError(name, positions, kinds)
        positions = [-1]
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    try:
        t = torch.as_tensor(positions, device=valid.device)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentTypeError(name, positions, kinds) from None
    if t.dtype == torch.bool:
        return _mask_receivers(t, valid, name)
    if t.dtype.is_floating_point or t.dim() not in (1, 2) or t.numel() == 0:
        raise InvalidArgumentError(name, positions, f"a non-empty list of ints or a [batch, r] tensor ({kinds})")
    t = t.long()
    t = t.expand(batch, -1) if t.dim() == 1 else t
    if t.shape[0] != batch:
        raise InvalidArgumentError(name, f"{t.shape[0]} rows", f"one row per batch item ({batch})")
    n_real = valid.sum(-1, keepdim=True)
    if bool(((t < -n_real) | (t >= pos)).any()):
        raise OutOfRangeError(
            name, t.tolist(), f"positions in 0..{pos - 1}, or negative ones counting back over the "
            f"{n_real.flatten().tolist()} real tokens of each item"
        )
    real = torch.where(valid, torch.arange(pos, device=valid.device), pos).sort(-1).values  # real first
    out = torch.where(t < 0, real.gather(1, (n_real + t).clamp(0, pos - 1)), t)
    if not bool(valid.gather(1, out).all()):
        raise PaddedPositionError(name, out.tolist(), "real tokens (attention_mask == 1), not padding")
    return out


def _mask_receivers(t: Tensor, valid: Tensor, name: str) -> Tensor:
    """The `[batch, r]` positions a `[batch, pos]` boolean mask selects (the same number in every item)."""
    batch, pos = valid.shape
    if t.shape != (batch, pos):
        raise InvalidArgumentError(name, f"a mask of shape {tuple(t.shape)}", f"a [batch, pos] = [{batch}, {pos}] mask")
    counts = t.sum(-1)
    if t.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise InvalidArgumentError(
            name, f"a mask selecting {counts.tolist()}", "the same, non-zero number of receivers in every batch item"
        )
    out = t.nonzero()[:, 1].view(batch, int(counts[0]))
    if not bool(valid.gather(1, out).all()):
        raise PaddedPositionError(name, out.tolist(), "real tokens (attention_mask == 1), not padding")
    return out


def contrast_distribution(which: Any, batch: int, vocab_size: int, name: str = "contrast") -> Tensor | None:
    """A contrast given as a distribution over the vocabulary: `[batch, vocab]` float weights, or None.

    None when `which` is not a floating-point tensor (token ids or strings are read by `token_ids`).
    A `[vocab]` tensor is used for every batch item. Each row must be non-negative and sum to 1
    (within 1e-3): the explained quantity is then `logit_target − Σ_v which[v]·logit_v`
    (docs/spec.md §13b).
    """
    if not isinstance(which, Tensor) or not which.dtype.is_floating_point:
        return None
    t = which[None] if which.dim() == 1 else which
    if t.dim() != 2 or t.shape[-1] != vocab_size or t.shape[0] not in (1, batch):
        raise InvalidArgumentError(
            name, f"a float tensor of shape {tuple(which.shape)}",
            f"a distribution over the vocabulary: [vocab] or [batch, vocab] = [{batch}, {vocab_size}]",
        )
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise InvalidArgumentError(name, "a tensor with negative or non-finite weights", "non-negative weights")
    sums = t.double().sum(-1)
    if bool(((sums - 1).abs() > 1e-3).any()):
        raise InvalidArgumentError(
            name, f"weights summing to {sums.tolist()[:4]}", "a distribution: each row summing to 1 (within 1e-3)"
        )
    return t.expand(batch, -1)


UNIT_KINDS = ("sentence", "paragraph")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def text_units(text: str, units: Any, name: str = "units") -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the units of `text` (docs/spec.md §13a), in order.

    `units`: "sentence" (a run of ., ! or ? followed by whitespace ends a sentence, and so does a
    line break), "paragraph" (blank lines separate paragraphs), or a list of `(start, end)`
    character spans, sorted and not overlapping. Split units are stripped of surrounding
    whitespace; empty ones are dropped.
    """
    if isinstance(units, str):
        check_choice(name, units, UNIT_KINDS)
        pieces = _lines(text) if units == "sentence" else _paragraphs(text)
        spans = [s for p in pieces for s in (_sentences(text, *p) if units == "sentence" else [p])]
        return [s for s in (_strip(text, a, b) for a, b in spans) if s is not None]
    kinds = "'sentence', 'paragraph' or a list of (start, end) character spans"
    if not isinstance(units, (list, tuple)) or not units:
        raise ArgumentTypeError(name, units, kinds)
    out: list[tuple[int, int]] = []
    for i, span in enumerate(units):
        if isinstance(span, (str, bytes)) or not isinstance(span, (list, tuple)) or len(span) != 2:
            raise ArgumentTypeError(f"{name}[{i}]", span, "a (start, end) pair of character offsets")
        start, end = (check_int(f"{name}[{i}]", v) for v in span)
        if not 0 <= start < end <= len(text):
            raise OutOfRangeError(f"{name}[{i}]", span, f"0 <= start < end <= {len(text)} (the context's length)")
        if out and start < out[-1][1]:
            raise InvalidArgumentError(f"{name}[{i}]", span, f"a span starting at or after {out[-1][1]} (sorted, "
                                       "not overlapping the one before)")
        out.append((start, end))
    return out


def _lines(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+", text)]


def _paragraphs(text: str) -> list[tuple[int, int]]:
    bounds = [0, *(x for m in re.finditer(r"\n[ \t\r]*\n\s*", text) for x in (m.start(), m.end())), len(text)]
    return [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, pos = [], start
    for m in _SENTENCE_END.finditer(text, start, end):
        spans.append((pos, m.end()))
        pos = m.end()
    return [*spans, (pos, end)] if pos < end else spans


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    piece = text[start:end]
    lead, body = len(piece) - len(piece.lstrip()), piece.strip()
    return (start + lead, start + lead + len(body)) if body else None


def token_units(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], shift: int = 0) -> list[int]:
    """The unit of each token: the span (shifted by `shift` characters) that shares the most
    characters with the token's offsets `[start, end)`, the first on a tie; -1 for none (docs/spec.md §13a)."""
    out = []
    for start, end in offsets:
        best, best_overlap = -1, 0
        for u, (a, b) in enumerate(spans):
            overlap = min(end, b + shift) - max(start, a + shift)
            if overlap > best_overlap:
                best, best_overlap = u, overlap
        out.append(best)
    return out


def remove_units(text: str, spans: Sequence[tuple[int, int]], removed: Any) -> str:
    """`text` without the units `removed` (indices into `spans`; docs/spec.md §13e).

    Each removed unit goes with the whitespace that separates it from the kept text before it; a
    unit with no kept text before it goes with the whitespace after it. All other text stays.
    """
    kept, pos = "", 0
    for u in sorted({int(i) for i in removed}):
        a, b = spans[u]
        kept += text[pos:a]
        pos = b
        if kept.strip():
            kept = kept.rstrip()
        else:
            pos = b + len(text[b:]) - len(text[b:].lstrip())
    return kept + text[pos:]


DEFAULT_TEMPLATE = "Context: {context}\n\nQuery: {query}"


def context_prompt(model: Any, context: str, query: str, template: str, chat: Any) -> tuple[str, int, bool]:
    """(prompt text, index of the context in it, whether the chat template was used) (docs/spec.md §13a).

    The user message is `template` with `{context}` and `{query}` filled in (plain replacement);
    with `chat` True, or None and a tokenizer that has a chat template, it is wrapped by the
    tokenizer's chat template as one user turn with the generation prompt.
    """
    check_type("template", template, str, "a text with {context} and {query} once each")
    if template.count("{context}") != 1 or template.count("{query}") != 1:
        raise InvalidArgumentError("template", template, "a text with {context} and {query} once each")
    if chat is not None:
        check_type("chat", chat, bool, "True, False or None (use the chat template when the tokenizer has one)")
    before, after = template.split("{context}")
    before, after = before.replace("{query}", query), after.replace("{query}", query)
    user, start = before + context + after, len(before)
    tok = getattr(model, "tokenizer", None)
    has_chat = tok is not None and bool(getattr(tok, "chat_template", None))
    if chat and not has_chat:
        raise InvalidArgumentError("chat", chat, "False or None: this model's tokenizer has no chat template")
    if tok is None or not (has_chat if chat is None else chat):
        return user, start, False
    messages = [{"role": "user", "content": user}]
    prompt = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    at = prompt.find(user)
    if at < 0:
        raise InvalidArgumentError("chat", chat, "False: this chat template changes the message text, so the "
                                   "context's characters cannot be found in the prompt")
    return prompt, at + start, True


def tokens_with_offsets(model: Any, text: str, bos: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of `text`, each token's character span in it), with the BOS token first when `bos`.

    Needs a fast (Rust) tokenizer for the offsets; BOS has the empty span (0, 0).
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None or not getattr(tok, "is_fast", False):
        raise ArgumentTypeError(
            "model", type(model).__name__, "a model with a fast tokenizer (model.tokenizer.is_fast): character "
            "offsets map the context's units to tokens"
        )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos_id = getattr(tok, "bos_token_id", None)
    if bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids, offsets = [int(bos_id), *ids], [(0, 0), *offsets]
    return ids, offsets


def context_tokens(
    model: Any, context: str, query: str, template: str = DEFAULT_TEMPLATE, chat: Any = None
) -> tuple[list[int], list[tuple[int, int]], str, int, bool]:
    """(prompt ids, their character spans, prompt text, where the context starts in it, chat used).

    The prompt of `context_prompt`, tokenised whole; BOS first when no chat template is used and
    the model prepends one by default (`cfg.default_prepend_bos`, True when absent).
    """
    prompt, start, used_chat = context_prompt(model, context, query, template, chat)
    bos = not used_chat and bool(getattr(getattr(model, "cfg", None), "default_prepend_bos", True))
    ids, offsets = tokens_with_offsets(model, prompt, bos)
    return ids, offsets, prompt, start, used_chat
