"""Which positions of a run are attention sinks (docs/spec.md §10), for the entry points.

`find_sinks` reads a cache (the tokenizer's special ids, the input ids, the cached patterns) and
decides with `lens_alti.alti.sinks`; `attribute` streaming from a model feeds the same
`SinkMeter` block by block instead (`lens_alti.api.plans`).
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool
from torch import Tensor

from lens_alti.alti.sinks import SinkMeter, sink_positions
from lens_alti.reading import ModelLayout
from lens_alti.reading.sinks import cached_input_ids, cached_patterns, first_is_special


def input_ids(cache: Any, tokens: Any) -> Any:
    """The ids the run saw: the cache's own record of them, else `tokens` when they are ids."""
    ids = cached_input_ids(cache)
    return tokens if ids is None and isinstance(tokens, Tensor) else ids


def find_sinks(cache: Any, model: Any, layout: ModelLayout, valid: Bool[Tensor, "b n"], tokens: Any = None) -> Tensor:
    """`[b, n]` True at the attention sinks of each item of a decoder-only or encoder cache.

    The first real token when it is a special token of the model's tokenizer; else the positions
    into which a majority of the cached attention heads put a majority of their attention.
    """
    special = first_is_special(model, input_ids(cache, tokens), valid)
    if special is not None and bool(special.all()):
        return sink_positions(valid, special, None)
    meter = SinkMeter(valid, causal=layout.family == "decoder")
    for pattern in cached_patterns(cache, layout):
        meter.add(pattern)
    return sink_positions(valid, special, meter.measured())
