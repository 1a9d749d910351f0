"""Each layer of a forward pass run again, alone, from its recorded input (docs/spec.md §12).

`LayerReplay.record(...)` runs the model once and records what every block is called with — its
input hidden states `[b, n, d]` (the residual stream entering the layer) and the other arguments
the model passes it (rotary embeddings, the attention mask, position ids), shared between layers
by reference — and stops the pass before the last block runs (no final norm, no logits). What
stays alive is `L·b·n·d` numbers.

`layer(l)` runs block `l` again on its recorded arguments with forward hooks that keep that
layer's activations (`hooks_of(l)`: what its readers read) and returns them as a store, a mapping
from hook names to tensors that the readers build records from as they would from a cache. With
`efficient=True` the model runs with recomputed attention (`reading/efficient.py`): the store
then holds the layer's `RecomputedPattern` instead of a dense pattern. The last layer run is
kept, so asking for it again costs nothing.

Every layer run again is checked against the forward pass: its output must be the next layer's
recorded input (`UnsupportedModelError` otherwise), so a block whose result depends on anything
but its arguments is refused, never silently explained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.efficient import recomputed_attention, recording
from lens_alti.reading.hooks import attention_hook
from lens_alti.reading.types import ModelLayout

# A layer run again must reproduce the next layer's recorded input this well (relative); it is
# the same computation on the same arguments, so this only absorbs nondeterministic kernels.
_REPLAY_RTOL = 1e-5


class _Recorded(Exception):
    """Raised before the last block runs: every block's arguments are recorded."""


def replayable(model: Any, layout: ModelLayout) -> str | None:
    """Why `model`'s layers cannot be run again one by one to read them, or None when they can."""
    readers = layout.blocks.get("self", [])
    blocks = getattr(model, "blocks", None)
    if layout.family not in ("decoder", "encoder") or blocks is None or len(readers) != len(blocks):
        return f"{layout.architecture}: not a stack of one self-attention block per layer"
    if not all(r.rows for r in readers):
        return f"{layout.architecture}: a layer is not an attention block that can be read on its own"
    return None


class LayerReplay:
    """The recorded inputs of every block of one forward pass, and each block run again on demand."""

    def __init__(
        self, model: Any, layout: ModelLayout, *, efficient: bool, extra_hooks: dict[int, tuple[str, ...]]
    ) -> None:
        self.model, self.layout, self.efficient = model, layout, efficient
        self.extra_hooks = extra_hooks
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._last: tuple[int, dict[str, Any]] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layout.blocks["self"])

    def _attention(self) -> contextlib.AbstractContextManager[None]:
        return recomputed_attention(self.model) if self.efficient else contextlib.nullcontext()

    @torch.no_grad()
    def record(self, forward: dict[str, Any]) -> None:
        """Run the model on `forward` (keyword arguments of its forward pass) and record every block's call."""
        blocks = self.model.blocks
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs)))
            if len(calls) == len(blocks):
                raise _Recorded

        if hasattr(self.model, "original_model"):  # a bridge: no key/value cache (it would grow on every replay)
            forward = {**forward, "use_cache": False}
        handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
        try:
            with self._attention():
                self.model(return_type=None, **forward)
        except _Recorded:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(blocks):
            raise UnsupportedModelError(
                f"{self.layout.architecture}: {len(calls)} of its {len(blocks)} blocks were called once each in the "
                "forward pass; lens_alti runs layers again only when each block is called exactly once"
            )
        self.calls = calls

    def hooks_of(self, layer: int) -> tuple[str, ...]:
        """The hooks kept when layer `layer` runs again: its reader's, plus `extra_hooks[layer]`."""
        names = [*self.layout.blocks["self"][layer].hooks, *self.extra_hooks.get(layer, ())]
        if self.efficient:  # the pattern and values come from the recomputed attention
            names = [h for h in names if h not in (attention_hook(layer, "pattern"), attention_hook(layer, "v"))]
        return tuple(dict.fromkeys(names))

    @torch.no_grad()
    def layer(self, layer: int) -> dict[str, Any]:
        """Block `layer` run again: a store of its activations (and recomputed attention), checked against the pass."""
        if self._last is not None and self._last[0] == layer:
            return self._last[1]
        self._last = None  # the previous layer's activations are dropped before this one runs
        store: dict[str, Any] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(activation: Any, hook: Any = None) -> None:
                t = activation[0] if isinstance(activation, tuple) else activation
                store.setdefault(name, t.detach())  # a hook that fires twice keeps its first value

            return hook

        args, kwargs = self.calls[layer]
        fwd_hooks = [(name, keep(name)) for name in self.hooks_of(layer)]
        with self._attention(), self._recording(layer, store), self.model.hooks(fwd_hooks=fwd_hooks):
            out = self.model.blocks[layer](*args, **kwargs)
        self._check(layer, out)
        self._last = (layer, store)
        return store

    def _recording(self, layer: int, store: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        return recording(self.model, layer, store) if self.efficient else contextlib.nullcontext()

    def _check(self, layer: int, out: Any) -> None:
        """The block's output must be the next block's recorded input (the last block has no successor)."""
        if layer + 1 >= len(self.calls):
            return
        got = out[0] if isinstance(out, tuple) else out
        want = self.calls[layer + 1][0][0] if self.calls[layer + 1][0] else None
        if not isinstance(got, Tensor) or not isinstance(want, Tensor):
            return
        if torch.equal(got, want):
            return
        err = float((got - want).abs().max())
        scale = float(want.abs().max())
        if got.shape != want.shape or not err <= _REPLAY_RTOL * max(scale, 1e-30):
            raise UnsupportedModelError(
                f"{self.layout.architecture}: block {layer} run again on its recorded input gives another output "
                f"(max|Δ| = {err:.3g} of max|x| = {scale:.3g}); its result depends on more than its arguments, so "
                "it cannot be read one layer at a time. Run with a cache: model.run_with_cache(tokens)"
            )
