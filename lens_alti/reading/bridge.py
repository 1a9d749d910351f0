"""TransformerBridge layouts (TransformerLens 4.x): which blocks each family has and how to read them."""

from __future__ import annotations

from typing import Any

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.blocks import attention_record, sublayer_block
from lens_alti.reading.layout import BlockReader, ModelLayout, weight_processing
from lens_alti.reading.mixers import mixer_reader
from lens_alti.reading.norms import is_post_norm, post_norm
from lens_alti.reading.records import AttentionBlock


def _bridge_decoder_layout(model: Any, parallel_mlp: str) -> ModelLayout:
    cfg = model.cfg
    arch = str(getattr(cfg, "architecture", None) or type(model).__name__)
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    readers = []
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        # A layer with a known linear-recurrent mixer (Mamba, SSD, ...), alone or beside attention.
        has_attn = f"{p}.attn.hook_pattern" in getattr(model, "hook_dict", {})
        mixer = mixer_reader(model, layer, arch, with_attention=has_attn)
        if mixer is not None:
            readers.append(mixer)
            continue
        hooks = [f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre"]
        # Gemma-2/3, OLMo-2: a norm on the attention output only (spec 1d).
        attn_out_norm = hasattr(model.blocks[layer], "ln1_post")
        if attn_out_norm:
            hooks += [f"{p}.ln1_post.hook_in"]
        if parallel:
            hooks += [f"{p}.hook_resid_post", f"{p}.hook_mlp_out"]
        else:
            hooks += [f"{p}.hook_resid_mid"]

        def build(cache: Any, layer: int = layer, p: str = p, attn_out_norm: bool = attn_out_norm) -> AttentionBlock:
            attn = model.blocks[layer].attn
            x = cache[f"{p}.hook_resid_pre"]
            if parallel:
                mlp = cache[f"{p}.hook_mlp_out"]
                post = cache[f"{p}.hook_resid_post"]
                # Default: y = x + attn_out; "residual" mode counts the MLP (a function
                # of x_i alone) as part of the receiver's own residual term.
                residual, target = (x + mlp, post) if parallel_mlp == "residual" else (x, post - mlp)
            else:
                residual, target = x, cache[f"{p}.hook_resid_mid"]
            norm = None
            if attn_out_norm:
                kind = str(getattr(cfg, "normalization_type", "RMS"))
                norm = post_norm(
                    model.blocks[layer].ln1_post, cache[f"{p}.ln1_post.hook_in"], f"{p}.ln1_post", kind, "attn_out"
                )
            return attention_record(cache, attn, f"{p}.attn", layer, arch, residual, target, norm)

        readers.append(BlockReader(f"{p}.attn", tuple(hooks), build))
    return ModelLayout("decoder", arch, weight_processing(model), {"self": readers})


def _encoder_readers(model: Any, blocks: Any, stack: str, arch: str) -> list[BlockReader]:
    """Self-attention of encoder layers (BERT `blocks`, seq2seq `encoder_blocks`)."""
    readers = []
    for layer in range(len(blocks)):
        p = f"{stack}.{layer}"
        names = {"attn": f"{p}.attn", "norm": f"{p}.ln1", "output": f"{p}.ln2.hook_in"}
        hooks = (
            f"{p}.attn.hook_pattern", f"{p}.attn.hook_v", f"{p}.hook_resid_pre",
            f"{p}.ln1.hook_in", f"{p}.ln1.hook_out", f"{p}.ln2.hook_in",
        )

        def build(cache: Any, layer: int = layer, p: str = p, names: dict[str, str] = names) -> AttentionBlock:
            block = blocks[layer]
            return sublayer_block(
                cache, model, block.attn, names, layer=layer, arch=arch, residual=cache[f"{p}.hook_resid_pre"],
                post=is_post_norm(cache, p), norm_component=block.ln1, column="diagonal",
            )

        readers.append(BlockReader(names["attn"], hooks, build))
    return readers


def _decoder_readers(model: Any, arch: str) -> tuple[list[BlockReader], list[BlockReader]]:
    """Decoder self-attention and cross-attention sublayers of a seq2seq model."""
    self_readers, cross_readers = [], []
    for layer in range(len(model.decoder_blocks)):
        p = f"decoder_blocks.{layer}"
        self_names = {"attn": f"{p}.self_attn", "norm": f"{p}.ln1", "output": f"{p}.ln2.hook_in"}
        cross_names = {"attn": f"{p}.cross_attn", "norm": f"{p}.ln2", "output": f"{p}.ln3.hook_in"}
        common = (f"{p}.hook_resid_pre", f"{p}.ln1.hook_in", f"{p}.ln1.hook_out", f"{p}.ln2.hook_in")
        self_hooks = (f"{p}.self_attn.hook_pattern", f"{p}.self_attn.hook_v", *common)
        cross_hooks = (
            f"{p}.cross_attn.hook_pattern", f"{p}.cross_attn.hook_v", *common,
            f"{p}.ln2.hook_out", f"{p}.ln3.hook_in",
        )

        def build_self(cache: Any, layer: int = layer, p: str = p, names: dict = self_names) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            return sublayer_block(
                cache, model, block.self_attn, names, layer=layer, arch=arch, residual=cache[f"{p}.hook_resid_pre"],
                post=is_post_norm(cache, p), norm_component=block.ln1, column="diagonal",
            )

        def build_cross(cache: Any, layer: int = layer, p: str = p, names: dict = cross_names) -> AttentionBlock:
            block = model.decoder_blocks[layer]
            post = is_post_norm(cache, p)
            # The residual entering cross-attention is the self-attention sublayer's output.
            residual = cache[f"{p}.ln1.hook_out"] if post else cache[f"{p}.ln2.hook_in"]
            return sublayer_block(
                cache, model, block.cross_attn, names, layer=layer, arch=arch, residual=residual,
                post=post, norm_component=block.ln2, column="last",
            )

        self_readers.append(BlockReader(self_names["attn"], self_hooks, build_self))
        cross_readers.append(BlockReader(cross_names["attn"], cross_hooks, build_cross))
    return self_readers, cross_readers


def bridge_layout(model: Any, parallel_mlp: str) -> ModelLayout:
    """The layout of a TransformerBridge: decoder-only, encoder-only or encoder-decoder."""
    cfg = model.cfg
    arch = str(getattr(cfg, "architecture", None) or type(model).__name__)
    processing = weight_processing(model)
    if hasattr(model, "encoder_blocks") and hasattr(model, "decoder_blocks"):
        if len(model.decoder_blocks) == 0 or len(model.encoder_blocks) == 0:
            raise UnsupportedModelError(f"{arch}: the model has no encoder or no decoder layers")
        dec_self, cross = _decoder_readers(model, arch)
        blocks = {
            "encoder": _encoder_readers(model, model.encoder_blocks, "encoder_blocks", arch),
            "decoder_self": dec_self,
            "cross": cross,
        }
        return ModelLayout("encoder_decoder", arch, processing, blocks)
    if not hasattr(model, "blocks"):
        raise UnsupportedModelError(f"{arch}: no attention blocks found (neither `blocks` nor `encoder_blocks`)")
    if getattr(cfg, "attention_dir", "causal") == "bidirectional":
        return ModelLayout("encoder", arch, processing, {"self": _encoder_readers(model, model.blocks, "blocks", arch)})
    return _bridge_decoder_layout(model, parallel_mlp)
