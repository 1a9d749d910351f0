"""The hook names code outside `reading/` needs, spelled here (and in the readers) only.

TransformerLens names a hook by where it sits: `{stack}.{layer}.{attention}.hook_{point}` inside
an attention module, `{stack}.{layer}.hook_{point}` on a block's residual stream, `{module}.hook_in`
/ `.hook_out` around a TransformerBridge component. The names built here are the same on the
TransformerLens 4.x TransformerBridge and the 3.x HookedTransformer / HookedEncoder for
decoder-only and encoder (BERT) models (stack `blocks`, attention `attn`). The bridge's
encoder-decoders have the stacks `encoder_blocks` (attention `attn`) and `decoder_blocks`
(attention `self_attn` and `cross_attn`), and the decoder's own embedding and final norm
(`decoder_embed`, `decoder_ln_final`); TransformerLens 3.x's HookedEncoderDecoder names its
stacks differently (`encoder`, `decoder`), which only the readers (`hooked.py`) handle.

Shapes of the hooks named here (TransformerBridge): `pattern` `[batch, head, query, key]`,
`z` `[batch, pos, head, d_head]`, block points `[batch, pos, d_model]`, `embed.hook_in` the token
ids `[batch, pos]`, `unembed.hook_out` the logits `[batch, pos, d_vocab]`.
"""

from __future__ import annotations

from typing import Literal

Stack = Literal["blocks", "encoder_blocks", "decoder_blocks"]
Attention = Literal["attn", "self_attn", "cross_attn"]
AttentionPoint = Literal["q", "k", "v", "z", "pattern", "attn_scores", "result"]
BlockPoint = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]


def attention_hook(layer: int, point: AttentionPoint, *, stack: Stack = "blocks", attention: Attention = "attn") -> str:
    """`{stack}.{layer}.{attention}.hook_{point}`: a hook inside layer `layer`'s attention.

    E.g. `attention_hook(3, "z")` is `blocks.3.attn.hook_z` (each head's output before W_O,
    `[batch, pos, head, d_head]`); `attention_hook(0, "pattern", stack="decoder_blocks",
    attention="cross_attn")` is the first decoder layer's cross-attention pattern.
    """
    return f"{stack}.{layer}.{attention}.hook_{point}"


def pattern_hook(layer: int, *, stack: Stack = "blocks", attention: Attention = "attn") -> str:
    """Layer `layer`'s attention pattern `[batch, head, query, key]`: `{stack}.{layer}.{attention}.hook_pattern`."""
    return attention_hook(layer, "pattern", stack=stack, attention=attention)


def block_hook(layer: int, point: BlockPoint, *, stack: Stack = "blocks") -> str:
    """`{stack}.{layer}.hook_{point}`: layer `layer`'s residual stream (`resid_pre`, `resid_mid`,
    `resid_post`) or a sublayer's write to it (`attn_out`, `mlp_out`), `[batch, pos, d_model]`."""
    return f"{stack}.{layer}.hook_{point}"


def embedding_hook(*, decoder: bool = False) -> str:
    """The token ids entering the embedding, `[batch, pos]`: `embed.hook_in`, or with `decoder=True`
    an encoder-decoder's decoder input `decoder_embed.hook_in` (TransformerBridge)."""
    return "decoder_embed.hook_in" if decoder else "embed.hook_in"


def final_norm_hook(*, decoder: bool = False) -> str:
    """The final norm's output `[batch, pos, d_model]`, what the unembedding reads: `ln_final.hook_out`,
    or with `decoder=True` an encoder-decoder decoder's `decoder_ln_final.hook_out` (TransformerBridge)."""
    return "decoder_ln_final.hook_out" if decoder else "ln_final.hook_out"


def unembed_hook(point: Literal["in", "out"] = "out") -> str:
    """The unembedding's input (`"in"`: `unembed.hook_in`, `[batch, pos, d_model]`) or output (`"out"`:
    `unembed.hook_out`, the logits `[batch, pos, d_vocab]`) (TransformerBridge)."""
    return f"unembed.hook_{point}"
