"""Tiny random models built offline, booted as TransformerBridges."""

from __future__ import annotations

import copy
import functools
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge

from tests.reference import randomize_norms

VOCAB = 1000
DECODER_ARCHS = ("gpt2", "llama", "neox")


@functools.cache
def tokenizer_dir() -> str:
    """A word-level tokenizer ("t1 t2 ...") saved to disk: the bridge reloads it by path."""
    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3", unk_token="[UNK]"
    )
    path = tempfile.mkdtemp(prefix="lens_alti_tok_")
    fast.save_pretrained(path)
    return path


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


def build_bridge(arch: str, n_layers: int = 2, seed: int = 0) -> tuple[transformers.PreTrainedModel, TransformerBridge]:
    """(an untouched copy of the Hugging Face model for the reference, the bridge)."""
    hf = hf_model(arch, n_layers, seed)
    untouched = copy.deepcopy(hf)
    return untouched, boot(hf)
