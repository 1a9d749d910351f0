"""What the user passes to an entry point, checked once: input ids and texts, masks, positions, labels.

One implementation each, shared by `attribute`, `logit_attribution`, `routes`, the analysis
functions and the command line. Every refusal is a `lens_alti.errors` argument error that names
the argument, the value and what is valid (`InvalidArgumentError`, `OutOfRangeError`,
`ArgumentTypeError`, `PaddedPositionError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError, PaddedPositionError
from lens_alti.validation import check_position, check_str_tokens, check_token_ids, check_type


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
