"""Memory estimates checked before heavy work, so a call that cannot fit fails at once.

The estimates count the tensors a call allocates on top of what already exists (the cache,
the model): results kept for every layer, and the largest working set of one layer. They
are upper-bound-ish sums of the shapes in `attribute`/`decompose`/`block_contributions`,
not measurements; `check_fits` compares them with the memory available now:

- CUDA devices: `torch.cuda.mem_get_info` (free memory on that device);
- CPU: `psutil.virtual_memory().available` if psutil is installed, else `MemAvailable`
  from `/proc/meminfo`; when neither is readable the check is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_alti.errors import InsufficientMemoryError

# Use at most this share of what is available: the allocator, Python and fragmentation need the rest.
USABLE_FRACTION = 0.9
# Estimates below this are never refused: small calls are not "heavy work", and a busy machine
# whose free memory dips briefly must not fail them.
MIN_CHECKED_BYTES = 256 * 2**20
# Sources per kernel call in alti.contributions (a chunk never spans more keys than this).
_KEYS_PER_CALL = 512

ATTRIBUTE_ADVICE = (
    "To fit: explain fewer positions (`positions=`, or a shorter text / smaller batch), stream the "
    "layers with `attribute(model, tokens=...)` instead of a full cache, leave `heads=False` (per-head "
    "results are n_heads times larger), or lower `max_chunk_bytes`."
)


@dataclass(frozen=True)
class BlockShape:
    """Shape of one kind of attention block: `layers` blocks of `batch` x `heads` x `queries` x `keys`."""

    layers: int
    batch: int
    heads: int
    queries: int
    keys: int
    d_model: int


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory available for new tensors on `device` now, or None when it cannot be read."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - depends on the machine
            return None
    if dev.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def block_results_bytes(s: BlockShape, *, heads: bool, element_size: int = 4) -> int:
    """Results `attribute` keeps for every layer of one block kind (layers, rollout, per-head parts)."""
    per_layer = s.batch * s.queries * (s.keys + 1) * 2  # layers + rollout (rollout of square blocks)
    if heads:
        per_layer += s.batch * s.heads * s.queries * (s.keys + 1) + 3 * s.batch * s.queries
    return per_layer * s.layers * element_size


def block_working_bytes(s: BlockShape, *, heads: bool, max_chunk_bytes: int, element_size: int = 4) -> int:
    """Largest working set of one block: masked pattern copy, value vectors, per-receiver vectors, and
    one chunk of the contribution kernels (at most `max_chunk_bytes`, less when the block is small)."""
    pattern = s.batch * s.heads * s.queries * s.keys
    values = s.batch * s.heads * s.keys * s.d_model
    receivers = 8 * s.batch * s.queries * s.d_model
    out = s.batch * s.queries * (s.keys + 1) * (s.heads + 1 if heads else 1)
    chunk = s.queries * min(s.keys, _KEYS_PER_CALL) * (s.heads + 2) * s.d_model * element_size
    return (2 * pattern + values + receivers + out) * element_size + min(max_chunk_bytes, chunk)


def attribute_bytes(
    blocks: list[BlockShape], *, heads: bool, max_chunk_bytes: int, element_size: int = 4, extra_results: int = 0
) -> int:
    """Estimated peak extra memory of `attribute` over blocks of every kind (plus `extra_results` bytes)."""
    results = sum(block_results_bytes(s, heads=heads, element_size=element_size) for s in blocks)
    working = max(
        (
            block_working_bytes(s, heads=heads, max_chunk_bytes=max_chunk_bytes, element_size=element_size)
            for s in blocks
        ),
        default=0,
    )
    return results + working + extra_results


def forward_cache_bytes(
    batch: int, pos: int, *, n_layers: int, n_heads: int, d_model: int, d_mlp: int, d_vocab: int, element_size: int = 4
) -> int:
    """Estimated size of `run_with_cache` on `[batch, pos]` tokens: every hook of every layer, plus the logits.

    Per layer: attention scores and pattern (2·heads·pos²), about twelve d_model-sized and two
    d_mlp-sized activations per position.
    """
    per_layer = 2 * n_heads * pos * pos + pos * (12 * d_model + 2 * d_mlp)
    return batch * (n_layers * per_layer + pos * d_vocab) * element_size


def check_fits(need: int, device: torch.device | str | None, what: str, advice: str) -> None:
    """Raise InsufficientMemoryError when `need` bytes exceed the usable share of what `device` has free."""
    if need < MIN_CHECKED_BYTES:
        return
    free = available_bytes(device)
    if free is None or need <= USABLE_FRACTION * free:
        return
    dev = torch.device(device) if device is not None else torch.device("cpu")
    raise InsufficientMemoryError(
        f"{what} needs about {gib(need)} more memory, but only {gib(free)} is available on {dev}. {advice}"
    )


def attribute_memory_check(
    blocks: list[BlockShape],
    *,
    heads: bool,
    max_chunk_bytes: int,
    device: torch.device | str | None,
    element_size: int = 4,
) -> int:
    """Estimate `attribute`'s extra memory for these blocks, raise if it cannot fit; return the estimate."""
    need = attribute_bytes(blocks, heads=heads, max_chunk_bytes=max_chunk_bytes, element_size=element_size)
    check_fits(need, device, "attribute", ATTRIBUTE_ADVICE)
    return need


# ------------------------------------------------------------------ entry points that run the model

RUN_ADVICE = (
    "To fit: explain a shorter text or fewer texts at once, explain a few positions (`positions=`) instead of "
    "all of them, leave `heads=False`, or lower `max_chunk_bytes`."
)
EAGER_ADVICE = (
    "The model runs with eager attention here, which forms [head, n, n] scores in every layer{why}; models whose "
    "attention lens_alti recomputes (attention='recomputed', docs/spec.md §9) never do."
)


@dataclass(frozen=True)
class ModelShape:
    """What a forward pass of `batch` inputs of `pos` tokens holds, from the model's config."""

    layers: int
    batch: int
    pos: int
    heads: int
    d_model: int
    d_mlp: int
    element_size: int = 4


def eager_attention_bytes(s: ModelShape) -> int:
    """One layer's eager attention: scores and probabilities `[b, h, n, n]`, and the additive mask `[b, 1, n, n]`."""
    return (2 * s.heads + 1) * s.batch * s.pos * s.pos * s.element_size


def layer_forward_bytes(s: ModelShape) -> int:
    """One block's activations while it runs: about ten `d_model`-sized and three `d_mlp`-sized per position."""
    return s.batch * s.pos * (10 * s.d_model + 3 * s.d_mlp) * s.element_size


def replay_bytes(s: ModelShape, *, eager: bool, max_chunk_bytes: int, dtype_size: int = 4, results: int = 0) -> int:
    """Peak extra memory of explaining a few positions layer by layer from the top (docs/spec.md §12).

    The inputs of every layer (`L·b·n·d`), one layer run again (its activations, its eager
    attention or the keys and values the recomputed attention expands), the layer's value vectors
    `VO[b, h, n, d]` (twice: the explained rows and the rollout), one chunk of receivers
    (`max_chunk_bytes`) and the results.
    """
    inputs = s.layers * s.batch * s.pos * s.d_model * s.element_size
    attention = eager_attention_bytes(s) if eager else 2 * s.batch * s.pos * s.d_model * s.element_size + 2**26
    vo = 2 * s.batch * s.heads * s.pos * s.d_model * dtype_size
    return inputs + layer_forward_bytes(s) + attention + vo + max_chunk_bytes + results


def stream_bytes(
    s: ModelShape, blocks: list[BlockShape], *, heads: bool, max_chunk_bytes: int, element_size: int = 4
) -> int:
    """Peak extra memory of `attribute(model, tokens=...)` over all positions: the results, one layer's
    eager forward pass and working set, and the running rollout `[b, n, n]`."""
    rollout = 2 * s.batch * s.pos * s.pos * element_size
    need = attribute_bytes(blocks, heads=heads, max_chunk_bytes=max_chunk_bytes, element_size=element_size)
    return need + layer_forward_bytes(s) + eager_attention_bytes(s) + rollout
