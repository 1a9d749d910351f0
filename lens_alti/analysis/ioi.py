"""Indirect-object identification prompts (Wang et al. 2022) for the worked example."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lens_alti.analysis.batching import left_padded  # noqa: F401  (re-exported for the examples)

NAMES = (
    "Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Paul", "Laura",
    "Mark", "Lisa", "Peter", "Kate", "Daniel", "Alice",
)
PLACES = ("store", "park", "school", "office", "station", "garden", "market", "beach", "hospital", "library")
OBJECTS = ("drink", "book", "ball", "gift", "letter", "key", "phone", "ticket", "flower", "bag")
TEMPLATES = (
    "When {A} and {B} went to the {place}, {B} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {B} handed a {obj} to",
    "While {A} and {B} were at the {place}, {B} passed a {obj} to",
)


@dataclass(frozen=True)
class IOIPrompt:
    """A prompt whose answer is the indirect object `correct` (the name not repeated)."""

    text: str
    correct: str  # " Mary" (with the leading space the tokenizer uses)
    wrong: str


def ioi_prompts(n: int, seed: int = 0, *, first_is_canonical: bool = True) -> list[IOIPrompt]:
    """`n` templated prompts, deterministic for a seed; the first is the canonical
    "When Mary and John went to the store, John gave a drink to" unless told otherwise."""
    from lens_alti.validation import check_size

    check_size("n", n, minimum=0)
    rng = random.Random(seed)
    out = []
    if first_is_canonical and n > 0:
        out.append(IOIPrompt(TEMPLATES[0].format(A="Mary", B="John", place="store", obj="drink"), " Mary", " John"))
    while len(out) < n:
        a, b = rng.sample(NAMES, 2)
        text = rng.choice(TEMPLATES).format(A=a, B=b, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
        out.append(IOIPrompt(text, f" {a}", f" {b}"))
    return out

