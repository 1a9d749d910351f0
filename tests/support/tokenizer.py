"""A word-level tokenizer ("t1 t2 ...") saved to disk: no hub access, and no TransformerLens import
(shared by the TransformerLens 4.x tests and the 3.x tests in tests_tl3)."""

from __future__ import annotations

import functools
import tempfile

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 1000


@functools.cache
def tokenizer_dir() -> str:
    """The folder of the saved tokenizer (bridges reload their tokenizer by path)."""
    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3", unk_token="[UNK]"
    )
    path = tempfile.mkdtemp(prefix="lens_alti_tok_")
    fast.save_pretrained(path)
    return path


@functools.cache
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The tokenizer, loaded from `tokenizer_dir()`."""
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
