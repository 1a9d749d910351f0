"""Context attribution (docs/spec.md §13): token scores summed into units, and the log-probabilities explained.

Model-agnostic: works on the token scores of ALTI-Logit (`LogitAttribution.tokens`) and on logits.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def unit_scores(
    token_scores: Float[Tensor, " n"], token_units: Int[Tensor, " n"], n_units: int
) -> Float[Tensor, " u"]:
    """Σ of the scores of each unit's tokens (docs/spec.md §13c); tokens of no unit (-1) are left out."""
    keep = token_units >= 0
    out = torch.zeros(n_units, dtype=token_scores.dtype, device=token_scores.device)
    return out.index_add_(0, token_units[keep].to(out.device), token_scores[keep])


def predictions(
    logits: Float[Tensor, "r vocab"], targets: Int[Tensor, " r"]
) -> tuple[Float[Tensor, " r"], Float[Tensor, "r vocab"]]:
    """(log p(target) of each row, the row's distribution p = softmax(logits)) (docs/spec.md §13b)."""
    logp = logits.double().log_softmax(-1)
    return logp.gather(-1, targets[:, None].to(logp.device))[:, 0], logp.exp()


def expected_unembedding(
    W_U: Float[Tensor, "d vocab"], p: Float[Tensor, "b vocab"], chunk: int = 8192
) -> Float[Tensor, "b d"]:
    """`Σ_v p[b, v]·W_U[:, v]`, accumulated in float64 over chunks of the vocabulary (docs/spec.md §13b).

    A float32 matrix-vector product over a vocabulary of ~50k entries loses about 2e-5 relative,
    enough to break ALTI-Logit's completeness check of a difference of two logits of ~20.
    """
    out = torch.zeros(p.shape[0], W_U.shape[0], dtype=torch.float64, device=W_U.device)
    for start in range(0, W_U.shape[1], chunk):
        block = W_U[:, start : start + chunk].to(torch.float64)
        out += p[:, start : start + chunk].to(device=W_U.device, dtype=torch.float64) @ block.T
    return out


def expected_value(values: Float[Tensor, "b vocab"], p: Float[Tensor, "b vocab"]) -> Float[Tensor, " b"]:
    """`Σ_v p[b, v]·values[b, v]` in float64 (the mean logit, or the mean unembedding bias)."""
    return (p.to(torch.float64) * values.to(device=p.device, dtype=torch.float64)).sum(-1)
