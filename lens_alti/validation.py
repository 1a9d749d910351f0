"""Argument checks shared by every public function.

Each helper returns the checked (normalised) value or raises an error that names the
argument, the value it got and what is valid:

- `OutOfRangeError` (an `IndexError`) for indices: positions, batch items, layers, heads,
  token ids;
- `InvalidArgumentError` (a `ValueError`) for values: sizes, k, choices; its subclass
  `PaddedPositionError` for a position that is padding (the message lists the real ones);
- `ArgumentTypeError` (a `TypeError`) for the wrong kind of thing.

All three subclass `lens_alti.LensAltiError`. Indices accept negatives the Python way;
positions count negatives from the last *real* token of a batch item.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError, PaddedPositionError

__all__ = [
    "check_choice",
    "check_heads",
    "check_index",
    "check_int",
    "check_position",
    "check_positions",
    "check_size",
    "check_str_tokens",
    "check_token_ids",
    "check_type",
    "describe_positions",
    "real_positions",
]


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return (
        isinstance(value, Tensor)
        and value.dim() == 0
        and not value.dtype.is_floating_point
        and value.dtype != torch.bool
    )


def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str) -> Any:
    """`value` itself when it is an instance of `types`; ArgumentTypeError otherwise."""
    if not isinstance(value, types):
        raise ArgumentTypeError(name, value, f"{expected} (got a {type(value).__name__})")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python, numpy or 0-d tensor; not bool) within [minimum, maximum]."""
    lo = "-∞" if minimum is None else str(minimum)
    hi = "∞" if maximum is None else str(maximum)
    if not _is_int(value):
        raise ArgumentTypeError(name, value, f"an integer in {lo}..{hi} (got a {type(value).__name__})")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise InvalidArgumentError(name, value, f"an integer in {lo}..{hi}")
    return v


def check_size(name: str, value: Any, *, minimum: int = 1) -> int:
    """A size or count (an int ≥ `minimum`), e.g. `max_chunk_bytes`, `k`, number of prompts."""
    return check_int(name, value, minimum=minimum)


def check_index(name: str, value: Any, size: int, *, what: str = "") -> int:
    """An index into `size` items, negatives counting from the end; returns it in 0..size-1."""
    if not _is_int(value):
        raise ArgumentTypeError(name, value, f"an integer index (got a {type(value).__name__})")
    v = int(value)
    of = f" ({size} {what})" if what else f" ({size} items)"
    if size <= 0:
        raise OutOfRangeError(name, value, f"an index, but there are none{of}")
    if not -size <= v < size:
        raise OutOfRangeError(name, value, f"an index in 0..{size - 1} or -{size}..-1{of}")
    return v % size


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices` (compared with ==)."""
    options = list(choices)
    if not any(value == c and type(value) is type(c) for c in options):
        raise InvalidArgumentError(name, value, "one of " + ", ".join(repr(c) for c in options))
    return value


def real_positions(mask_row: Tensor | Sequence[int] | None, length: int) -> list[int]:
    """Indices where a `[pos]` mask is 1 (all of 0..length-1 when the mask is None)."""
    if mask_row is None:
        return list(range(length))
    flags = mask_row.tolist() if isinstance(mask_row, Tensor) else list(mask_row)
    return [i for i, m in enumerate(flags) if m]


def describe_positions(indices: Sequence[int]) -> str:
    """Compact ranges: [0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8"."""
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def check_position(
    name: str, value: Any, mask_row: Tensor | Sequence[int] | None, length: int | None = None, *, where: str = ""
) -> int:
    """A position of one batch item: 0..pos-1 if real, or negative counting real tokens from the end.

    `mask_row`: that item's `[pos]` mask (1 = real), or None with `length` when nothing is padded.
    Returns the absolute position. Refuses padded positions with PaddedPositionError.
    """
    n = len(mask_row) if mask_row is not None else int(length or 0)
    real = real_positions(mask_row, n)
    ctx = f" of {where}" if where else ""
    if not _is_int(value):
        raise ArgumentTypeError(name, value, f"an integer position (got a {type(value).__name__})")
    v = int(value)
    if not real:
        raise OutOfRangeError(name, value, f"a real position, but {where or 'this batch item'} has no real tokens")
    if v < 0:
        if v < -len(real):
            raise OutOfRangeError(
                name,
                value,
                f"a position in 0..{n - 1}, or -{len(real)}..-1 counting the {len(real)} real tokens{ctx} "
                f"from the last (real positions: {describe_positions(real)})",
            )
        return real[v]
    if v >= n:
        raise OutOfRangeError(
            name,
            value,
            f"a position in 0..{n - 1} or -{len(real)}..-1{ctx} (real positions: {describe_positions(real)})",
        )
    if v not in set(real):
        raise PaddedPositionError(
            name,
            value,
            f"a real (unpadded) position{ctx}; {v} is padding, the real positions are {describe_positions(real)}",
        )
    return v


def check_positions(
    name: str, values: Any, mask_row: Tensor | Sequence[int] | None, length: int | None = None, *, where: str = ""
) -> list[int]:
    """A sequence of positions (see `check_position`), returned absolute, in the given order."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, Tensor, range)):
        raise ArgumentTypeError(name, values, f"a sequence of integer positions (got a {type(values).__name__})")
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    return [check_position(f"{name}[{i}]", v, mask_row, length, where=where) for i, v in enumerate(items)]


def check_token_ids(
    name: str, ids: Any, *, vocab_size: int | None = None, count: int | None = None, dims: tuple[int, ...] = (1,)
) -> Tensor:
    """Token ids as a long tensor: integers in 0..vocab_size-1, `dims` dimensions, `count` entries in the first.

    Accepts a tensor, a numpy array or a (nested) list of ints; refuses strings, floats and bools.
    """
    if isinstance(ids, (str, bytes)) or ids is None:
        raise ArgumentTypeError(name, ids, "token ids (integers), not text: tokenise it first (model.to_tokens)")
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArgumentTypeError(name, ids, f"token ids (a tensor or a list of integers): {exc}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ArgumentTypeError(name, ids, f"integer token ids (got dtype {t.dtype})")
    if t.dim() not in dims:
        shapes = " or ".join(f"{d}-D" for d in dims)
        raise InvalidArgumentError(name, ids, f"a {shapes} tensor of token ids (got shape {tuple(t.shape)})")
    if count is not None and (t.dim() == 0 or t.shape[0] != count):
        got = "a scalar" if t.dim() == 0 else f"{t.shape[0]}"
        raise InvalidArgumentError(name, ids, f"{count} token ids, one per prompt (got {got})")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        top = "" if vocab_size is None else f"..{vocab_size - 1}"
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bad = lo if lo < 0 else hi
            raise OutOfRangeError(
                name,
                bad,
                f"token ids in 0{top} (the vocabulary has {vocab_size} entries)"
                if vocab_size is not None
                else "non-negative token ids",
            )
    return t.long()


def check_heads(
    name: str, heads: Any, n_layers: int, n_heads: int, *, allow_empty: bool = False
) -> list[tuple[int, int]]:
    """A sequence of (layer, head) pairs, each in range; negatives count from the end."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise ArgumentTypeError(name, heads, "a sequence of (layer, head) pairs")
    out = []
    for i, pair in enumerate(heads):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence | Tensor) or len(pair) != 2:
            raise ArgumentTypeError(f"{name}[{i}]", pair, "a (layer, head) pair of integers")
        layer = check_index(f"{name}[{i}] layer", pair[0], n_layers, what="layers")
        head = check_index(f"{name}[{i}] head", pair[1], n_heads, what="heads per layer")
        out.append((layer, head))
    if not out and not allow_empty:
        raise InvalidArgumentError(name, heads, "at least one (layer, head) pair")
    return out


def check_str_tokens(name: str, tokens: Any, lengths: Sequence[int]) -> list[list[str]]:
    """Token labels: one list of strings per batch item, each as long as that item's sequence.

    `lengths`: the cache's sequence length for every batch item (all equal: the padded length).
    A plain string is refused (it would be split into characters).
    """
    if isinstance(tokens, (str, bytes)):
        raise ArgumentTypeError(
            name,
            tokens,
            "token ids [batch, pos] or token strings (a list per batch item), not a text: "
            "tokenise it first (model.to_tokens / model.to_str_tokens)",
        )
    rows = [tokens] if tokens and isinstance(tokens[0], str) else list(tokens)
    if len(rows) != len(lengths):
        raise InvalidArgumentError(
            name,
            f"{len(rows)} rows",
            f"{len(lengths)} rows, one per batch item of the cache "
            f"(tokens has {len(rows)} rows but the cache has batch size {len(lengths)})",
        )
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if isinstance(row, (str, bytes)):
            raise ArgumentTypeError(f"{name}[{b}]", row, "a list of token strings, not one string")
        if len(row) != n:
            raise InvalidArgumentError(
                f"{name}[{b}]",
                f"{len(row)} tokens",
                f"{n} tokens, the cache's sequence length (labels would be misaligned)",
            )
    return [list(map(str, r)) for r in rows]
