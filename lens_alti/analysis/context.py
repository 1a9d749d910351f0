"""Context attribution against ablations: multi-passage prompts, leave-one-out and top-k drops.

- `context_prompts(n, length, seed)`: deterministic prompts of several passages about similar
  people (shared first names and surnames, the same kinds of facts); one passage states where the
  asked person was born, the question needs that fact, the answer is the city.
- `response_log_prob(model, context, query, response_ids, spans=, removed=)`: log p(response) with
  some units removed from the context (docs/spec.md §13e), the ground truth of the evaluations;
- `leave_one_out`: the drop of log p(response) when each unit alone is removed;
- `top_k_drop`: the drop when the k units a ranking puts first are removed (ContextCite's top-k
  log-probability drop);
- `rank_metrics`: top-1 hit, Spearman with leave-one-out and the top-k drops of one ranking.

`model` is anything that maps token ids `[1, n]` to logits (a TransformerBridge, a Hugging Face
model whose output has `.logits`) and has a `tokenizer`; the prompt is built exactly as
`lens_alti.context_attribution` builds it (`lens_alti.api.inputs.context_tokens`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lens_alti.analysis.ablation import spearman
from lens_alti.api.inputs import DEFAULT_TEMPLATE, context_tokens, input_device, remove_units
from lens_alti.errors import InvalidArgumentError
from lens_alti.validation import check_size

FIRST_NAMES = (
    "Lena", "Jonas", "Marta", "Elias", "Nora", "Felix", "Clara", "Anton", "Ida", "Oskar", "Vera", "Emil",
    "Greta", "Hugo", "Alma", "Bruno", "Lotte", "Karl", "Irma", "Paul",
)
SURNAMES = (
    "Hartmann", "Hartwig", "Brandt", "Berger", "Krause", "Kramer", "Lindqvist", "Lindberg", "Moreau", "Morel",
    "Novak", "Nowak", "Ferreira", "Pereira", "Castell", "Costa", "Dalton", "Dawson", "Sorensen", "Svensson",
)
CITIES = (
    "Lisbon", "Porto", "Madrid", "Seville", "Valencia", "Lyon", "Marseille", "Bordeaux", "Toulouse", "Geneva",
    "Zurich", "Basel", "Vienna", "Prague", "Warsaw", "Krakow", "Munich", "Hamburg", "Cologne", "Dresden",
    "Leipzig", "Bergen", "Stockholm", "Helsinki", "Dublin", "Glasgow", "Edinburgh", "Bristol", "Liverpool",
    "Milan", "Naples", "Turin", "Florence", "Venice", "Genoa", "Athens", "Sofia", "Budapest", "Zagreb", "Riga",
    "Tallinn", "Vilnius", "Denver", "Seattle", "Toronto", "Montreal", "Ottawa", "Sydney", "Perth", "Lima",
)
JOBS = (
    "carpenter", "nurse", "librarian", "pharmacist", "architect", "baker", "engineer", "translator", "pilot",
    "teacher", "photographer", "chemist", "gardener", "journalist", "surveyor", "violinist",
)
HOBBIES = (
    "restoring old bicycles", "growing tomatoes on the balcony", "swimming in the lake before breakfast",
    "collecting postcards from small towns", "playing chess in the park", "baking bread for the neighbours",
    "hiking along the river", "repairing radios", "painting birds in watercolour", "reading detective novels",
)
PASSAGES = (
    "{name} was born in {city} in {year}. After school {he} trained as a {job} and worked for almost twenty "
    "years at a small firm near the harbour. Colleagues describe {him} as careful and quiet, someone who rarely "
    "missed a day of work. In {his} free time {he} enjoys {hobby}, and every spring {he} visits the old market "
    "where {he} used to buy fruit as a child.",
    "Born in {city} in {year}, {name} grew up in a house full of books. {He} became a {job} after a long "
    "apprenticeship and has kept the same small office for many years. Friends say that {he} is patient, "
    "curious and a little stubborn. On weekends {he} is usually {hobby}, and {he} writes long letters to {his} "
    "cousins in the evening.",
    "{name} works as a {job} and lives in a narrow street close to the station. {He} was born in {city} in "
    "{year} and moved away at the age of nineteen to study. Neighbours know {him} for {his} punctuality and "
    "for {hobby}. {He} still keeps a notebook of every trip {he} has made since {his} first summer job.",
)
QUESTION = "In which city was {name} born? Answer with the name of the city only."


@dataclass(frozen=True)
class ContextPrompt:
    """One multi-passage prompt: `context` (passages separated by blank lines), `query`, the gold
    `answer` (the city), `fact` (the index of the passage that states it), `person`, `n_passages`."""

    context: str
    query: str
    answer: str
    fact: int
    person: str
    n_passages: int


def _passage(rng: random.Random, name: str, city: str) -> str:
    he, him, his = rng.choice((("she", "her", "her"), ("he", "him", "his")))
    text = rng.choice(PASSAGES).format(
        name=name, city=city, year=rng.randint(1940, 1999), job=rng.choice(JOBS), hobby=rng.choice(HOBBIES),
        he=he, him=him, his=his, He=he.capitalize(),
    )
    return text


def _people(rng: random.Random, first: str, last: str) -> list[str]:
    """Other people, the most similar first: the asked person's surname or first name with another."""
    similar = [f"{f} {last}" for f in FIRST_NAMES if f != first] + [f"{first} {s}" for s in SURNAMES if s != last]
    rng.shuffle(similar)
    rest = [f"{f} {s}" for f in FIRST_NAMES for s in SURNAMES if f != first and s != last]
    rng.shuffle(rest)
    return similar[:6] + rest


def context_prompt_case(
    length: int, seed: int, count_tokens: Callable[[str, str], int] | None = None
) -> ContextPrompt:
    """One prompt of about `length` tokens (as many passages as fit, at least 2), deterministic for a seed.

    `count_tokens(context, query)`: the prompt's length in tokens (default: 1.4 per word + 40).
    """
    rng = random.Random(seed)
    first, last = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
    person = f"{first} {last}"
    cities = list(CITIES)
    rng.shuffle(cities)
    answer, others = cities[0], cities[1:]
    query = QUESTION.format(name=person)
    count = count_tokens or (lambda c, q: int(1.4 * len((c + " " + q).split())) + 40)
    fact = _passage(rng, person, answer)
    distractors: list[str] = []
    for i, name in enumerate(_people(rng, first, last)):
        candidate = _passage(rng, name, others[i % len(others)])
        if distractors and count("\n\n".join([fact, *distractors, candidate]), query) > length:
            break
        distractors.append(candidate)
    at = rng.randint(0, len(distractors))
    passages = distractors[:at] + [fact] + distractors[at:]
    return ContextPrompt("\n\n".join(passages), query, answer, at, person, len(passages))


def context_prompts(
    n: int, length: int, seed: int = 0, count_tokens: Callable[[str, str], int] | None = None
) -> list[ContextPrompt]:
    """`n` prompts of about `length` tokens each (see `context_prompt_case`), seeds `seed`, `seed + 1`, ..."""
    check_size("n", n)
    check_size("length", length)
    return [context_prompt_case(length, seed + i, count_tokens) for i in range(n)]


def _logits(model: Any, ids: Tensor) -> Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def response_log_prob(
    model: Any,
    context: str,
    query: str,
    response_ids: Sequence[int],
    *,
    spans: Sequence[tuple[int, int]] = (),
    removed: Sequence[int] = (),
    template: str = DEFAULT_TEMPLATE,
    chat: bool | None = None,
) -> float:
    """log p(response | prompt) with the units `removed` (indices into `spans`) taken out of the context."""
    response_ids = [int(t) for t in response_ids]
    if not response_ids:
        raise InvalidArgumentError("response_ids", response_ids, "at least one token id")
    bad = [u for u in removed if not 0 <= int(u) < len(spans)]
    if bad:
        raise InvalidArgumentError("removed", list(removed), f"unit indices in 0..{len(spans) - 1}")
    text = remove_units(context, spans, removed) if removed else context
    ids = context_tokens(model, text, query, template, chat)[0]
    full = torch.tensor([ids + response_ids], device=input_device(model))
    logp = _logits(model, full)[0, len(ids) - 1 : -1].double().log_softmax(-1)
    return float(logp.gather(-1, full[0, len(ids) :, None].to(logp.device)).sum())


def leave_one_out(
    model: Any, context: str, query: str, response_ids: Sequence[int], spans: Sequence[tuple[int, int]], **kw: Any
) -> tuple[float, Tensor]:
    """(log p(response) with the whole context, `[u]` its drop when each unit alone is removed)."""
    full = response_log_prob(model, context, query, response_ids, spans=spans, **kw)
    drops = [full - response_log_prob(model, context, query, response_ids, spans=spans, removed=[u], **kw)
             for u in range(len(spans))]
    return full, torch.tensor(drops, dtype=torch.float64)


def top_k_drop(
    model: Any, context: str, query: str, response_ids: Sequence[int], spans: Sequence[tuple[int, int]],
    ranking: Sequence[int], k: int, full: float, **kw: Any,
) -> float:
    """The drop of log p(response) (from `full`) when the first `k` units of `ranking` are removed."""
    check_size("k", k)
    removed = [int(u) for u in ranking[:k]]
    return full - response_log_prob(model, context, query, response_ids, spans=spans, removed=removed, **kw)


def rank_metrics(scores: Tensor, loo: Tensor, fact: int) -> dict[str, float]:
    """Top-1 hit (the highest score is the fact's unit) and Spearman's rho of `scores` with the
    leave-one-out drops `loo` (NaN when either is constant)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    top = int(scores.argsort(descending=True, stable=True)[0])
    return {"top1": float(top == fact), "spearman_loo": spearman(scores, torch.as_tensor(loo, dtype=torch.float64))}
