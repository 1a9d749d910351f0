"""TransformerBridge layouts (TransformerLens 4.x): which blocks each family has and how to read them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.banded import BandedEncoderCache, band_width, source_length
from lens_alti.reading.blocks import attention_record, sublayer_block
from lens_alti.reading.gated_output import gate_channels, gate_hook, has_output_gate
from lens_alti.reading.head_norm import head_norm_module
from lens_alti.reading.latent import value_layout
from lens_alti.reading.layer_kinds import NO_HOOKS, mixer_kind, original, parallel_mixer, require_attention_hooks
from lens_alti.reading.merged import is_merged, merged_readers
from lens_alti.reading.mixers import mixer_reader
from lens_alti.reading.mixers.rwkv import is_rwkv_block, rwkv_readers
from lens_alti.reading.multipliers import residual_multiplier, scaled_output
from lens_alti.reading.norms import is_post_norm, post_norm
from lens_alti.reading.processing import bridge_weight_processing
from lens_alti.reading.records import AttentionBlock
from lens_alti.reading.relative_bias import RecomputedPatternCache, caches_bias_as_pattern, local_block_len
from lens_alti.reading.relative_bias import pattern_shape as relative_pattern_shape
from lens_alti.reading.types import BlockReader, ModelLayout
from lens_alti.reading.value_norm import value_norm


@dataclass(frozen=True)
class DecoderContext:
    """What every layer reader of one decoder-only bridge shares."""

    arch: str
    parallel: bool
    parallel_mlp: str


def layer_reader(model: Any, layer: int, ctx: DecoderContext) -> BlockReader:
    """The reader of decoder layer `layer`: the one dispatch point for every kind of token mixer.

    A layer with a known linear-recurrent mixer (Mamba, SSD, DeltaNet, ..., alone or beside
    attention) is read by `reading.mixers`; attention layers by `attention_layer_reader`; any
    other layer with no attention hooks is refused with an error that says what it is.
    """
    has_attn = f"blocks.{layer}.attn.hook_pattern" in getattr(model, "hook_dict", {})
    mixer = mixer_reader(model, layer, ctx.arch, with_attention=has_attn)
    if mixer is not None:
        return mixer
    kind = mixer_kind(model, layer)
    if kind == NO_HOOKS:
        raise UnsupportedModelError(
            f"{ctx.arch}: layer {layer} ({type(original(model.blocks[layer])).__name__}) exposes no attention hooks in "
            "the bridge (no blocks.L.attn.hook_pattern) and no known mixer, so it cannot be decomposed"
        )
    beside = parallel_mixer(model, layer)
    if kind == "attention" and beside is not None:
        raise UnsupportedModelError(
            f"{ctx.arch}: layer {layer} runs a {beside} mixer in parallel with attention; the mixer branch is "
            "a recurrent mixer, not attention, and is not decomposed yet, so this model has no ALTI result"
        )
    if kind != "attention":
        raise UnsupportedModelError(
            f"{ctx.arch}: layer {layer} is a {kind} mixer, not attention, and not one of the linear-recurrent "
            "mixers lens_alti decomposes (Mamba, Mamba-2/SSD, short convolutions, gated DeltaNet, RG-LRU, RWKV), so "
            "this model has no ALTI result"
        )
    return attention_layer_reader(model, layer, ctx)


def attention_layer_reader(model: Any, layer: int, ctx: DecoderContext) -> BlockReader:
    """Self-attention of a decoder-only layer, composed from the layout features it has."""
    cfg = model.cfg
    p = f"blocks.{layer}"
    block = model.blocks[layer]
    require_attention_hooks(model, f"{p}.attn", ctx.arch, layer)
    hooks = [f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre"]
    # OpenAI-GPT: a post-LN decoder, y = LN1(x + attn_out); decided from the cache (ln1 reads x + attn).
    may_be_post = hasattr(block, "ln1")
    if may_be_post:
        hooks += [f"{p}.ln1.hook_in"]
    # Gemma-2/3, OLMo-2: a norm on the attention output only (docs/spec.md §1d).
    attn_out_norm = hasattr(block, "ln1_post")
    if attn_out_norm:
        hooks += [f"{p}.ln1_post.hook_in"]
    if ctx.parallel:
        hooks += [f"{p}.hook_resid_post", f"{p}.hook_mlp_out"]
    else:
        hooks += [f"{p}.hook_resid_mid"]
    hf_attn = original(block.attn)
    layout = value_layout(hf_attn)
    values_map = value_norm(hf_attn, f"{p}.attn")
    scale = residual_multiplier(model)
    sub_norm = head_norm_module(hf_attn)
    gated = has_output_gate(hf_attn, block.attn)
    sinks = isinstance(getattr(hf_attn, "sinks", None), torch.Tensor)  # GPT-OSS: learned per-head sink logits
    gate_pre = gate_hook(getattr(model, "hook_dict", {}), f"{p}.attn") if gated else None
    if gated:
        hooks += [f"{p}.attn.o.hook_in"] + ([gate_pre] if gate_pre is not None else [])

    def build(cache: Any) -> AttentionBlock:
        attn = block.attn
        x = cache[f"{p}.hook_resid_pre"]
        if ctx.parallel:
            mlp = cache[f"{p}.hook_mlp_out"]
            post = cache[f"{p}.hook_resid_post"]
            # Default: y = x + attn_out; "residual" mode counts the MLP (a function
            # of x_i alone) as part of the receiver's own residual term.
            residual, target = (x + mlp, post) if ctx.parallel_mlp == "residual" else (x, post - mlp)
        else:
            residual, target = x, cache[f"{p}.hook_resid_mid"]
        norm = None
        if may_be_post and is_post_norm(cache, p):
            if ctx.parallel or attn_out_norm:
                raise UnsupportedModelError(f"{ctx.arch}: {p} is post-norm with a parallel MLP or a second norm")
            # hook_resid_mid is the norm's output (the bridge aliases it to mlp.hook_in).
            norm = post_norm(block.ln1, cache[f"{p}.ln1.hook_in"], f"{p}.ln1", "LN", "block")
        if attn_out_norm:
            kind = str(getattr(cfg, "normalization_type", "RMS"))
            norm = post_norm(block.ln1_post, cache[f"{p}.ln1_post.hook_in"], f"{p}.ln1_post", kind, "attn_out")
        W_O, b_O = scaled_output(attn, scale, f"{p}.attn")
        return attention_record(
            cache, attn, f"{p}.attn", layer, ctx.arch, residual, target, norm,
            value_layout=layout, values_map=values_map, W_O=W_O, b_O=b_O, head_norm=sub_norm,
            gate_input=cache[f"{p}.attn.o.hook_in"] if gated else None,
            gate_pre=cache[gate_pre] if gate_pre is not None and gate_pre in cache.keys() else None, sinks=sinks,
        )

    channels = gate_channels(hf_attn, int(getattr(cfg, "d_head", 1) or 1)) if gated else 1
    plain = not gated and not sinks and sub_norm is None and values_map is None and layout == "pos_major"
    return BlockReader(f"{p}.attn", tuple(hooks), build, channels_per_head=channels, rows=True, plain_attention=plain)


def _bridge_decoder_layout(model: Any, parallel_mlp: str) -> ModelLayout:
    cfg = model.cfg
    arch = str(getattr(cfg, "architecture", None) or type(model).__name__)
    ctx = DecoderContext(arch, bool(getattr(cfg, "parallel_attn_mlp", False)), parallel_mlp)
    readers: list[BlockReader] = []
    for layer in range(cfg.n_layers):
        if is_rwkv_block(model.blocks[layer]):  # two token-mixing steps: time mixing, then channel mixing
            readers += rwkv_readers(model, layer, arch)
        else:
            readers.append(layer_reader(model, layer, ctx))
    return ModelLayout("decoder", arch, bridge_weight_processing(model), {"self": readers})


# Where a banded (LED) encoder reads the source length: the decoder's cross-attention keys.
_CROSS_PATTERN = "decoder_blocks.0.cross_attn.hook_pattern"


def _encoder_readers(model: Any, blocks: Any, stack: str, arch: str) -> list[BlockReader]:
    """Self-attention of encoder layers (BERT `blocks`, seq2seq `encoder_blocks`)."""
    readers = []
    for layer in range(len(blocks)):
        p = f"{stack}.{layer}"
        names = {"attn": f"{p}.attn", "norm": f"{p}.ln1", "output": f"{p}.ln2.hook_in"}
        require_attention_hooks(model, names["attn"], arch, layer, blocks[layer].attn)
        hooks: tuple[str, ...] = (
            f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre",
            f"{p}.ln1.hook_in", f"{p}.ln1.hook_out", f"{p}.ln2.hook_in",
        )
        # T5Gemma: pre- and post-attention norms (the post one on the attention output only).
        if hasattr(blocks[layer], "ln1_post"):
            hooks += (f"{p}.ln1_post.hook_in",)
        # LED: banded local attention on a window-padded encoder, cropped to the source (see `banded`).
        w = band_width(original(blocks[layer].attn))
        if w is not None:
            if stack != "encoder_blocks":
                raise UnsupportedModelError(
                    f"{arch}: {names['attn']} is banded (Longformer) attention outside an encoder-decoder; only "
                    "LED's encoder, whose source length the decoder's cross-attention gives, is supported"
                )
            hooks += (_CROSS_PATTERN,)

        def build(
            cache: Any, layer: int = layer, p: str = p, names: dict[str, str] = names, w: int | None = w
        ) -> AttentionBlock:
            block = blocks[layer]
            if w is not None:
                n = source_length(cache, _CROSS_PATTERN, names["attn"])
                cache = BandedEncoderCache(cache, p, names["attn"], w, n)
            out_norm = (block.ln1_post, f"{p}.ln1_post") if hasattr(block, "ln1_post") else None
            return sublayer_block(
                cache, model, block.attn, names, layer=layer, arch=arch, residual=cache[f"{p}.hook_resid_pre"],
                post=is_post_norm(cache, p), norm_component=block.ln1, column="diagonal", out_norm=out_norm,
            )

        shape = None
        if w is not None:
            def shape(cache: Any, p: str = p) -> tuple[int, ...]:
                b, _, h, _ = cache[f"{p}.attn.hook_pattern"].shape  # the band [batch, query, head, 2w+1]
                n = source_length(cache, _CROSS_PATTERN, f"{p}.attn")
                return (b, h, n, n)
        readers.append(BlockReader(names["attn"], hooks, build, shape=shape, rows=w is None))
    return readers


def _decoder_readers(model: Any, arch: str) -> tuple[list[BlockReader], list[BlockReader]]:
    """Decoder self-attention and cross-attention sublayers of a seq2seq model."""
    self_readers, cross_readers = [], []
    for layer in range(len(model.decoder_blocks)):
        p = f"decoder_blocks.{layer}"
        self_names = {"attn": f"{p}.self_attn", "norm": f"{p}.ln1", "output": f"{p}.ln2.hook_in"}
        cross_names = {"attn": f"{p}.cross_attn", "norm": f"{p}.ln2", "output": f"{p}.ln3.hook_in"}
        require_attention_hooks(model, self_names["attn"], arch, layer, model.decoder_blocks[layer].self_attn)
        require_attention_hooks(model, cross_names["attn"], arch, layer, model.decoder_blocks[layer].cross_attn)
        common = (f"{p}.hook_resid_pre", f"{p}.ln1.hook_in", f"{p}.ln1.hook_out", f"{p}.ln2.hook_in")
        block = model.decoder_blocks[layer]
        self_post = (f"{p}.ln1_post.hook_in",) if hasattr(block, "ln1_post") else ()
        cross_post = (f"{p}.ln2_post.hook_in",) if hasattr(block, "ln2_post") else ()
        self_hooks = (f"{p}.self_attn.hook_pattern", f"{p}.self_attn.hook_v", *common, *self_post)
        cross_hooks = (
            f"{p}.cross_attn.hook_pattern", f"{p}.cross_attn.hook_v", *common,
            f"{p}.ln2.hook_out", f"{p}.ln3.hook_in", *cross_post,
        )

        def build_self(cache: Any, layer: int = layer, p: str = p, names: dict = self_names) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            out_norm = (block.ln1_post, f"{p}.ln1_post") if hasattr(block, "ln1_post") else None
            return sublayer_block(
                cache, model, block.self_attn, names, layer=layer, arch=arch, residual=cache[f"{p}.hook_resid_pre"],
                post=is_post_norm(cache, p), norm_component=block.ln1, column="diagonal", out_norm=out_norm,
            )

        def build_cross(cache: Any, layer: int = layer, p: str = p, names: dict = cross_names) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            post = is_post_norm(cache, p)
            # The residual entering cross-attention is the self-attention sublayer's output.
            residual = cache[f"{p}.ln1.hook_out"] if post else cache[f"{p}.ln2.hook_in"]
            out_norm = (block.ln2_post, f"{p}.ln2_post") if hasattr(block, "ln2_post") else None
            return sublayer_block(
                cache, model, block.cross_attn, names, layer=layer, arch=arch, residual=residual,
                post=post, norm_component=block.ln2, column="last", out_norm=out_norm,
            )

        self_readers.append(BlockReader(self_names["attn"], self_hooks, build_self))
        cross_readers.append(BlockReader(cross_names["attn"], cross_hooks, build_cross))
    return self_readers, cross_readers


def _recomputed(
    reader: BlockReader, bridge_attn: Any, bias_module: Any | None, causal: bool, local_len: int | None = None
) -> BlockReader:
    """`reader` with its pattern recomputed from the cached queries and keys (see `relative_bias`).

    The pattern hook is not read (it holds the position bias, or never fires), so hook_q leads.
    """
    name = reader.name
    hf_attn = original(bridge_attn)

    def build(cache: Any) -> AttentionBlock:
        view = RecomputedPatternCache(cache, name, hf_attn, bias_module, causal, local_len)
        return replace(reader.build(view), padding_unmasked=True)

    def shape(cache: Any) -> tuple[int, ...]:
        return relative_pattern_shape(cache, name)

    others = tuple(h for h in reader.hooks if h != f"{name}.hook_pattern")
    return BlockReader(name, (f"{name}.hook_q", f"{name}.hook_k", *others), build, shape=shape)


def bridge_layout(model: Any, parallel_mlp: str) -> ModelLayout:
    """The layout of a TransformerBridge: decoder-only, encoder-only or encoder-decoder."""
    cfg = model.cfg
    arch = str(getattr(cfg, "architecture", None) or type(model).__name__)
    processing = bridge_weight_processing(model)
    if hasattr(model, "encoder_blocks") and hasattr(model, "decoder_blocks"):
        if len(model.decoder_blocks) == 0 or len(model.encoder_blocks) == 0:
            raise UnsupportedModelError(f"{arch}: the model has no encoder or no decoder layers")
        encoder = _encoder_readers(model, model.encoder_blocks, "encoder_blocks", arch)
        if is_merged(model):  # T5Gemma2: decoder self- and cross-attention in one softmax
            merged = {"encoder": encoder, "merged": merged_readers(model, arch)}
            return ModelLayout("encoder_decoder", arch, processing, merged)
        dec_self, cross = _decoder_readers(model, arch)
        blocks = {"encoder": encoder, "decoder_self": dec_self, "cross": cross}
        # Switch Transformers / LongT5: patterns recomputed from hook_q / hook_k (see `relative_bias`).
        enc0, dec0 = original(model.encoder_blocks[0].attn), original(model.decoder_blocks[0].self_attn)
        local = local_block_len(enc0, "encoder_blocks.0.attn")
        if local is not None or caches_bias_as_pattern(model.encoder_blocks[0].attn):
            blocks["encoder"] = [_recomputed(r, model.encoder_blocks[i].attn, enc0, False, local)
                                 for i, r in enumerate(blocks["encoder"])]
        if caches_bias_as_pattern(model.decoder_blocks[0].self_attn):
            blocks["decoder_self"] = [_recomputed(r, model.decoder_blocks[i].self_attn, dec0, True)
                                      for i, r in enumerate(dec_self)]
        if caches_bias_as_pattern(model.decoder_blocks[0].cross_attn):
            blocks["cross"] = [_recomputed(r, model.decoder_blocks[i].cross_attn, None, False)
                               for i, r in enumerate(cross)]
        return ModelLayout("encoder_decoder", arch, processing, blocks)
    if not hasattr(model, "blocks"):
        stacks = [name for name, _ in model.named_children() if name.endswith("_blocks")]
        if stacks:  # HRM-Text: L_blocks / H_blocks, each stack called several times per forward pass
            raise UnsupportedModelError(
                f"{arch}: the model runs its block stacks ({', '.join(stacks)}) recurrently, several times per "
                "forward pass (cycles), and a cache keeps only the last call of each hook: the activations of the "
                "other passes, which the attribution through the whole computation needs, are missing"
            )
        raise UnsupportedModelError(
            f"{arch}: no attention blocks found (neither `blocks` nor `encoder_blocks` and `decoder_blocks`)"
        )
    if getattr(cfg, "attention_dir", "causal") == "bidirectional":
        return ModelLayout("encoder", arch, processing, {"self": _encoder_readers(model, model.blocks, "blocks", arch)})
    return _bridge_decoder_layout(model, parallel_mlp)
