"""Agreement tasks beyond IOI: subject–verb agreement with attractors and BLiMP-style minimal pairs.

Each item is a prefix whose next token decides between a `correct` and a `wrong` continuation
(one token each, with the leading space), and the word of the prefix that decides it (`cue`):

- **subject–verb agreement with an attractor** (Linzen et al. 2016): "The keys to the old
  cabinet" → " are" / " is"; the subject and the attractor noun differ in number, the cue is
  the subject;
- **BLiMP-style minimal pairs** (Warstadt et al. 2020), three phenomena, each with a distractor
  of the other kind between the cue and the answer: anaphor gender ("The queen who visited the
  king hurt" → " herself" / " himself", cue "queen"), anaphor number ("The boys who visited the
  man blamed" → " themselves" / " himself", cue "boys") and determiner–noun agreement ("After
  lunch, Anna carefully washed these dirty" → " cars" / " car", cue "these").

The sets are small, written for this project, and deterministic (a seed picks the combinations);
`cue_position` finds the cue's last token in a model's tokenisation, so the same items serve any
tokenizer. The ALTI-Logit paper (Ferrando et al. 2023) reports the mean reciprocal rank of the cue
under each explanation method on such tasks (GPT-2 small: ALTI-Logit 0.604 on subject–verb
agreement and 0.739 on BLiMP, erasure 0.410 and 0.625).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Any

from lens_alti.errors import InvalidArgumentError
from lens_alti.validation import check_size

SVA_SUBJECTS = (
    ("key", "keys"), ("author", "authors"), ("painting", "paintings"), ("student", "students"),
    ("bottle", "bottles"), ("doctor", "doctors"), ("window", "windows"), ("letter", "letters"),
)
SVA_ATTRACTORS = (
    ("cabinet", "cabinets"), ("door", "doors"), ("table", "tables"), ("house", "houses"),
    ("river", "rivers"), ("school", "schools"),
)
SVA_FRAMES = ("The {subject} to the old {attractor}", "The {subject} near the small {attractor}",
              "The {subject} behind the red {attractor}", "The {subject} of the new {attractor}")

GENDER_NOUNS = (("queen", "king"), ("woman", "man"), ("girl", "boy"), ("mother", "father"),
                ("sister", "brother"), ("actress", "actor"))
NUMBER_NOUNS = (("boys", "boy"), ("men", "man"), ("kings", "king"), ("brothers", "brother"),
                ("fathers", "father"), ("actors", "actor"))
VERBS = ("hurt", "blamed", "praised", "helped", "saw")
DET_NOUNS = (("cars", "car"), ("books", "book"), ("dogs", "dog"), ("houses", "house"), ("chairs", "chair"))
DET_FRAMES = ("After lunch, {name} carefully washed {det} dirty", "Last week {name} really liked {det} old",
              "In the garden {name} suddenly found {det} small")
DET_NAMES = ("Anna", "Tom", "Lucy", "Sam")


@dataclass(frozen=True)
class AgreementItem:
    """A prefix, the correct and wrong next tokens (" are", " is"), the deciding word and its task."""

    text: str
    correct: str
    wrong: str
    cue: str  # the word of `text` that decides (its first whole-word occurrence)
    task: str


def _sample(items: list[AgreementItem], n: int | None, seed: int) -> list[AgreementItem]:
    if n is None:
        return items
    check_size("n", n, minimum=0)
    return random.Random(seed).sample(items, min(n, len(items)))


def subject_verb_agreement(n: int | None = 48, seed: int = 0) -> list[AgreementItem]:
    """Subject–verb agreement across a prepositional phrase whose noun (the attractor) has the
    other number: half singular subjects with plural attractors (→ " is"), half the reverse."""
    items = []
    for (sg, pl), (asg, apl), frame in itertools.product(SVA_SUBJECTS, SVA_ATTRACTORS, SVA_FRAMES):
        items.append(AgreementItem(frame.format(subject=sg, attractor=apl), " is", " are", sg, "sva"))
        items.append(AgreementItem(frame.format(subject=pl, attractor=asg), " are", " is", pl, "sva"))
    return _sample(items, n, seed)


def minimal_pairs(n_per_task: int | None = 16, seed: int = 0) -> list[AgreementItem]:
    """BLiMP-style minimal pairs: anaphor gender, anaphor number, determiner–noun agreement."""
    gender, number, det = [], [], []
    for ((fem, masc), (_, other_m), (other_f, _)), verb in itertools.product(
        zip(GENDER_NOUNS, GENDER_NOUNS[1:] + GENDER_NOUNS[:1], GENDER_NOUNS[2:] + GENDER_NOUNS[:2], strict=True), VERBS
    ):
        gender.append(AgreementItem(f"The {fem} who visited the {other_m} {verb}", " herself", " himself", fem,
                                    "anaphor_gender"))
        gender.append(AgreementItem(f"The {masc} who visited the {other_f} {verb}", " himself", " herself", masc,
                                    "anaphor_gender"))
    for ((pl, sg), (other_pl, other_sg)), verb in itertools.product(
        zip(NUMBER_NOUNS, NUMBER_NOUNS[1:] + NUMBER_NOUNS[:1], strict=True), VERBS
    ):
        number.append(AgreementItem(f"The {pl} who visited the {other_sg} {verb}", " themselves", " himself", pl,
                                    "anaphor_number"))
        number.append(AgreementItem(f"The {sg} who visited the {other_pl} {verb}", " himself", " themselves", sg,
                                    "anaphor_number"))
    for (pl, sg), frame, name in itertools.product(DET_NOUNS, DET_FRAMES, DET_NAMES):
        det.append(AgreementItem(frame.format(name=name, det="these"), f" {pl}", f" {sg}", "these", "determiner_noun"))
        det.append(AgreementItem(frame.format(name=name, det="this"), f" {sg}", f" {pl}", "this", "determiner_noun"))
    return [item for i, group in enumerate((gender, number, det)) for item in _sample(group, n_per_task, seed + i)]


def cue_position(model: Any, item: AgreementItem) -> int:
    """Position of the cue's last token in `model.to_tokens(item.text)` (BOS included, as it runs).

    The text up to the end of the cue's first whole-word occurrence must tokenise to a prefix of
    the whole text's tokens; a text where it does not is refused (InvalidArgumentError naming `item`).
    """
    found = re.search(rf"\b{re.escape(item.cue)}\b", item.text)
    if found is None:
        raise InvalidArgumentError("item", item.text, f"a text that contains its cue {item.cue!r} as a word")
    whole = model.to_tokens(item.text)[0].tolist()
    prefix = model.to_tokens(item.text[: found.end()])[0].tolist()
    if whole[: len(prefix)] != prefix:
        raise InvalidArgumentError(
            "item", item.text, f"a text whose tokens up to the cue {item.cue!r} are a prefix of its own tokens"
        )
    return len(prefix) - 1
