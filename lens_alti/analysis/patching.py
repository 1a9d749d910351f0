"""Activation patching of each attention head's output (clean run ← corrupted run).

The standard ground truth of circuit studies (Wang et al. 2022; Heimersheim & Nanda 2024):
run the model on the clean prompts, but replace one head's output — its `hook_z`, the
per-head attention result before the output projection, `[batch, pos, head, d_head]` — by
its value on a corrupted version of the same prompts (same positions, the information of
interest removed, e.g. the IOI "ABC" corruption of `lens_alti.analysis.ioi.abc_corruption`),
and measure how much the metric falls:

    effect[l, h] = mean over prompts of  metric(clean) − metric(clean with head (l, h) patched)

Positive: the head's clean output carries what the metric needs; negative: it works against
it (e.g. negative name movers). `normalised` divides by metric(clean) − metric(corrupted), the
whole gap (1 = patching this one head does all the damage that corrupting the prompt does).

That is the head's *total* effect, through every later layer. The same passes also give its
*direct* effect (docs/spec.md §11), the ground truth of a direct logit attribution such as
|ALTI-Logit head total|: the change of the head's write at the explained position alone, added to
the clean final residual stream and read through the final norm frozen at its clean scale,

    direct[l, h] = metric(clean) − metric(clean logits with row N := readout_clean(x_N + Δo))

so no later layer, and no change of the final norm's scale, takes part (path patching from the
head to the logits).

Heads are batched: one forward pass runs `chunk` copies of the prompt batch, each copy
patching a different head, so a layer of H heads costs ⌈H / chunk⌉ passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lens_alti.api.inputs import valid_mask
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, UnsupportedModelError
from lens_alti.reading import model_layout
from lens_alti.reading.hooks import attention_hook
from lens_alti.reading.logit import Readout, attention_writes, logit_layout, readout_hooks
from lens_alti.validation import check_index, check_size

Metric = Callable[[Tensor], Tensor]


@dataclass
class HeadPatchingTable:
    """Per-head activation-patching effects.

    `table` (pandas DataFrame), one row per (layer, head): `effect` (metric(clean) −
    metric(patched), mean over prompts: the total effect), `abs_effect` (mean over prompts of
    |that|), `normalised` (effect / (clean − corrupted), from the means), `direct_effect` and
    `abs_direct_effect` (the direct effect, docs/spec.md §11). `clean_metric`, `corrupted_metric`:
    means over prompts. `per_prompt` / `per_prompt_direct`: `[layer, head, batch]` effects.
    """

    table: Any
    clean_metric: float
    corrupted_metric: float
    per_prompt: Float[Tensor, "layer head batch"]
    per_prompt_direct: Float[Tensor, "layer head batch"] | None = None

    def effects(self, column: str = "abs_effect") -> Float[Tensor, "layer head"]:
        """One column of the table as a `[layer, head]` tensor."""
        n_layers, n_heads = self.per_prompt.shape[:2]
        return torch.tensor(self.table[column].values, dtype=torch.float64).view(n_layers, n_heads)

    def top(self, k: int = 10, by: str = "abs_effect") -> Any:
        return self.table.sort_values(by, ascending=False).head(k)


def _check_pair(tokens: Tensor, corrupted: Tensor, mask: Tensor | None, corrupted_mask: Tensor | None) -> None:
    if tokens.ndim != 2:
        raise InvalidArgumentError("tokens", f"shape {tuple(tokens.shape)}", "[batch, pos] token ids")
    if tokens.shape != corrupted.shape:
        raise InvalidArgumentError(
            "corrupted_tokens", f"shape {tuple(corrupted.shape)}", f"the clean tokens' shape {tuple(tokens.shape)}: "
            "patching swaps activations position by position, so each corrupted prompt must tokenise to the "
            "same length as its clean prompt"
        )
    valid_mask(mask, tokens.shape[0], tokens.shape[1], tokens.device, "attention_mask")
    if corrupted_mask is not None:
        clean = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        if corrupted_mask.shape != tokens.shape or not torch.equal(corrupted_mask.bool().cpu(), clean.cpu()):
            raise InvalidArgumentError(
                "corrupted_mask", "a different padding", "the clean prompts' padding: each corrupted prompt must "
                "have exactly as many tokens as its clean prompt (use names / words that are single tokens)"
            )


def _z_hooks(model: Any) -> list[str]:
    """Every layer's `hook_z`, after checking the model has `blocks`, `run_with_hooks` and attention in every layer."""
    if not hasattr(model, "blocks") or not hasattr(model, "run_with_hooks"):
        raise ArgumentTypeError(
            "model", model, "a TransformerLens decoder-only or encoder model (with `blocks` and `run_with_hooks`)"
        )
    names = [attention_hook(layer, "z") for layer in range(len(model.blocks))]
    absent = [n for n in names if n not in getattr(model, "hook_dict", {})]
    if absent:  # linear-recurrent mixer layers (Mamba-2, gated DeltaNet) have heads but no hook_z
        raise UnsupportedModelError(
            f"head_patching patches attention heads' hook_z, but {', '.join(absent[:3])}"
            f"{' ...' if len(absent) > 3 else ''} do not exist: those layers are not attention (linear-recurrent "
            "mixers). Head patching covers models whose every layer is attention"
        )
    return names


@torch.no_grad()
def head_patching(
    model: Any,
    tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    corrupted_mask: Tensor | None = None,
    chunk: int | None = None,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    position: int = -1,
) -> HeadPatchingTable:
    """Patch every head's `hook_z` from the corrupted run into the clean run, one head at a time.

    `tokens`, `corrupted_tokens`: `[batch, pos]`, aligned position by position (same padding;
    `corrupted_mask` is checked against `attention_mask` when given). `metric`: logits
    `[batch, pos, vocab]` → `[batch]` (e.g. `ablation.logit_diff(io_ids, s_ids)`, scored on
    the clean answers). `chunk`: heads patched per forward pass (default: all heads of a
    layer; lower it to bound memory — a pass holds `chunk · batch` sequences). `layers`: patch
    only these layers (default all; the others' effects are NaN), e.g. to split a long run.
    `position`: the explained position of the direct effects (a column of `tokens`: with left
    padding, -1 is every prompt's last token); encoders get total effects only (direct ones NaN).
    Works with TransformerBridge and HookedTransformer models (hooks `blocks.{l}.attn.hook_z`).
    """
    import pandas as pd

    names = _z_hooks(model)
    n_layers = len(names)
    tokens, corrupted_tokens = torch.as_tensor(tokens), torch.as_tensor(corrupted_tokens)
    _check_pair(tokens, corrupted_tokens, attention_mask, corrupted_mask)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    col = check_index("position", position, tokens.shape[1], what="positions of tokens")
    layout = model_layout(model)
    decoder = layout.family == "decoder"  # direct effects read the logits at a position: decoders only
    writes = attention_writes(model, layout) if decoder else [""] * n_layers
    wanted = readout_hooks(model, layout) if decoder else set()
    clean_logits, clean_cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted, **kwargs)
    direct = DirectReadout(logit_layout(model, layout).readout(clean_cache), col, clean_logits, metric) if (
        decoder
    ) else None
    corrupted_logits, corrupted_cache = model.run_with_cache(
        corrupted_tokens, names_filter=lambda name: name in names, **kwargs
    )
    clean, corrupted = metric(clean_logits).float(), metric(corrupted_logits).float()
    b = tokens.shape[0]
    n_heads = corrupted_cache[names[0]].shape[2]
    chunk = n_heads if chunk is None else check_size("chunk", chunk, minimum=1)
    todo = list(range(n_layers)) if layers is None else [
        check_index(f"layers[{i}]", x, n_layers, what="layers") for i, x in enumerate(layers)
    ]
    per_prompt = torch.full((n_layers, n_heads, b), float("nan"), dtype=torch.float64)
    per_direct = per_prompt.clone()
    loop: Any = todo
    if progress:
        from tqdm.auto import tqdm

        loop = tqdm(todo, desc="head patching", unit="layer")
    run = _PatchRun(model, tokens, attention_mask, metric, clean, direct, clean_cache, col)
    for layer in loop:
        for start in range(0, n_heads, chunk):
            heads = list(range(start, min(start + chunk, n_heads)))
            total, direct_effects = run.patch(names[layer], writes[layer], corrupted_cache[names[layer]], heads)
            per_prompt[layer, heads], per_direct[layer, heads] = total, direct_effects
    gap = float((clean - corrupted).mean())
    rows = []
    for layer in range(n_layers):
        for h in range(n_heads):
            e = per_prompt[layer, h]
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "effect": float(e.mean()),
                    "abs_effect": float(e.abs().mean()),
                    "normalised": float(e.mean()) / gap if gap != 0 else float("nan"),
                    "direct_effect": float(per_direct[layer, h].mean()),
                    "abs_direct_effect": float(per_direct[layer, h].abs().mean()),
                }
            )
    return HeadPatchingTable(
        pd.DataFrame(rows), float(clean.mean()), float(corrupted.mean()), per_prompt, per_direct
    )


@dataclass
class _PatchRun:
    """What every patched pass of `head_patching` shares: the clean run and how to score a pass."""

    model: Any
    tokens: Tensor
    attention_mask: Tensor | None
    metric: Metric
    clean: Tensor
    direct: DirectReadout | None
    clean_cache: Any
    col: int

    def patch(self, z_name: str, write_name: str, z_corrupt: Tensor, heads: list[int]) -> tuple[Tensor, Tensor]:
        """One pass patching `heads` of one layer (one copy of the batch each): (total effects, direct
        effects), each `[len(heads), batch]`."""
        b, n = self.tokens.shape[0], len(heads)

        def patch(z: Tensor, hook: Any) -> Tensor:
            z = z.clone().view(n, b, *z.shape[1:])
            for i, h in enumerate(heads):
                z[i, :, :, h] = z_corrupt[:, :, h].to(z.dtype)
            return z.view(n * b, *z.shape[2:])

        grabbed: dict[str, Tensor] = {}

        def grab(x: Tensor, hook: Any) -> None:
            grabbed["write"] = x[:, self.col].detach()

        mask = self.attention_mask
        rep = {"attention_mask": mask.repeat(n, 1)} if mask is not None else {}
        hooks = [(z_name, patch)] + ([(write_name, grab)] if self.direct is not None else [])
        logits = self.model.run_with_hooks(self.tokens.repeat(n, 1), fwd_hooks=hooks, **rep)
        total = torch.stack([(self.clean - self.metric(logits[i * b : (i + 1) * b]).float()).double().cpu()
                             for i in range(n)])
        if self.direct is None:
            return total, torch.full_like(total, float("nan"))
        clean_write = self.clean_cache[write_name][:, self.col]
        direct = torch.stack([self.direct.effect(grabbed["write"][i * b : (i + 1) * b] - clean_write)
                              for i in range(n)])
        return total, direct


class DirectReadout:
    """The clean logits with row `col` re-read after a change `Δ[b, d]` of the final residual stream there,
    through the final norm frozen at its clean scale (docs/spec.md §11), and the metric's drop."""

    def __init__(self, readout: Readout, col: int, clean_logits: Tensor, metric: Metric) -> None:
        self.readout, self.col, self.metric = readout, col, metric
        self.work = clean_logits.clone()
        self.clean_row = clean_logits[:, col].clone()
        self.clean_metric = metric(clean_logits).double().cpu()
        self.pre = readout.real_logits[:, col].double()  # before any soft-capping
        x = readout.final_residual[:, col].double()
        norm = readout.norm
        if norm.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        self.scale = None if norm.kind == "none" else (x.square().mean(-1, keepdim=True) + norm.eps).sqrt()

    def effect(self, delta: Float[Tensor, "b d"]) -> Tensor:
        """metric(clean) − metric(the clean logits with row `col` read from x_N + Δ), `[b]` on the CPU."""
        norm, d = self.readout.norm, delta.double()
        if self.scale is not None:
            d = (d - d.mean(-1, keepdim=True)) if norm.kind == "layernorm" else d
            d = d / self.scale
            d = d if norm.gain is None else d * norm.gain.to(device=d.device, dtype=d.dtype)
        row = self.pre + d @ self.readout.W_U.to(device=d.device, dtype=d.dtype)
        cap = self.readout.softcap
        row = row if cap is None else cap * torch.tanh(row / cap)
        self.work[:, self.col] = row.to(self.work.dtype)
        value = self.metric(self.work).double().cpu()
        self.work[:, self.col] = self.clean_row
        return self.clean_metric - value
