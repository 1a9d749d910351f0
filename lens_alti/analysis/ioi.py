"""Indirect-object identification prompts (Wang et al. 2022) for the worked example."""

from __future__ import annotations

import random
import re
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



def _replace_nth(text: str, word: str, new: str, n: int) -> str:
    """`text` with the n-th (0-based) whole-word occurrence of `word` replaced by `new`."""
    matches = list(re.finditer(rf"\b{re.escape(word)}\b", text))
    if len(matches) <= n:
        from lens_alti.errors import InvalidArgumentError

        raise InvalidArgumentError("prompt", text, f"a text with an occurrence {n + 1} of the name {word!r}")
    m = matches[n]
    return text[: m.start()] + new + text[m.end() :]


def abc_corruption(prompts: list[IOIPrompt], seed: int = 0) -> list[str]:
    """The IOI "ABC" corruption (Wang et al. 2022): in each prompt the three name mentions
    (IO, S1, S2) are replaced by three other, distinct names, so the corrupted prompt has
    the same template and the same token positions but carries no information about which
    name is the indirect object. Deterministic for a seed.

    "When Mary and John went to the store, John gave a drink to"
    → "When Paul and Kate went to the store, Tom gave a drink to".
    """
    rng = random.Random(seed)
    out = []
    for p in prompts:
        a, b = p.correct.strip(), p.wrong.strip()
        n_a, n_b = (len(re.findall(rf"\b{re.escape(w)}\b", p.text)) for w in (a, b))
        if (n_a, n_b) != (1, 2):
            from lens_alti.errors import InvalidArgumentError

            raise InvalidArgumentError(
                "prompts", p.text, f"the IO name {a!r} once and the subject {b!r} twice (found {n_a} and {n_b}): "
                "the ABC corruption replaces each mention"
            )
        c, d, e = rng.sample([n for n in NAMES if n not in (a, b)], 3)
        text = _replace_nth(p.text, a, c, 0)
        text = _replace_nth(text, b, d, 0)
        text = _replace_nth(text, b, e, 0)  # the second mention of B is now the first one left
        out.append(text)
    return out


def name_positions(str_tokens: list[str], prompt: IOIPrompt) -> dict[str, int]:
    """Positions of the IO name, the subject's first (S1) and second (S2) mention in one
    prompt's tokens (`str_tokens` as the model tokenised it, names with their leading space)."""
    io = [i for i, t in enumerate(str_tokens) if t == prompt.correct]
    s = [i for i, t in enumerate(str_tokens) if t == prompt.wrong]
    if len(io) != 1 or len(s) != 2:
        from lens_alti.errors import InvalidArgumentError

        raise InvalidArgumentError(
            "str_tokens", prompt.text, f"the IO name {prompt.correct!r} once and the subject {prompt.wrong!r} twice "
            f"as whole tokens (found {len(io)} and {len(s)}; is each name a single token for this tokenizer?)"
        )
    return {"IO": io[0], "S1": s[0], "S2": s[1]}
