"""Which positions of a run are attention sinks (docs/spec.md §10), for the entry points.

`SinkFinder` decides with `lens_alti.alti.sinks`: the first real token when it is one of the
tokenizer's special tokens, else a `SinkMeter` that the entry point shows every self-attention
block it reads (from a cache, a forward pass or a layer run again; recomputed attention rows are
read in chunks of receivers, so the `[head, n, n]` pattern is never formed).
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool
from torch import Tensor

from lens_alti.alti.contributions import DEFAULT_CHUNK_BYTES
from lens_alti.alti.sinks import SinkMeter, sink_positions
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.sinks import cached_input_ids, first_is_special


def input_ids(cache: Any, tokens: Any) -> Any:
    """The ids a cache's run saw: the cache's own record of them, else `tokens` when they are ids."""
    ids = cached_input_ids(cache)
    return tokens if ids is None and isinstance(tokens, Tensor) else ids


class SinkFinder:
    """The sinks of a decoder-only or encoder run of `model` on `ids` (`valid[b, n]`: real tokens).

    When every item starts with a special token nothing needs measuring (`add` does nothing);
    otherwise `add` shows the meter each self-attention block, and `sinks()` decides.
    """

    def __init__(
        self, model: Any, ids: Any, valid: Bool[Tensor, "b n"], causal: bool,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.valid, self.max_chunk_bytes = valid, max_chunk_bytes
        self.special = first_is_special(model, ids, valid)
        every = self.special is not None and bool(self.special.all())
        self.meter = None if every else SinkMeter(valid, causal)

    def add(self, block: AttentionBlock) -> None:
        """One self-attention block of the run (mixers without attention are skipped)."""
        if self.meter is not None:
            self.meter.add_block(block, self.max_chunk_bytes)

    def sinks(self) -> Bool[Tensor, "b n"]:
        """`[b, n]` True at each item's attention sinks."""
        return sink_positions(self.valid, self.special, None if self.meter is None else self.meter.measured())
