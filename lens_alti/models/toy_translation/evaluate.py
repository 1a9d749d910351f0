"""Alignment error rate of attention, ALTI and ALTI+ on the toy translator's held-out sentences.

    python -m lens_alti.models.toy_translation.evaluate [--n 500] [--talp-dir DIR]

Each held-out pair is force-decoded with its reference translation; for every decoder layer
four contribution matrices `[decoder_pos, source_tokens]` are turned into word alignments
(argmax over source words per target word, ``</s>`` excluded) under both conventions
(`lens_alti.analysis.alignment`), and scored against the gold alignments of the corpus generator:

* ``attention``: cross-attention weights, mean over heads;
* ``ALTI cross``: ALTI contributions of the cross-attention block (`result.cross`, source columns);
* ``enc. rollout × cross``: the same, propagated through the encoder's ALTI rollout;
* ``ALTI+ total``: the ALTI+ rollout over the whole model (`result.total`, source columns).

Deterministic (fixed corpus seeds, no sampling); about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lens_alti
from lens_alti.analysis.alignment import (
    CONVENTIONS,
    GoldAlignment,
    Link,
    align,
    alignment_scores,
    diagonal_alignment,
    word_ids_from_pieces,
    write_talp,
)
from lens_alti.models.toy_translation import MODEL_DIR, encode_batch, load_toy_translator
from lens_alti.models.toy_translation.corpus import N_TEST, SentencePair, train_test_split
from lens_alti.reading.hooks import pattern_hook

METHODS = {
    "attention": "cross-attention weights (head mean)",
    "alti_cross": "ALTI cross (layer-wise)",
    "rollout_x_cross": "enc. rollout × ALTI cross",
    "alti_plus": "ALTI+ total",
}


def held_out_pairs(n: int) -> list[SentencePair]:
    """The first `n` held-out pairs (none of their source sentences was seen in training)."""
    if n > N_TEST:
        raise ValueError(f"there are {N_TEST} held-out pairs, asked for {n}")
    return list(_held_out()[:n])


@functools.cache
def _held_out() -> tuple[SentencePair, ...]:
    return tuple(train_test_split()[1])


def best_single_links(gold: GoldAlignment, n_target_words: int) -> set[Link]:
    """The best any one-link-per-target-word extractor can do: a sure link where there is one,
    else a possible one (the floor of the AER column: many-to-one words keep it above 0)."""
    out: set[Link] = set()
    for t in range(n_target_words):
        links = sorted(link for link in gold.sure if link[1] == t) or sorted(
            link for link in gold.possible if link[1] == t
        )
        if links:
            out.add(links[0])
    return out


@torch.no_grad()
def contribution_matrices(model: Any, pairs: Sequence[SentencePair], batch_size: int = 50) -> dict[str, list[Tensor]]:
    """Per method, per sentence: a `[layer, decoder_pos, source_tokens]` matrix (padding cut off).

    Also returns, under ``"source_share"``, each sentence's ALTI+ source contribution per layer
    `[layer, decoder_pos]`.
    """
    tok = model.tokenizer
    out: dict[str, list[Tensor]] = {m: [] for m in [*METHODS, "source_share"]}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = encode_batch(tok, [p.source_text for p in chunk], [p.target_text for p in chunk])
        _, cache = model.run_with_cache(
            b.source, decoder_input=b.decoder_input, attention_mask=b.source_mask, decoder_attention_mask=b.decoder_mask
        )
        res = lens_alti.attribute(cache, attention_mask=b.source_mask, decoder_attention_mask=b.decoder_mask)
        assert isinstance(res, lens_alti.Seq2SeqAltiResult)
        s = b.source.shape[1]
        n_layers = res.cross.shape[1]
        patterns = [pattern_hook(layer, stack="decoder_blocks", attention="cross_attn") for layer in range(n_layers)]
        attn = torch.stack([cache[hook].mean(1) for hook in patterns], dim=1)
        cross = res.cross[..., :s]
        rolled = cross @ res.encoder.rollout[:, -1, None]
        total = res.total[..., :s]
        share = total.sum(-1)
        for k, pair in enumerate(chunk):
            sl, tl = len(pair.source) + 1, len(pair.target) + 1  # + </s>, + decoder start
            for name, mat in (("attention", attn), ("alti_cross", cross), ("rollout_x_cross", rolled)):
                out[name].append(mat[k, :, :tl, :sl].clone())
            out["alti_plus"].append(total[k, :, :tl, :sl].clone())
            out["source_share"].append(share[k, :, :tl].clone())
        del cache
    return out


def evaluate(model: Any = None, n: int = 500, batch_size: int = 50, talp_dir: Path | None = None) -> dict[str, Any]:
    """AER per layer for every method and convention, the diagonal baseline and the source share.

    Returns ``{"aer": {(method, convention): [per layer]}, "precision": ..., "recall": ...,
    "diagonal": AlignmentScores, "oracle": AlignmentScores, "source_share": [per layer], "n": n, "seconds": ...}``.
    """
    start = time.perf_counter()
    model = model if model is not None else load_toy_translator()
    pairs = held_out_pairs(n)
    golds = [GoldAlignment.from_links(p.sure, p.possible) for p in pairs]
    mats = contribution_matrices(model, pairs, batch_size)
    src_ids = [word_ids_from_pieces([*p.source, "</s>"], scheme="whole") for p in pairs]
    tgt_ids = [word_ids_from_pieces(p.target, scheme="whole") for p in pairs]
    n_layers = mats["alti_plus"][0].shape[0]
    aer: dict[tuple[str, str], list[float]] = {}
    precision: dict[tuple[str, str], list[float]] = {}
    recall: dict[tuple[str, str], list[float]] = {}
    for method in METHODS:
        for conv in CONVENTIONS:
            scores = []
            for layer in range(n_layers):
                hyps = [align(m[layer], sw, tw, conv) for m, sw, tw in zip(mats[method], src_ids, tgt_ids, strict=True)]
                scores.append(alignment_scores(hyps, golds))
                if talp_dir is not None:
                    write_talp(Path(talp_dir) / f"{method}.{conv}.layer{layer + 1}.talp", hyps)
            aer[method, conv] = [sc.aer for sc in scores]
            precision[method, conv] = [sc.precision for sc in scores]
            recall[method, conv] = [sc.recall for sc in scores]
    diag = alignment_scores([diagonal_alignment(len(p.source), len(p.target)) for p in pairs], golds)
    oracle = alignment_scores([best_single_links(g, len(p.target)) for g, p in zip(golds, pairs, strict=True)], golds)
    if talp_dir is not None:
        write_talp(Path(talp_dir) / "gold.talp", golds)
    # the source share of each real prediction (decoder positions 0..len(target))
    share = torch.cat(mats["source_share"], dim=-1).mean(-1)
    return {
        "aer": aer,
        "precision": precision,
        "recall": recall,
        "diagonal": diag,
        "oracle": oracle,
        "source_share": share.tolist(),
        "n": n,
        "n_layers": n_layers,
        "seconds": time.perf_counter() - start,
    }


def format_table(results: dict[str, Any]) -> str:
    """The AER table (percent, lower is better) as markdown."""
    n_layers = results["n_layers"]
    head = "| method | convention | " + " | ".join(f"layer {i + 1}" for i in range(n_layers)) + " |"
    rows = [head, "|---|---|" + "---:|" * n_layers]
    for (method, conv), values in results["aer"].items():
        cells = " | ".join(f"{100 * v:.1f}" for v in values)
        rows.append(f"| {METHODS[method]} | {conv} | {cells} |")
    for name, key in (("diagonal baseline (no model)", "diagonal"), ("best one link per word (gold oracle)", "oracle")):
        rows.append(f"| {name} | – | " + " | ".join([f"{100 * results[key].aer:.1f}"] * n_layers) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="held-out sentence pairs (at most 1000)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--talp-dir", type=Path, help="also write the gold and every hypothesis as talp files")
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="model folder (default: the shipped one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.talp_dir:
        args.talp_dir.mkdir(parents=True, exist_ok=True)
    res = evaluate(load_toy_translator(args.model), n=args.n, batch_size=args.batch_size, talp_dir=args.talp_dir)
    print(f"AER (%, lower is better) on {res['n']} held-out pairs, argmax over source words per target word")
    print("convention: input = the decoder position that reads the word, output = the one that predicts it\n")
    print(format_table(res))
    shares = ", ".join(f"{v:.2f}" for v in res["source_share"])
    print(f"\nALTI+ source share of the predictions, per layer: {shares}")
    best = min(res["aer"].items(), key=lambda kv: min(kv[1]))
    (method, conv), values = best
    layer = min(range(len(values)), key=values.__getitem__)
    print(f"best: {METHODS[method]} ({conv}), layer {layer + 1}: AER {100 * values[layer]:.1f}")
    print(f"({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
