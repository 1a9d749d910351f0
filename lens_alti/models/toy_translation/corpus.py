"""A synthetic parallel corpus with gold word alignments.

Two artificial languages share a meaning but not a grammar:

* **Source** (English-like glosses, SVO): ``Det Adj* Noun``, ``[will] [not] Verb``, prepositions.
  ``the big red dog will not see a cat in the house``, ``my dog does not sleep``
* **Target** (invented words, verb-final, postpositional): nouns before their adjectives, in
  mirror order, the determiner after the noun phrase, a topic marker after the subject and an
  accusative marker after the object, negation just before the verb, prepositional phrases
  before the verb. ``dadu sigo bara en wa radi o dalebi en tu na mehukusa``

Alignment phenomena (0-indexed ``(source, target)`` links; talp files are 1-indexed):

* reordering: adjective–noun swap with mirrored adjectives, verb-final, postpositions;
* one-to-many: "light-verb" verbs become two target words (``helps`` → ``bereku dun``);
* many-to-one: ``will`` + verb become one future verb form (``will see`` → ``mehukusa``), and
  ``does not`` becomes ``na``;
* unaligned source words: the indefinite article ``a``;
* target words with only *possible* links: the case markers ``wa`` / ``o`` (to their noun).

Everything is deterministic: the lexicon is fixed, and `generate_corpus(n, seed)` depends only
on its arguments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

Link = tuple[int, int]

NOUNS = (
    "dog cat bird horse fish king queen child farmer teacher doctor student girl boy man woman "
    "baker soldier sailor thief wolf bear fox mouse lion friend"
).split()
PLACE_NOUNS = "house garden river forest city market school field castle boat".split()
ADJECTIVES = "big small red old young happy sad tall green quiet brave strange".split()
TRANSITIVE = "sees likes finds follows calls hears carries feeds paints meets knows watches".split()
LIGHT_VERBS = "helps hugs thanks kicks visits".split()  # one-to-many: noun-like stem + "dun"
INTRANSITIVE = "sleeps runs sings waits dances swims".split()
PREPOSITIONS = "in near behind under".split()

# The target determiner for each source determiner; "a" has none (an unaligned source word).
DETERMINERS = {"the": "en", "this": "ke", "my": "mi", "a": None}
TOPIC, ACCUSATIVE, NEGATION, LIGHT = "wa", "o", "na", "dun"
FUTURE_SUFFIX = "sa"
POSTPOSITIONS = {"in": "tu", "near": "pel", "behind": "gor", "under": "sib"}

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


def _invent_words(n: int, taken: set[str], seed: int = 1234) -> list[str]:
    """`n` distinct CV(CV)(CV) pseudo-words not in `taken`, fixed by `seed`."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3))))
        if word not in taken and not word.endswith(FUTURE_SUFFIX):
            taken.add(word)
            out.append(word)
    return out


def _build_lexicon() -> dict[str, str]:
    fixed = {TOPIC, ACCUSATIVE, NEGATION, LIGHT, *POSTPOSITIONS.values()}
    fixed |= {t for t in DETERMINERS.values() if t}
    source_words = NOUNS + PLACE_NOUNS + ADJECTIVES + TRANSITIVE + LIGHT_VERBS + INTRANSITIVE
    invented = _invent_words(len(source_words), fixed | set(source_words))
    return dict(zip(source_words, invented, strict=True))


LEXICON: dict[str, str] = _build_lexicon()
"""Source content word → target word (for light verbs: the stem that precedes "dun")."""

# Source forms used after "will" (bare verb): "sees" → "see", "watches" → "watch".
_BARE = {v: (v[:-2] if v.endswith(("ches", "shes")) else v[:-1]) for v in TRANSITIVE + LIGHT_VERBS + INTRANSITIVE}


def source_vocabulary() -> list[str]:
    """Every word the source language can use."""
    words = list(DETERMINERS) + NOUNS + PLACE_NOUNS + ADJECTIVES + PREPOSITIONS + ["will", "does", "not"]
    for verb in TRANSITIVE + LIGHT_VERBS + INTRANSITIVE:
        words += [verb, _BARE[verb]]
    return list(dict.fromkeys(words))


def target_vocabulary() -> list[str]:
    """Every word the target language can use."""
    words = [t for t in DETERMINERS.values() if t] + [TOPIC, ACCUSATIVE, NEGATION, LIGHT, LIGHT + FUTURE_SUFFIX]
    words += list(POSTPOSITIONS.values())
    for src, tgt in LEXICON.items():
        words.append(tgt)
        if src in TRANSITIVE + INTRANSITIVE:
            words.append(tgt + FUTURE_SUFFIX)
    return list(dict.fromkeys(words))


@dataclass
class SentencePair:
    """One parallel sentence with its gold alignment (0-indexed (source, target) links)."""

    source: list[str]
    target: list[str]
    sure: set[Link] = field(default_factory=set)
    possible: set[Link] = field(default_factory=set)  # includes `sure`

    @property
    def source_text(self) -> str:
        return " ".join(self.source)

    @property
    def target_text(self) -> str:
        return " ".join(self.target)


class _Builder:
    """Appends source and target words and records links by position."""

    def __init__(self) -> None:
        self.source: list[str] = []
        self.target: list[str] = []
        self.sure: set[Link] = set()
        self.possible: set[Link] = set()

    def src(self, word: str) -> int:
        self.source.append(word)
        return len(self.source) - 1

    def tgt(self, word: str, sure: tuple[int, ...] = (), possible: tuple[int, ...] = ()) -> int:
        self.target.append(word)
        t = len(self.target) - 1
        self.sure |= {(s, t) for s in sure}
        self.possible |= {(s, t) for s in sure + possible}
        return t


def _noun_phrase(rng: random.Random, nouns: list[str], max_adj: int) -> tuple[str, list[str], str]:
    det = rng.choice(list(DETERMINERS))
    n_adj = rng.choices(range(max_adj + 1), weights=[4, 3, 2][: max_adj + 1])[0]
    return det, rng.sample(ADJECTIVES, n_adj), rng.choice(nouns)


def _emit_np(b: _Builder, src_positions: dict, det: str, adjs: list[str], noun: str) -> None:
    """Target side of a noun phrase: Noun Adj_k … Adj_1 [Det]."""
    b.tgt(LEXICON[noun], sure=(src_positions["noun"],))
    for adj, pos in reversed(list(zip(adjs, src_positions["adjs"], strict=True))):
        b.tgt(LEXICON[adj], sure=(pos,))
    target_det = DETERMINERS[det]
    if target_det:
        b.tgt(target_det, sure=(src_positions["det"],))


def _src_np(b: _Builder, det: str, adjs: list[str], noun: str) -> dict:
    return {"det": b.src(det), "adjs": [b.src(a) for a in adjs], "noun": b.src(noun)}


def make_pair(rng: random.Random) -> SentencePair:
    """Draw one sentence pair from the grammar."""
    b = _Builder()
    subj = _noun_phrase(rng, NOUNS, 2)
    kind = rng.choices(["transitive", "light", "intransitive"], weights=[5, 2, 2])[0]
    verb = rng.choice({"transitive": TRANSITIVE, "light": LIGHT_VERBS, "intransitive": INTRANSITIVE}[kind])
    future, negated = rng.random() < 0.3, rng.random() < 0.25
    obj = _noun_phrase(rng, NOUNS, 2) if kind != "intransitive" else None
    pp = (rng.choice(PREPOSITIONS), _noun_phrase(rng, PLACE_NOUNS, 1)) if rng.random() < 0.5 else None

    # Source: Subj [will | does] [not] Verb [Obj] [Prep NP]
    s_subj = _src_np(b, *subj)
    s_will = b.src("will") if future else None
    s_does = b.src("does") if negated and not future else None
    s_not = b.src("not") if negated else None
    s_verb = b.src(_BARE[verb] if future or negated else verb)
    s_obj = _src_np(b, *obj) if obj else None
    s_pp = (b.src(pp[0]), _src_np(b, *pp[1])) if pp else None

    # Target: Subj wa [Obj o] [NP Post] [na] Verb
    _emit_np(b, s_subj, *subj)
    b.tgt(TOPIC, possible=(s_subj["noun"],))
    if obj and s_obj:
        _emit_np(b, s_obj, *obj)
        b.tgt(ACCUSATIVE, possible=(s_obj["noun"],))
    if pp and s_pp:
        _emit_np(b, s_pp[1], *pp[1])
        b.tgt(POSTPOSITIONS[pp[0]], sure=(s_pp[0],))
    if s_not is not None:
        b.tgt(NEGATION, sure=(s_not,) if s_does is None else (s_does, s_not))
    tense = (s_will,) if s_will is not None else ()
    suffix = FUTURE_SUFFIX if future else ""
    if kind == "light":
        b.tgt(LEXICON[verb], sure=(s_verb,))
        b.tgt(LIGHT + suffix, sure=(s_verb, *tense))
    else:
        b.tgt(LEXICON[verb] + suffix, sure=(s_verb, *tense))
    return SentencePair(b.source, b.target, b.sure, b.possible)


def generate_corpus(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[SentencePair]:
    """`n` distinct sentence pairs drawn with `seed`, leaving out source texts in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[SentencePair] = []
    while len(out) < n:
        pair = make_pair(rng)
        if pair.source_text not in seen:
            seen.add(pair.source_text)
            out.append(pair)
    return out


TRAIN_SEED, TEST_SEED = 0, 1
N_TRAIN, N_TEST = 20_000, 1_000  # the shipped model's training set and held-out set


def train_test_split(n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list[SentencePair], list[SentencePair]]:
    """The shipped model's training set and a held-out test set with no shared source sentence."""
    train = generate_corpus(n_train, TRAIN_SEED)
    test = generate_corpus(n_test, TEST_SEED, exclude={p.source_text for p in train})
    return train, test
