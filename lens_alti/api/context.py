"""`context_attribution` (docs/spec.md §13): which units of a context made a decoder give its response.

The steps: build the prompt (template, chat template) and find the context's units among its
tokens (`lens_alti.api.inputs`); generate the response greedily when it is not given; run the
model once and, for every response token t at once, in one walk down the stack
(`logit_attribution_at`), read log p(t) and the prediction p and explain `logit_t − Σ_v p_v·logit_v`
with ALTI-Logit (the first-order split of log p(t)); sum the token contributions over the response
tokens and over each unit's tokens (`lens_alti.alti.context`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lens_alti.alti.context import predictions, unit_scores
from lens_alti.api.inputs import (
    DEFAULT_TEMPLATE,
    context_tokens,
    decode_pieces,
    input_device,
    text_units,
    token_units,
    tokens_with_offsets,
)
from lens_alti.api.logit import logit_attribution_at
from lens_alti.api.options import DTYPES
from lens_alti.errors import ContextLengthError, InvalidArgumentError, UnsupportedModelError
from lens_alti.reading.generate import greedy_continuation
from lens_alti.results.context import ContextAttribution
from lens_alti.validation import check_choice, check_size, check_type


@torch.no_grad()
def context_attribution(
    model: Any,
    context: str,
    query: str,
    response: str | None = None,
    *,
    units: Any = "sentence",
    template: str = DEFAULT_TEMPLATE,
    chat: bool | None = None,
    max_new_tokens: int = 32,
    check: bool = True,
    dtype: torch.dtype = torch.float32,
) -> ContextAttribution:
    """Context attribution with ALTI-Logit (docs/spec.md §13): one signed score per unit of `context`.

    The prompt is `template` with the context and the query filled in, wrapped by the tokenizer's
    chat template as one user turn when the model has one (`chat=None`), as ContextCite does. The
    response's log-probability is explained token by token: for response token t, ALTI-Logit of
    `logit_t − Σ_v p_v·logit_v` (p: the model's prediction there), whose split is the first-order
    split of log p(t) (docs/spec.md §13b). A unit's score sums its tokens' contributions over the
    response tokens: positive raises the response's log-probability, negative lowers it.

    Args:
        model: a decoder-only model (a TransformerBridge or HookedTransformer) with a fast tokenizer.
        context: the text whose units are scored.
        query: the question or instruction that follows the context.
        response: the text to explain; None generates it greedily (up to `max_new_tokens`, ending at
            the end-of-sequence token, which is not part of it).
        units: "sentence", "paragraph", or a list of `(start, end)` character spans of `context`
            (sorted, not overlapping).
        template: the user message, with `{context}` and `{query}` once each.
        chat: use the tokenizer's chat template: None (default) when it has one, True, or False.
        max_new_tokens: the longest generated response.
        check: as for `logit_attribution` (reconstruction and completeness checks).
        dtype: torch.float32 (default) or torch.float64.

    Returns:
        A ContextAttribution: `scores[u]`, `top(k)`, `to_dataframe()`, `token_scores`, the
        explained quantities, the log-probabilities and the text.
    """
    for name, value in (("context", context), ("query", query)):
        check_type(name, value, str, "a text")
    if response is not None:
        check_type("response", response, str, "a text, or None to generate it")
    check_size("max_new_tokens", max_new_tokens)
    check_choice("dtype", dtype, DTYPES)
    spans = text_units(context, units)
    if not spans:
        raise InvalidArgumentError("context", context, f"a text with at least one {units} (it has none)")
    _decoder_only(model)
    ids, offsets, prompt, start, used_chat = context_tokens(model, context, query, template, chat)
    n_prompt, generated = len(ids), response is None
    _check_length(model, n_prompt + (max_new_tokens if generated else 0))
    answer, response, response_offsets = _response(model, ids, response, max_new_tokens)
    _check_length(model, n_prompt + len(answer))
    offsets += [(a + len(prompt), b + len(prompt)) for a, b in response_offsets]
    full = torch.tensor([ids + answer], device=input_device(model))
    parts = _explain(model, full, n_prompt, check, dtype)
    units_of = torch.tensor(token_units(offsets[:n_prompt], spans, start) + [-1] * len(answer))
    return ContextAttribution(
        scores=unit_scores(parts["tokens"], units_of, len(spans)),
        token_scores=parts["tokens"],
        explained=parts["explained"],
        log_prob=parts["log_prob"],
        not_to_tokens=parts["not_to_tokens"],
        completeness_gap=parts["gap"],
        spans=torch.tensor(spans, dtype=torch.long),
        token_units=units_of,
        token_offsets=torch.tensor(offsets, dtype=torch.long),
        response_ids=torch.tensor(answer, dtype=torch.long),
        context=context,
        query=query,
        response=response,
        prompt=prompt,
        context_start=start,
        n_prompt=n_prompt,
        unit_kind=units if isinstance(units, str) else "spans",
        template=template,
        chat=used_chat,
        generated=generated,
        architecture=parts["architecture"],
        str_tokens=decode_pieces(model, full[0].tolist()),
    )


def _response(
    model: Any, prompt_ids: list[int], response: str | None, max_new_tokens: int
) -> tuple[list[int], str, list[tuple[int, int]]]:
    """(response token ids, response text, each token's characters in the text): tokenised, or generated."""
    if response is None:
        eos = getattr(model.tokenizer, "eos_token_id", None)
        answer = greedy_continuation(model, torch.tensor([prompt_ids], device=input_device(model)), max_new_tokens, eos)
        if not answer:
            raise InvalidArgumentError(
                "response", None, "a text: the model generated nothing before its end-of-sequence token"
            )
        return answer, str(model.tokenizer.decode(answer)), _generated_offsets(model, answer)
    if not response:
        raise InvalidArgumentError("response", response, "a non-empty text, or None to generate it")
    answer, offsets = tokens_with_offsets(model, response, False)
    if not answer:
        raise InvalidArgumentError("response", response, "a text of at least one token")
    return answer, response, offsets


def _check_length(model: Any, n_tokens: int) -> None:
    """Refuse a prompt and response longer than the model's context (`cfg.n_ctx`) before running it."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and n_tokens > int(n_ctx):
        raise ContextLengthError("context", n_tokens, int(n_ctx))


def _decoder_only(model: Any) -> None:
    """Refuse models that are not decoder-only language models (encoders, encoder-decoders, caches)."""
    if not callable(model) or hasattr(model, "encoder_blocks") or not hasattr(model, "cfg"):
        raise UnsupportedModelError(
            f"{type(model).__name__}: context_attribution needs a decoder-only model (a TransformerBridge or "
            "HookedTransformer), not an encoder, an encoder-decoder or a cache"
        )
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedModelError(
            f"{type(model).__name__}: context_attribution needs a decoder-only (causal) model; this one attends "
            "in both directions"
        )


def _generated_offsets(model: Any, answer: list[int]) -> list[tuple[int, int]]:
    """Character spans of generated tokens in the decoded response (the growth of the decoded prefix)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for i in range(len(answer)):
        end = len(model.tokenizer.decode(answer[: i + 1]))
        out.append((pos, max(pos, end)))
        pos = max(pos, end)
    return out


def _explain(model: Any, full: Tensor, n_prompt: int, check: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Per response token: log p, and ALTI-Logit of `logit_t − Σ p·logit` summed into token scores."""
    targets = full[0, n_prompt:]
    seen: dict[str, Tensor] = {}

    def own_prediction(logits: Tensor) -> Tensor:  # the run's own logits at the explained positions
        seen["log_prob"], p = predictions(logits, targets)
        return p.to(dtype)

    n = full.shape[1]
    tokens = torch.zeros(n, dtype=dtype)
    # every response token at once: position n_prompt + r − 1 predicts token r (a causal model's
    # position does not see the ones after it, so the last token is not needed as input)
    attr = logit_attribution_at(
        model, targets, own_prediction, positions=list(range(n_prompt - 1, n - 1)), tokens=full[:, :-1], heads=False,
        check=check, dtype=dtype,
    )
    rows = attr.tokens.detach().cpu().to(dtype)
    tokens[: n - 1] += rows.sum(0)
    explained = [float(v) for v in attr.logit]
    gaps = [float(v) for v in attr.completeness_gap]
    rest = [e - float(row.sum()) - g for e, row, g in zip(explained, rows, gaps, strict=True)]
    arch = attr.architecture
    as_t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return {
        "tokens": tokens, "explained": as_t(explained), "log_prob": seen["log_prob"].to(dtype).cpu(),
        "not_to_tokens": as_t(rest), "gap": as_t(gaps), "architecture": arch,
    }
