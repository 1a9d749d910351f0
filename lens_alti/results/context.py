"""The result of `lens_alti.context_attribution` (docs/spec.md §13): one signed score per unit of a context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

from lens_alti.results.saving import savable, save
from lens_alti.validation import check_size


@savable
@dataclass
class ContextAttribution:
    """Which units (sentences, paragraphs or given spans) of a context made the model give its response.

    Shapes: `u` units, `n` tokens of the prompt and the response, `r` response tokens.

    Scores (ALTI-Logit of the response's log-probability, docs/spec.md §13b-§13c):
        scores: `[u]` each unit's signed score: Σ over the response tokens of the ALTI-Logit
            contributions of the unit's tokens to `explained`. Positive: the unit raises the
            response's log-probability (to first order); negative: it lowers it.
        token_scores: `[n]` each token's score (summed over the response tokens).
        other: the prompt's tokens outside every unit (template, query, chat markup, BOS).
        response_score: earlier response tokens, which later response tokens also read.
        not_to_tokens: `[r]` the MLP and bias terms, which ALTI-Logit gives to no token (docs/spec.md §7d).

    What is explained, per response token t (at the position before it):
        explained: `[r]` `logit_t − Σ_v p_v·logit_v` with p the model's prediction there:
            `scores.sum() + other + response_score + not_to_tokens.sum()` equals `explained.sum()`
            up to `completeness_gap`. Its split is the first-order split of log p(t).
        log_prob: `[r]` the real log p(t); `log_prob.sum()` is the response's log-probability.

    Text: `context`, `query`, `response`, `prompt` (the whole prompt as the model read it;
    `context_start` is where the context begins in it), `spans` (`[u, 2]` character spans of the
    units in `context`), `unit_kind` ("sentence", "paragraph" or "spans"), `token_units` (`[n]`
    each token's unit, -1 for none), `token_offsets` (`[n, 2]` each token's characters in
    `prompt + response`), `str_tokens`, `n_prompt` (prompt tokens; response tokens follow),
    `response_ids` (`[r]`), `generated` (the response was generated greedily), `chat` (the chat
    template was used), `template`, `architecture`.
    """

    scores: Float[Tensor, " u"]
    token_scores: Float[Tensor, " n"]
    explained: Float[Tensor, " r"]
    log_prob: Float[Tensor, " r"]
    not_to_tokens: Float[Tensor, " r"]
    completeness_gap: Float[Tensor, " r"]
    spans: Int[Tensor, "u 2"]
    token_units: Int[Tensor, " n"]
    token_offsets: Int[Tensor, "n 2"]
    response_ids: Int[Tensor, " r"]
    context: str
    query: str
    response: str
    prompt: str
    context_start: int
    n_prompt: int
    unit_kind: str
    template: str
    chat: bool
    generated: bool
    architecture: str
    str_tokens: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return int(self.scores.shape[0])

    @property
    def units(self) -> list[str]:
        """The text of each unit."""
        return [self.context[int(a) : int(b)] for a, b in self.spans.tolist()]

    @property
    def other(self) -> float:
        """Σ of the scores of the prompt's tokens outside every unit (template, query, markup, BOS)."""
        prompt = self.token_scores[: self.n_prompt]
        return float(prompt[self.token_units[: self.n_prompt] < 0].sum())

    @property
    def response_score(self) -> float:
        """Σ of the scores of the response's own tokens (earlier ones, read by later ones)."""
        return float(self.token_scores[self.n_prompt :].sum())

    @property
    def response_log_prob(self) -> float:
        """log p(response | prompt), the sum of `log_prob`."""
        return float(self.log_prob.sum())

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The `k` units with the highest score, highest first: (unit index, text, score)."""
        k = min(check_size("k", k), self.n_units)
        order = self.scores.argsort(descending=True, stable=True)[:k].tolist()
        texts = self.units
        return [(i, texts[i], float(self.scores[i])) for i in order]

    def ranking(self) -> list[int]:
        """Unit indices from the highest score to the lowest (ties keep the text's order)."""
        return [int(i) for i in self.scores.argsort(descending=True, stable=True)]

    def to_dataframe(self) -> Any:
        """One row per unit, in the text's order: unit, start, end, rank (1 = highest score),
        n_tokens, score, text."""
        import pandas as pd

        rank = {u: r + 1 for r, u in enumerate(self.ranking())}
        n_tokens = [int((self.token_units == u).sum()) for u in range(self.n_units)]
        return pd.DataFrame(
            {
                "unit": list(range(self.n_units)),
                "start": self.spans[:, 0].tolist(),
                "end": self.spans[:, 1].tolist(),
                "rank": [rank[u] for u in range(self.n_units)],
                "n_tokens": n_tokens,
                "score": self.scores.tolist(),
                "text": self.units,
            }
        )

    def save(self, path: Any) -> Any:
        """Write this result to `path` (.safetensors + JSON metadata); read it back with `lens_alti.load`."""
        return save(self, path)

    def __repr__(self) -> str:
        best = self.top(1)[0] if self.n_units else None
        shown = "" if best is None else f", top=unit {best[0]} ({best[2]:+.3f})"
        return (
            f"ContextAttribution(units={self.n_units} ({self.unit_kind}), response={self.response[:40]!r}, "
            f"log_prob={self.response_log_prob:.3f}, explained={float(self.explained.sum()):.3f}{shown}, "
            f"architecture={self.architecture!r})"
        )
