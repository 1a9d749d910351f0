"""Per-layer results of one stack of blocks, filled one block at a time.

`LayerCollector` receives each layer's transformed vectors as soon as they exist (from a
cache, or from a forward pass that is still running), measures the block, writes its rows
into tensors allocated once for all layers on one output device, and advances the
rollout. Nothing else of the block is kept, so the peak memory is the results plus one
block's working set.

With `positions[b, r]` (receivers of interest) the per-head kernels run for those rows
only, and the returned `layers`/`rollout` hold those rows. The token-level rows an exact
rollout needs (`lens_alti.alti.receivers`: rows `0..max(positions)` in causal blocks, all
rows otherwise) are computed, used for the running rollout `[b, rows, rows]`, and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_alti.alti.contributions import block_contributions, head_output_contributions
from lens_alti.alti.decompose import TransformedVectors
from lens_alti.alti.receivers import rollout_rows, select_receivers
from lens_alti.errors import LensAltiError, UnsupportedModelError


@dataclass
class StackResults:
    """Outputs of one stack, layers along dim 1 (`r` = receiver rows: all, or the positions)."""

    layers: Float[Tensor, "b l r s"]
    errors: Float[Tensor, " l"]
    rollout: Float[Tensor, "b l r k"] | None = None
    heads: Float[Tensor, "b l h r k"] | None = None
    heads_residual: Float[Tensor, "b l r"] | None = None
    head_outputs: Float[Tensor, "b l h r"] | None = None
    head_outputs_residual: Float[Tensor, "b l r"] | None = None


def _rows(t: Tensor, positions: Tensor) -> Tensor:
    """`t[b, positions[b, r], ...]` for a batch-first tensor."""
    index = positions.view(*positions.shape, *([1] * (t.dim() - 2))).expand(*positions.shape, *t.shape[2:])
    return t.gather(1, index)


class LayerCollector:
    """Collects one stack (encoder, decoder self, cross, ...) of `n_layers` blocks.

    Args:
        valid_q: `[b, q]` real receivers (False = padding).
        valid_k: `[b, k]` real sources (False = padding).
        positions: `[b, r]` receivers of interest, or None for all.
        restrict_layers: with positions, return only those rows of `layers` and `rollout`
            (self-attention stacks); otherwise all token-level rows are kept (ALTI+ stacks).
        rollout: accumulate `R^l = C^l @ R^(l-1)` (square self-attention stacks).
        device: where the results are gathered (blocks are computed where they live).
    """

    def __init__(
        self,
        n_layers: int,
        valid_q: Tensor,
        valid_k: Tensor,
        *,
        measure: str,
        heads: bool,
        max_chunk_bytes: int,
        backend: str,
        positions: Int[Tensor, "b r"] | None = None,
        restrict_layers: bool = False,
        rollout: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.n_layers = n_layers
        self.device = torch.device(device) if device is not None else valid_q.device
        self.valid_q = valid_q.to(self.device)
        self.valid_k = valid_k.to(self.device)
        self.positions = None if positions is None else positions.to(self.device, torch.long)
        self.restrict = restrict_layers and positions is not None
        self.measure, self.heads = measure, heads
        self.kernel_opts: dict[str, Any] = {"max_chunk_bytes": max_chunk_bytes, "backend": backend}
        self.do_rollout = rollout
        self.out: StackResults | None = None
        self.errors = [float("nan")] * n_layers
        self.seen: set[int] = set()
        self.rows: int | None = None  # token-level rows kept per layer (restricted mode)
        self.acc: Tensor | None = None
        self._on_device: dict[torch.device, tuple[Tensor, Tensor, Tensor | None]] = {}

    def _masks(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """(valid_q, valid_k, positions) on the device a block lives on."""
        if device not in self._on_device:
            pos = None if self.positions is None else self.positions.to(device)
            self._on_device[device] = (self.valid_q.to(device), self.valid_k.to(device), pos)
        return self._on_device[device]

    def _alloc(self, b: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.zeros(b, self.n_layers, *shape, dtype=dtype, device=self.device)

    @torch.no_grad()
    def add(self, layer: int, tv: TransformedVectors, error: float = float("nan")) -> None:
        """Measure block `layer` (its transformed vectors `tv`) and store its rows."""
        if layer in self.seen:
            raise LensAltiError(f"{tv.name}: layer {layer} was given twice")
        self.seen.add(layer)
        self.errors[layer] = error
        valid_q, valid_k, positions = self._masks(tv.weights.device)
        b, _, q, k = tv.weights.shape
        q_mask = valid_q.to(tv.weights.dtype)
        key_mask = None if bool(valid_k.all()) else valid_k

        # Token-level rows: all, or those an exact rollout of the positions needs.
        need = q
        if self.restrict and positions is not None:  # restrict implies positions
            need = rollout_rows(positions, q, tv.causal) if self.do_rollout else int(positions.max()) + 1
            if self.rows is None:
                self.rows = need
            elif need > self.rows:
                raise LensAltiError(
                    f"{tv.name}: this block is not causal while the layers below were; the rollout of "
                    "the positions would need rows that were not computed. Run without positions=."
                )
            need = self.rows
        tok_tv = tv if need == q else select_receivers(tv, torch.arange(need, device=tv.weights.device).expand(b, need))
        with_heads = self.heads and positions is None
        c = block_contributions(tok_tv, self.measure, heads=with_heads, key_mask=key_mask, **self.kernel_opts)
        tokens = (c.tokens * q_mask[:, :need, None]).to(self.device)

        head_rows: tuple[Tensor, ...] | None = None
        if self.heads:
            if positions is None:
                h_tv, hc, h_mask = tv, c, q_mask
            else:
                h_tv = select_receivers(tv, positions)
                hc = block_contributions(h_tv, "l1", heads=True, key_mask=key_mask, **self.kernel_opts)
                h_mask = q_mask.gather(1, positions)
            outputs, outputs_residual = head_output_contributions(h_tv)
            assert hc.heads is not None and hc.heads_residual is not None  # internal: computed with heads=True
            head_rows = (
                hc.heads * h_mask[:, None, :, None],
                hc.heads_residual * h_mask,
                outputs * h_mask[:, None],
                outputs_residual * h_mask,
            )
        del c, tok_tv
        self._store(layer, tokens, head_rows)

    def _store(self, layer: int, tokens: Tensor, head_rows: tuple[Tensor, ...] | None) -> None:
        b = tokens.shape[0]
        pos = self.positions
        kept = _rows(tokens, pos) if self.restrict and pos is not None else tokens
        if self.out is None:
            self.out = StackResults(layers=self._alloc(b, kept.shape[1:], kept.dtype), errors=torch.empty(0))
            if self.do_rollout:
                self.out.rollout = self._alloc(b, (kept.shape[1], tokens.shape[-1]), kept.dtype)
            if head_rows is not None:
                h, r, k = head_rows[0].shape[1:]
                self.out.heads = self._alloc(b, (h, r, k), kept.dtype)
                self.out.heads_residual = self._alloc(b, (r,), kept.dtype)
                self.out.head_outputs = self._alloc(b, (h, r), kept.dtype)
                self.out.head_outputs_residual = self._alloc(b, (r,), kept.dtype)
        out = self.out
        out.layers[:, layer] = kept
        if head_rows is not None and out.heads is not None and head_rows[0].shape[1] != out.heads.shape[2]:
            raise UnsupportedModelError(
                f"layer {layer}: per-head results need one head count for every layer, but this layer has "
                f"{head_rows[0].shape[1]} heads and the first has {out.heads.shape[2]} (per-layer head counts, "
                "e.g. Laguna); use heads=False"
            )
        if head_rows is not None:
            for name, value in zip(
                ("heads", "heads_residual", "head_outputs", "head_outputs_residual"), head_rows, strict=True
            ):
                getattr(out, name)[:, layer] = value.to(self.device)
        if self.do_rollout:
            if len(self.seen) != layer + 1:
                raise LensAltiError(f"the rollout needs the layers in order; got layer {layer} "
                                    f"after {sorted(self.seen)[:-1]}")
            rows = tokens.shape[1]
            square = tokens[..., :rows]  # causal rows < `rows` read no source ≥ `rows`
            self.acc = square if self.acc is None else square @ self.acc
            assert out.rollout is not None  # internal: allocated in the first _store when do_rollout
            out.rollout[:, layer, :, :rows] = _rows(self.acc, pos) if self.restrict and pos is not None else self.acc

    def finish(self) -> StackResults:
        """The stacked results; raises if a layer never arrived."""
        missing = sorted(set(range(self.n_layers)) - self.seen)
        if missing or self.out is None:
            raise LensAltiError(f"no results for layers {missing}: their activations never arrived")
        self.out.errors = torch.tensor(self.errors, dtype=torch.float64)
        self.acc = None
        return self.out
