"""Train the toy translator shipped in `lens_alti/toy_translation/model/`.

    python -m lens_alti.models.toy_translation.train [--out DIR] [--epochs N]

A 3+3-layer Marian (d_model 128, 4 heads) on 20 000 synthetic sentence pairs, on CPU. Writes
safetensors weights, config, tokenizer and `training.json` (time, loss, held-out exact match).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from lens_alti.models.toy_translation import MODEL_DIR, encode_batch, translate
from lens_alti.models.toy_translation.corpus import (
    N_TEST,
    N_TRAIN,
    SentencePair,
    source_vocabulary,
    target_vocabulary,
    train_test_split,
)

SPECIAL = ("<pad>", "</s>", "<unk>")


def build_tokenizer() -> Any:
    """A word-level tokenizer over both vocabularies: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL) + source_vocabulary() + target_vocabulary()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )


def build_model(vocab_size: int, seed: int = 0) -> Any:
    """A freshly initialised small MarianMTModel (encoder_layers == decoder_layers, as the bridge needs)."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    cfg = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=128,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        max_position_embeddings=64,
        dropout=0.1,
        attention_dropout=0.0,
        activation_function="gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    return MarianMTModel(cfg)


def exact_match(model: Any, tokenizer: Any, pairs: list[SentencePair], batch_size: int = 250) -> float:
    """Share of `pairs` whose greedy translation equals the reference exactly."""
    model.eval()
    hits = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        hyps = translate(model, [p.source_text for p in chunk], tokenizer=tokenizer)
        hits += sum(h.split() == p.target for h, p in zip(hyps, chunk, strict=True))
    return hits / len(pairs)


def train(out: Path, epochs: int = 6, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, threads: int = 1) -> dict:
    """Train, evaluate on held-out pairs and save everything to `out`. Returns the training log.

    One thread by default: on a shared 2-core machine two spinning OpenMP threads are several
    times slower than one as soon as anything else runs.
    """
    torch.set_num_threads(threads)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed)
    model.train()
    train_pairs, test_pairs = train_test_split(N_TRAIN, N_TEST)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    steps = epochs * math.ceil(len(train_pairs) / batch_size)
    warmup = min(400, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    rng = random.Random(seed)
    log: dict[str, Any] = {"epochs": []}
    step = 0
    for epoch in range(epochs):
        order = list(range(len(train_pairs)))
        rng.shuffle(order)
        model.train()
        total = 0.0
        for i in range(0, len(order), batch_size):
            chunk = [train_pairs[j] for j in order[i : i + batch_size]]
            b = encode_batch(tokenizer, [p.source_text for p in chunk], [p.target_text for p in chunk])
            loss = model(
                input_ids=b.source,
                attention_mask=b.source_mask,
                decoder_input_ids=b.decoder_input,
                decoder_attention_mask=b.decoder_mask,
                labels=b.labels,
            ).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * len(chunk)
            if step % 100 == 0:
                elapsed = time.perf_counter() - start
                print(f"step {step}/{steps} loss {float(loss.detach()):.4f} ({elapsed:.0f} s)", flush=True)
        em = exact_match(model, tokenizer, test_pairs[:200])
        entry = {
            "epoch": epoch + 1,
            "loss": total / len(train_pairs),
            "exact_match_200": em,
            "seconds": round(time.perf_counter() - start, 1),
        }
        log["epochs"].append(entry)
        print(json.dumps(entry), flush=True)
    train_seconds = time.perf_counter() - start
    model.eval()
    em = exact_match(model, tokenizer, test_pairs)
    log.update(
        train_seconds=round(train_seconds, 1),
        held_out_exact_match=em,
        n_train=len(train_pairs),
        n_test=len(test_pairs),
        steps=step,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"trained in {train_seconds:.0f} s; held-out exact match {em:.3f} on {len(test_pairs)} pairs; saved to {out}")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="output folder (default: the shipped model)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
