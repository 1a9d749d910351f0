"""A hand-built one-layer GPT-2 whose answer is copied from one passage, and its word-level tokenizer.

The vocabulary is words (`WORDS`). The model has no position embeddings and no MLP (zero
weights). Its one attention head reads the query mark "?" and attends to the words flagged as
answers (`ANSWERS`: a dedicated embedding direction, matched by the key), and copies the attended
word's embedding into the residual stream; the unembedding is the embedding scaled by `readout`, so
at "?" the model predicts the answer word that occurs in the context. A context with one answer word in
one passage therefore has its answer copied from that passage.
"""

from __future__ import annotations

import functools
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

FILLER = tuple(f"w{i}" for i in range(60))
ANSWERS = ("paris", "rome", "oslo", "lima")
WORDS = ("<s>", "</s>", "<unk>", "Context", "Query", ":", ".", "?", "where", "is", "it", *ANSWERS, *FILLER)
D_MODEL = 64


@functools.cache
def word_tokenizer_dir() -> str:
    """A saved word-level tokenizer over `WORDS` (BOS "<s>", EOS "</s>"), no chat template."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    path = tempfile.mkdtemp(prefix="lens_alti_words_")
    fast.save_pretrained(path)
    return path


def copy_model(
    seed: int = 0, copy_scale: float = 4.0, focus: float = 40.0, readout: float = 0.12
) -> transformers.GPT2LMHeadModel:
    """The hand-built copying model (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=D_MODEL, n_head=1, vocab_size=len(WORDS), n_positions=256, n_inner=4,
        attn_implementation="eager", tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    emb = torch.randn(len(WORDS), D_MODEL, generator=gen)
    emb[:, :2] = 0.0
    emb[[WORDS.index(a) for a in ANSWERS], 0] = 4.0  # the answer flag, read by the key
    emb[WORDS.index("?"), 1] = 4.0  # the query flag, read by the query
    d = D_MODEL
    with torch.no_grad():
        model.transformer.wte.weight.copy_(emb)
        model.lm_head.weight.copy_(readout * emb)  # the unembedding reads the embedding directions back
        model.transformer.wpe.weight.zero_()
        attn = model.transformer.h[0].attn
        w = torch.zeros(d, 3 * d)  # Conv1D: x @ w gives [q | k | v]
        w[1, 0] = focus  # q[0] = focus · (query flag)
        w[0, d] = 1.0  # k[0] = answer flag
        w[:, 2 * d :] = torch.eye(d)  # v = the normalised input
        attn.c_attn.weight.copy_(w)
        attn.c_attn.bias.zero_()
        attn.c_proj.weight.copy_(copy_scale * torch.eye(d))
        attn.c_proj.bias.zero_()
        mlp = model.transformer.h[0].mlp
        for p in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias):
            p.zero_()
    return model


def copy_bridge(seed: int = 0) -> tuple[transformers.GPT2LMHeadModel, object]:
    """(an untouched copy of the model for references, its TransformerBridge with the word tokenizer)."""
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    hf = copy_model(seed)
    untouched = copy.deepcopy(hf)
    tok = transformers.AutoTokenizer.from_pretrained(word_tokenizer_dir())
    return untouched, TransformerBridge.boot_transformers("copy", hf_model=hf, tokenizer=tok, device="cpu")
