"""The shared types of reading: what a model looks like to lens_alti (imports nothing of reading/ but records).

Each layout lists every hook it needs up front (so missing ones are reported together); a
`BlockReader` turns one block's activations into a neutral record; `CacheView` lets a reader
substitute recomputed activations for cached ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lens_alti.reading.records import AttentionBlock

Family = Literal["decoder", "encoder", "encoder_decoder"]



@dataclass(frozen=True)
class BlockReader:
    """One attention block to read: its hook names and how to build its record.

    `channels_per_head`: how many record channels each cached head is expected to become
    (d_head for a per-channel output gate, see `gated_output`), for the up-front memory estimate.
    `rows`: an attention block whose hooks all lie in its own layer, so the layer can be run
    again alone to read it, and whose record can be read a few receivers at a time (the
    top-down paths, docs/spec.md §12). `plain_attention`: besides, its attention is plain
    (no output gate, norm on the heads or values, sinks or latent values), so its rows can be
    recomputed from queries and keys (`reading/efficient.py`, docs/spec.md §9).
    """

    name: str
    hooks: tuple[str, ...]
    build: Callable[[Any], AttentionBlock]
    channels_per_head: int = 1
    # The record's pattern shape [batch, head, query, key] when hooks[0] does not have it (LED's band).
    shape: Callable[[Any], tuple[int, ...]] | None = None
    rows: bool = False
    plain_attention: bool = False

    def pattern_shape(self, cache: Any) -> tuple[int, ...]:
        """The shape of the record's pattern, `[batch, head, query, key]` for attention, read from the cache."""
        return tuple(self.shape(cache)) if self.shape is not None else tuple(cache[self.hooks[0]].shape)


class CacheView:
    """A read-only view of a cache that replaces some of its hooks (subclasses override `__getitem__`)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def keys(self) -> Any:
        return self._cache.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._cache.keys()

    def __getitem__(self, key: str) -> Tensor:
        return self._cache[key]


@dataclass(frozen=True)
class ModelLayout:
    """What a model looks like to lens_alti: family, blocks to read, weight processing."""

    family: Family
    architecture: str
    weight_processing: str
    blocks: dict[str, list[BlockReader]]

    def hook_names(self) -> list[str]:
        return [h for readers in self.blocks.values() for r in readers for h in r.hooks]
