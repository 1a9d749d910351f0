"""A small trained translation model with gold word alignments, for evaluating ALTI+.

    from lens_alti.models.toy_translation import encode_batch, load_toy_translator, translate
    model = load_toy_translator()                  # a TransformerBridge (Marian, eager attention)
    translate(model, ["the big dog sees a cat"])  # ['dadu bara en wa radi o mehuku']
    b = encode_batch(model.tokenizer, sources, references)   # teacher forcing, for ALTI+
    _, cache = model.run_with_cache(b.source, decoder_input=b.decoder_input,
                                    attention_mask=b.source_mask, decoder_attention_mask=b.decoder_mask)

Tokenise with the tokenizer (or `encode_batch`), not `model.to_tokens`, which prepends ``</s>``
as if it were a BOS token; the model was trained on ``words </s>``.

The weights in `model/` were trained by `python -m lens_alti.models.toy_translation.train` on the synthetic
corpus of `lens_alti.models.toy_translation.corpus`; `python -m lens_alti.models.toy_translation.evaluate` prints the
alignment error rates of attention, ALTI and ALTI+ against the corpus' gold alignments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MODEL_DIR = Path(__file__).parent / "model"
"""The shipped model: safetensors weights, Marian config and word-level tokenizer."""


def load_tokenizer(path: str | Path = MODEL_DIR) -> Any:
    """The word-level tokenizer (a PreTrainedTokenizerFast; appends ``</s>`` to every text)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_hf_model(path: str | Path = MODEL_DIR) -> Any:
    """The shipped MarianMTModel (eager attention, eval mode)."""
    from transformers import MarianMTModel

    return MarianMTModel.from_pretrained(str(path), attn_implementation="eager").eval()


def load_toy_translator(path: str | Path = MODEL_DIR, device: str = "cpu") -> Any:
    """The shipped toy translator as a TransformerLens TransformerBridge (raw weights, eager attention)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        str(path), hf_model=load_hf_model(path), tokenizer=load_tokenizer(path), device=device
    )


@dataclass
class Batch:
    """A right-padded teacher-forcing batch.

    `decoder_input` is ``<pad>`` (Marian's decoder start) followed by the target words, without
    ``</s>``: decoder position `k` reads target word `k-1` and predicts target word `k`.
    """

    source: Tensor  # [batch, S] word ids followed by </s>
    source_mask: Tensor  # [batch, S]
    decoder_input: Tensor  # [batch, T] start token + target words
    decoder_mask: Tensor  # [batch, T]
    labels: Tensor  # [batch, T] target words + </s>, -100 at padding


def encode_batch(tokenizer: Any, sources: Sequence[str], targets: Sequence[str]) -> Batch:
    """Tokenise parallel sentences for teacher forcing (see `Batch`)."""
    src = tokenizer(list(sources), padding=True, return_tensors="pt")
    tgt = tokenizer(list(targets), padding=True, return_tensors="pt")
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    start = torch.full((len(targets), 1), tokenizer.pad_token_id, dtype=torch.long)
    decoder_input = torch.cat([start, tgt["input_ids"][:, :-1]], dim=1)
    decoder_input = decoder_input.masked_fill(decoder_input == tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths = tgt["attention_mask"].sum(1, keepdim=True)  # target words + </s> = decoder positions
    decoder_mask = (torch.arange(decoder_input.shape[1]) < lengths).long()
    return Batch(src["input_ids"], src["attention_mask"], decoder_input, decoder_mask, labels)


@torch.no_grad()
def translate(model: Any, sentences: Sequence[str], max_new_tokens: int = 32, tokenizer: Any = None) -> list[str]:
    """Greedy translations of source `sentences` (`model`: a bridge or a MarianMTModel)."""
    hf = getattr(model, "original_model", model)
    tokenizer = tokenizer or getattr(model, "tokenizer", None) or load_tokenizer()
    enc = tokenizer(list(sentences), padding=True, return_tensors="pt").to(hf.device)
    out = hf.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


__all__ = ["MODEL_DIR", "Batch", "encode_batch", "load_hf_model", "load_tokenizer", "load_toy_translator", "translate"]
