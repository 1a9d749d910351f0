"""lens_alti.reading.hooks: every name it builds is a hook of a tiny TransformerBridge (decoder-only,
encoder-decoder) and is the name TransformerLens documents."""

from __future__ import annotations

from typing import get_args

import pytest

from lens_alti.reading import hooks
from tests.support.models import build_bridge, build_seq2seq


@pytest.fixture(scope="module")
def decoder_hooks():
    return set(build_bridge("gpt2")[1].hook_dict)


@pytest.fixture(scope="module")
def seq2seq_hooks():
    return set(build_seq2seq("mbart")[1].hook_dict)  # pre-norm: a decoder embedding and final norm of its own


def test_the_names_are_the_transformer_lens_names():
    assert hooks.attention_hook(3, "z") == "blocks.3.attn.hook_z"
    assert hooks.pattern_hook(0) == "blocks.0.attn.hook_pattern"
    cross = hooks.pattern_hook(1, stack="decoder_blocks", attention="cross_attn")
    assert cross == "decoder_blocks.1.cross_attn.hook_pattern"
    assert hooks.block_hook(2, "mlp_out") == "blocks.2.hook_mlp_out"
    assert hooks.block_hook(0, "resid_post", stack="encoder_blocks") == "encoder_blocks.0.hook_resid_post"
    assert (hooks.embedding_hook(), hooks.embedding_hook(decoder=True)) == ("embed.hook_in", "decoder_embed.hook_in")
    assert (hooks.final_norm_hook(), hooks.final_norm_hook(decoder=True)) == (
        "ln_final.hook_out", "decoder_ln_final.hook_out"
    )
    assert (hooks.unembed_hook(), hooks.unembed_hook("in")) == ("unembed.hook_out", "unembed.hook_in")


def test_decoder_only_names_are_bridge_hooks(decoder_hooks):
    names = [hooks.embedding_hook(), hooks.final_norm_hook(), hooks.unembed_hook("in"), hooks.unembed_hook("out")]
    assert len(get_args(hooks.AttentionPoint)) == 7 and len(get_args(hooks.BlockPoint)) == 5
    for layer in (0, 1):
        names += [hooks.pattern_hook(layer)]
        names += [hooks.attention_hook(layer, point) for point in get_args(hooks.AttentionPoint)]  # every point
        names += [hooks.block_hook(layer, point) for point in get_args(hooks.BlockPoint)]
    missing = [n for n in names if n not in decoder_hooks]
    assert not missing, missing
    assert hooks.pattern_hook(2) not in decoder_hooks  # a two-layer model: the names follow the layer


def test_encoder_decoder_names_are_bridge_hooks(seq2seq_hooks):
    names = [
        hooks.embedding_hook(), hooks.embedding_hook(decoder=True), hooks.final_norm_hook(decoder=True),
        hooks.unembed_hook("in"), hooks.unembed_hook("out"),
    ]
    for layer in (0, 1):
        names += [
            hooks.pattern_hook(layer, stack="encoder_blocks"),
            hooks.pattern_hook(layer, stack="decoder_blocks", attention="self_attn"),
            hooks.pattern_hook(layer, stack="decoder_blocks", attention="cross_attn"),
            hooks.attention_hook(layer, "z", stack="decoder_blocks", attention="cross_attn"),
            hooks.block_hook(layer, "resid_post", stack="encoder_blocks"),
            hooks.block_hook(layer, "resid_post", stack="decoder_blocks"),
        ]
    missing = [n for n in names if n not in seq2seq_hooks]
    assert not missing, missing
    assert hooks.final_norm_hook() not in seq2seq_hooks  # the encoder-decoder's final norm is the decoder's
