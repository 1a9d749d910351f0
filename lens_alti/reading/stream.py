"""Reading blocks straight from a running forward pass (no ActivationCache).

`stream_blocks` registers one forward hook per activation a layout reads. Each hook keeps
its activation (detached, on the device it was produced on) until every block that reads
it has been built; a block is built and handed to `on_block` as soon as its last
activation exists, during the forward pass, and the activations no other block needs are
dropped at once. So only about one layer's activations are alive at any time.

`forward_inputs` turns the user's tokens and masks into the arguments of the model's own
forward (the TransformerBridge and TransformerLens 3.x Hooked* models spell masks
differently), and `tokenize` turns strings into left-padded ids and a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lens_alti.errors import InvalidArgumentError, MissingHooksError
from lens_alti.reading.hooked import hooked_class
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.types import ModelLayout

OnBlock = Callable[[str, int, AttentionBlock], None]

_NEVER_FIRED_ADVICE = (
    "These activations never appeared during the forward pass. Patterns are only produced with "
    "eager attention: boot the model with TransformerBridge.boot_transformers(...) (which forces it) "
    "or load the Hugging Face model with attn_implementation='eager'."
)


def forward_inputs(
    model: Any,
    layout: ModelLayout,
    tokens: Tensor,
    attention_mask: Tensor | None,
    decoder_tokens: Tensor | None,
    decoder_attention_mask: Tensor | None,
) -> dict[str, Any]:
    """Keyword arguments of `model.run_with_hooks` that run `tokens` (and the target prefix)."""
    kind = hooked_class(model)
    kwargs: dict[str, Any] = {"input": tokens}
    if layout.family == "encoder_decoder":
        if decoder_tokens is None:
            raise InvalidArgumentError(
                "decoder_tokens", None, "the target prefix to explain, starting with the decoder start token: "
                "an encoder-decoder model needs it (attribute(model, tokens=src_ids, decoder_tokens=tgt_ids))"
            )
        kwargs["decoder_input"] = decoder_tokens
    if kind in ("HookedEncoder", "HookedEncoderDecoder"):
        if attention_mask is not None:
            kwargs["one_zero_attention_mask"] = attention_mask
        if decoder_attention_mask is not None and not bool(decoder_attention_mask.bool().all()):
            raise InvalidArgumentError(
                "decoder_attention_mask", "a mask with padding", "None or all ones: TransformerLens 3.x "
                "HookedEncoderDecoder takes no decoder mask (run padded targets one by one, or use a TransformerBridge)"
            )
        return kwargs
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if decoder_attention_mask is not None:
        kwargs["decoder_attention_mask"] = decoder_attention_mask
    if _banded_encoder(model):  # LED returns (and the bridge hooks) its patterns only when asked (as run_with_cache)
        kwargs["output_attentions"] = True
    return kwargs


def _banded_encoder(model: Any) -> bool:
    from lens_alti.reading.banded import band_width
    from lens_alti.reading.layer_kinds import original

    blocks = getattr(model, "encoder_blocks", None)
    if not blocks:
        return False
    return band_width(original(getattr(blocks[0], "attn", None))) is not None


class _AllBlocksRead(Exception):
    """Raised from the last hook: the rest of the forward (final norm, logits) is not needed."""


def stream_blocks(model: Any, layout: ModelLayout, inputs: dict[str, Any], on_block: OnBlock) -> None:
    """Run the forward pass once, handing every block of `layout` to `on_block(kind, layer, record)`.

    The forward pass is stopped as soon as the last block has been handed over, so the
    final norm and the logits (`[batch, pos, vocab]`, often the largest activation) are
    never computed. Raises MissingHooksError listing the activations that never appeared.
    """
    readers = [(kind, layer, r) for kind, rs in layout.blocks.items() for layer, r in enumerate(rs)]
    users: dict[str, list[int]] = {}  # hook name -> readers that read it
    for i, (_, _, r) in enumerate(readers):
        for h in dict.fromkeys(r.hooks):
            users.setdefault(h, []).append(i)
    missing = [set(r.hooks) for _, _, r in readers]
    remaining = {h: len(ids) for h, ids in users.items()}
    store: dict[str, Tensor] = {}
    left = [len(readers)]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(activation: Any, hook: Any = None) -> None:
            t = activation[0] if isinstance(activation, tuple) else activation
            store[name] = t.detach()
            for i in users[name]:
                if name not in missing[i]:
                    continue  # fired again: the block already used the first value
                missing[i].discard(name)
                if missing[i]:
                    continue
                kind, layer, reader = readers[i]
                on_block(kind, layer, reader.build(store))
                for h in dict.fromkeys(reader.hooks):
                    remaining[h] -= 1
                    if remaining[h] == 0:
                        store.pop(h, None)
                left[0] -= 1
            if left[0] == 0:
                raise _AllBlocksRead

        return hook

    fwd_hooks = [(name, make_hook(name)) for name in users]
    try:
        with torch.no_grad():
            model.run_with_hooks(fwd_hooks=fwd_hooks, return_type=None, **inputs)
    except _AllBlocksRead:
        pass
    never = sorted({h for m in missing for h in m})
    store.clear()
    if never:
        raise MissingHooksError(never, _NEVER_FIRED_ADVICE)
