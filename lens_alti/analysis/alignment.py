"""Word alignments from contribution matrices, and their alignment error rate (AER).

Conventions used throughout:

* A link is a 0-indexed ``(source_word, target_word)`` pair. The talp files of the alignment
  literature are 1-indexed: ``i-j`` is a *sure* link, ``ipj`` a *possible* one (source `i`,
  target `j`). Possible links always include the sure ones (S ⊆ P).
* A contribution matrix has one row per decoder position and one column per source token
  (e.g. ``result.total[b, layer, :, :S]``, ``result.cross[b, layer, :, :S]`` or cross-attention
  weights). The decoder input is the start token followed by the target tokens, so target token
  `k` is *read* at decoder position ``k + 1`` and *predicted* at position ``k``. The two
  conventions of the literature pick those rows: ``"input"`` (alignment with the decoder input,
  AWI in Kobayashi et al. 2020) and ``"output"`` (with the position that predicts the word,
  AWO; Garg et al. 2019, Ferrando et al. 2022).
* Subword tokens are mapped to words by ``word_ids`` lists (one entry per token: its word
  index, or None for special tokens such as ``</s>``, which are dropped). Contributions are
  summed over a source word's subwords and averaged over a target word's subwords.

AER (Och & Ney 2003) over a corpus: ``1 − (|A∩S| + |A∩P|) / (|A| + |S|)``, counts summed over
sentences.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lens_alti.errors import ArgumentTypeError, InvalidArgumentError
from lens_alti.validation import check_int, check_type

Link = tuple[int, int]
WordIds = Sequence[int | None]
CONVENTIONS = ("input", "output")


@dataclass(frozen=True)
class GoldAlignment:
    """Gold links of one sentence pair: `sure` ⊆ `possible` (0-indexed (source, target))."""

    sure: frozenset[Link]
    possible: frozenset[Link]

    @classmethod
    def from_links(cls, sure: Iterable[Link], possible: Iterable[Link] = ()) -> GoldAlignment:
        """Build one, adding the sure links to the possible ones."""
        s = frozenset(_check_links("sure", sure))
        return cls(s, s | frozenset(_check_links("possible", possible)))


def _check_links(name: str, links: Iterable[Link]) -> list[Link]:
    """(source, target) pairs of non-negative integers (0-indexed)."""
    if isinstance(links, (str, bytes)) or not isinstance(links, Iterable):
        raise ArgumentTypeError(name, links, "an iterable of (source, target) pairs of 0-indexed word ids")
    out = []
    for link in links:
        if isinstance(link, (str, bytes)) or not isinstance(link, Sequence) or len(link) != 2:
            raise ArgumentTypeError(name, link, "(source, target) pairs of 0-indexed word ids")
        out.append((check_int(f"{name} link", link[0], minimum=0), check_int(f"{name} link", link[1], minimum=0)))
    return out


# ---------------------------------------------------------------- talp format


def parse_talp(line: str) -> GoldAlignment:
    """One talp line (``"1-1 2p3 3-2"``, 1-indexed) → a GoldAlignment (0-indexed)."""
    check_type("line", line, str, "one talp line (a str; decode bytes first)")
    sure: set[Link] = set()
    possible: set[Link] = set()
    for item in line.split():
        sep = "-" if "-" in item else "p" if "p" in item else None
        parts = item.split(sep) if sep else []
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts) or min(int(p) for p in parts) < 1:
            raise InvalidArgumentError("line", item, "talp links, 1-indexed 'i-j' (sure) or 'ipj' (possible)")
        link = (int(parts[0]) - 1, int(parts[1]) - 1)
        (sure if sep == "-" else possible).add(link)
    return GoldAlignment.from_links(sure, possible)


def format_talp(alignment: GoldAlignment | Iterable[Link]) -> str:
    """A GoldAlignment (sure as ``i-j``, possible-only as ``ipj``) or a set of links (all ``i-j``)
    as one 1-indexed talp line, sorted by target then source."""
    if isinstance(alignment, GoldAlignment):
        items = [(t, s, "-") for s, t in alignment.sure] + [(t, s, "p") for s, t in alignment.possible - alignment.sure]
    else:
        items = [(t, s, "-") for s, t in set(_check_links("alignment", alignment))]
    return " ".join(f"{s + 1}{sep}{t + 1}" for t, s, sep in sorted(items))


def read_talp(path: str | Path) -> list[GoldAlignment]:
    """Every line of a talp file (one sentence per line; empty lines are sentences with no link)."""
    return [parse_talp(line) for line in Path(path).read_text().splitlines()]


def write_talp(path: str | Path, alignments: Iterable[GoldAlignment | Iterable[Link]]) -> None:
    """Write one talp line per sentence (see `format_talp`)."""
    Path(path).write_text("".join(format_talp(a) + "\n" for a in alignments))


# ---------------------------------------------------------------- subwords → words


def word_ids_from_pieces(
    pieces: Sequence[str], scheme: str = "sentencepiece", special: Iterable[str] = ("</s>", "<s>", "<pad>")
) -> list[int | None]:
    """Word index of each subword piece (None for special tokens).

    `scheme`: ``"sentencepiece"`` (a piece starting with ``▁`` starts a word), ``"bpe"`` (a piece
    ending with ``@@`` continues into the next one) or ``"whole"`` (every piece is a word).
    """
    if scheme not in ("sentencepiece", "bpe", "whole"):
        raise InvalidArgumentError("scheme", scheme, "'sentencepiece', 'bpe' or 'whole'")
    special = set(special)
    out: list[int | None] = []
    word, continues = -1, False
    for piece in pieces:
        if piece in special:
            out.append(None)
            continues = False
            continue
        if scheme == "whole" or (scheme == "bpe" and not continues) or word < 0:
            word += 1
        elif scheme == "sentencepiece" and piece.startswith("▁"):
            word += 1
        out.append(word)
        continues = scheme == "bpe" and piece.endswith("@@")
    return out


def _group(n_words: int, word_ids: WordIds, n_tokens: int, what: str) -> Tensor:
    """[n_words, n_tokens] 0/1 membership matrix."""
    if len(word_ids) != n_tokens:
        raise InvalidArgumentError(
            f"{what}_word_ids",
            f"{len(word_ids)} entries",
            f"one entry per {what} token ({n_tokens}, the matrix's size)",
        )
    m = torch.zeros(n_words, n_tokens, dtype=torch.float64)
    for tok, w in enumerate(word_ids):
        if w is not None:
            m[check_int(f"{what}_word_ids[{tok}]", w, minimum=0), tok] = 1.0
    return m


def aggregate_subwords(
    matrix: Tensor,
    source_word_ids: WordIds,
    target_word_ids: WordIds,
    *,
    source_reduce: str = "sum",
    target_reduce: str = "mean",
) -> Tensor:
    """A `[target_tokens, source_tokens]` matrix → `[target_words, source_words]`.

    Columns of one source word are summed (or averaged), rows of one target word averaged (or
    summed); tokens whose word id is None are dropped. Works on any leading batch/layer dims.
    """
    for name, how in (("source_reduce", source_reduce), ("target_reduce", target_reduce)):
        if how not in ("sum", "mean"):
            raise InvalidArgumentError(name, how, "'sum' or 'mean'")
    source_word_ids = [None if w is None else check_int("source_word_ids", w, minimum=0) for w in source_word_ids]
    target_word_ids = [None if w is None else check_int("target_word_ids", w, minimum=0) for w in target_word_ids]
    n_src = 1 + max((w for w in source_word_ids if w is not None), default=-1)
    n_tgt = 1 + max((w for w in target_word_ids if w is not None), default=-1)
    gs = _group(n_src, source_word_ids, matrix.shape[-1], "source")
    gt = _group(n_tgt, target_word_ids, matrix.shape[-2], "target")
    if source_reduce == "mean":
        gs = gs / gs.sum(-1, keepdim=True).clamp_min(1)
    if target_reduce == "mean":
        gt = gt / gt.sum(-1, keepdim=True).clamp_min(1)
    return (gt @ matrix.to(torch.float64) @ gs.T).to(matrix.dtype)


# ---------------------------------------------------------------- extraction


def target_rows(matrix: Tensor, n_target_tokens: int, convention: str) -> Tensor:
    """The rows of a `[..., decoder_pos, source]` matrix for target tokens 0..n-1.

    The decoder input is ``[start, t_0, t_1, ...]``: ``"input"`` takes rows 1..n (where each
    token is read), ``"output"`` rows 0..n-1 (the positions that predict it).
    """
    if convention not in CONVENTIONS:
        raise InvalidArgumentError("convention", convention, "'input' or 'output'")
    check_int("n_target_tokens", n_target_tokens, minimum=0)
    offset = 1 if convention == "input" else 0
    if matrix.shape[-2] < n_target_tokens + offset:
        raise InvalidArgumentError(
            "n_target_tokens",
            n_target_tokens,
            f"{n_target_tokens} target tokens need {n_target_tokens + offset} decoder positions for the "
            f"{convention!r} convention, the matrix has {matrix.shape[-2]}"
        )
    return matrix[..., offset : offset + n_target_tokens, :]


def extract_alignment(word_matrix: Tensor) -> set[Link]:
    """Argmax per target word of a `[target_words, source_words]` matrix: one link per target
    word (rows that are all zero, or have no source word, give none). Ties: the first source word."""
    if word_matrix.dim() != 2:
        raise InvalidArgumentError(
            "word_matrix", f"shape {tuple(word_matrix.shape)}", "a [target_words, source_words] matrix"
        )
    if word_matrix.shape[1] == 0:
        return set()
    best = word_matrix.argmax(-1)
    alive = word_matrix.abs().amax(-1) > 0
    return {(int(best[t]), t) for t in range(word_matrix.shape[0]) if alive[t]}


def align(
    matrix: Tensor,
    source_word_ids: WordIds,
    target_word_ids: WordIds,
    convention: str = "output",
    **reduce: str,
) -> set[Link]:
    """Links from one sentence's `[decoder_pos, source_tokens]` contribution matrix.

    `target_word_ids` has one entry per target token (the decoder input after the start token);
    `source_word_ids` one per source token (None for ``</s>``). `reduce`: see `aggregate_subwords`.
    """
    rows = target_rows(matrix, len(target_word_ids), convention)
    return extract_alignment(aggregate_subwords(rows, source_word_ids, target_word_ids, **reduce))


def diagonal_alignment(n_source_words: int, n_target_words: int) -> set[Link]:
    """The monotone baseline: target word t ↦ source word round(t·(n_s−1)/(n_t−1))."""
    check_int("n_source_words", n_source_words, minimum=0)
    check_int("n_target_words", n_target_words, minimum=0)
    if n_source_words == 0:
        return set()
    scale = (n_source_words - 1) / max(n_target_words - 1, 1)
    return {(round(t * scale), t) for t in range(n_target_words)}


# ---------------------------------------------------------------- AER


@dataclass(frozen=True)
class AlignmentScores:
    """Corpus-level precision (against P), recall (against S) and AER, with their counts."""

    aer: float
    precision: float
    recall: float
    n_hypothesis: int
    n_sure: int
    n_hit_sure: int
    n_hit_possible: int


def alignment_scores(hypotheses: Sequence[Iterable[Link]], golds: Sequence[GoldAlignment]) -> AlignmentScores:
    """Corpus-level scores of hypothesis links against gold alignments, sentence by sentence.

    AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|) with the counts summed over the corpus; NaN when
    there are neither hypothesis nor sure links.
    """
    if len(hypotheses) != len(golds):
        raise InvalidArgumentError(
            "hypotheses", f"{len(hypotheses)} entries", f"one per gold alignment ({len(hypotheses)} hypotheses for "
            f"{len(golds)} gold alignments)"
        )
    a = s = a_s = a_p = 0
    for hyp, gold in zip(hypotheses, golds, strict=True):
        links = set(hyp)
        possible = gold.possible | gold.sure
        a += len(links)
        s += len(gold.sure)
        a_s += len(links & gold.sure)
        a_p += len(links & possible)
    nan = float("nan")
    return AlignmentScores(
        aer=1 - (a_s + a_p) / (a + s) if a + s else nan,
        precision=a_p / a if a else nan,
        recall=a_s / s if s else nan,
        n_hypothesis=a,
        n_sure=s,
        n_hit_sure=a_s,
        n_hit_possible=a_p,
    )


def alignment_error_rate(hypotheses: Sequence[Iterable[Link]], golds: Sequence[GoldAlignment]) -> float:
    """Corpus-level AER (see `alignment_scores`)."""
    return alignment_scores(hypotheses, golds).aer


def aer_per_layer(
    matrices: Sequence[Tensor],
    golds: Sequence[GoldAlignment],
    source_word_ids: Sequence[WordIds],
    target_word_ids: Sequence[WordIds],
    convention: str = "output",
    **reduce: str,
) -> list[float]:
    """Corpus AER of each layer: `matrices[k]` is sentence k's `[layer, decoder_pos, source_tokens]`."""
    if not (len(matrices) == len(golds) == len(source_word_ids) == len(target_word_ids)):
        raise InvalidArgumentError(
            "matrices", f"{len(matrices)} entries", "matrices, golds, source_word_ids and target_word_ids with one "
            "entry per sentence each"
        )
    if not matrices:
        return []
    n_layers = matrices[0].shape[0]
    hyps: list[list[set[Link]]] = [[] for _ in range(n_layers)]
    for mat, sw, tw in zip(matrices, source_word_ids, target_word_ids, strict=True):
        if mat.shape[0] != n_layers:
            raise InvalidArgumentError(
                "matrices", f"a matrix with {mat.shape[0]} layers", f"the same number of layers ({n_layers}) in each"
            )
        for layer in range(n_layers):
            hyps[layer].append(align(mat[layer], sw, tw, convention, **reduce))
    return [alignment_error_rate(h, golds) for h in hyps]


__all__ = [
    "CONVENTIONS",
    "AlignmentScores",
    "GoldAlignment",
    "Link",
    "aer_per_layer",
    "aggregate_subwords",
    "align",
    "alignment_error_rate",
    "alignment_scores",
    "diagonal_alignment",
    "extract_alignment",
    "format_talp",
    "parse_talp",
    "read_talp",
    "target_rows",
    "word_ids_from_pieces",
    "write_talp",
]
