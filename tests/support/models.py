"""Tiny random models built offline, booted as TransformerBridges."""

from __future__ import annotations

import copy

import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

from tests.support.reference import randomize_norms
from tests.support.tokenizer import VOCAB, tokenizer_dir

DECODER_ARCHS = ("gpt2", "llama", "neox", "gemma2")


def hf_model(arch: str, n_layers: int = 2, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=n_layers, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(
            num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
        )
        model = transformers.Gemma2ForCausalLM(cfg)
    elif arch == "neox":
        cfg = transformers.GPTNeoXConfig(
            num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=128,
        )
        model = transformers.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    randomize_norms(model, seed)
    return model.eval()


def boot(hf: transformers.PreTrainedModel, name: str = "tiny") -> TransformerBridge:
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device="cpu")


Built = tuple[transformers.PreTrainedModel, TransformerBridge]


def _with_untouched_copy(hf: transformers.PreTrainedModel) -> Built:
    """(an untouched copy of the Hugging Face model for the reference, the bridge)."""
    untouched = copy.deepcopy(hf)
    return untouched, boot(hf)


def build_bridge(arch: str, n_layers: int = 2, seed: int = 0) -> Built:
    return _with_untouched_copy(hf_model(arch, n_layers, seed))


SEQ2SEQ_ARCHS = ("t5", "marian", "bart", "m2m100", "mbart", "led")


def hf_seq2seq(arch: str, n_layers: int = 2, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random encoder(-decoder); init_std raised so attention is not dwarfed by the residual."""
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            intermediate_size=128, initializer_range=0.1, max_position_embeddings=64,
        )
        model = transformers.BertForMaskedLM(cfg)
    elif arch == "t5":
        cfg = transformers.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=n_layers, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0,
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        common = dict(
            vocab_size=VOCAB, d_model=64, encoder_layers=n_layers, decoder_layers=n_layers,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_position_embeddings=64, pad_token_id=3, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, init_std=0.2,
        )
        cls = {
            "marian": (transformers.MarianConfig, transformers.MarianMTModel),
            "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration),
            "m2m100": (transformers.M2M100Config, transformers.M2M100ForConditionalGeneration),
            "mbart": (transformers.MBartConfig, transformers.MBartForConditionalGeneration),
            "led": (transformers.LEDConfig, transformers.LEDForConditionalGeneration),
        }[arch]
        if arch == "led":  # Longformer encoder: a window of 4 (2 keys each side), inputs padded to a multiple of 4
            del common["max_position_embeddings"]
            common.update(max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, attention_window=4)
        model = cls[1](cls[0](**common))
    randomize_norms(model, seed)
    return model.eval()


def build_seq2seq(arch: str, n_layers: int = 2, seed: int = 0) -> Built:
    return _with_untouched_copy(hf_seq2seq(arch, n_layers, seed))
