"""ALTI-Logit at several positions of one sequence in one walk (`logit_attribution_at`) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch

from lens_alti.api.logit import logit_attribution_at
from lens_alti.errors import ArgumentTypeError, InvalidArgumentError, OutOfRangeError
from tests.support.errors import raises_exactly
from tests.support.reference_logit import close, reference_logit_decoder

POSITIONS = [8, 3, 5]  # any order; the last position is the top of the sequence
TARGETS = [5, 11, 7]


@pytest.fixture(scope="module")
def one(decoder):
    arch, hf, bridge = decoder
    ids = torch.randint(4, 1000, (1, 9), generator=torch.Generator().manual_seed(7))
    _, cache = bridge.run_with_cache(ids)
    return arch, hf, bridge, ids, cache


@pytest.mark.parametrize("source", ["cache", "model"])
def test_each_position_matches_the_reference(one, source):
    """Item i equals the dense float64 ALTI-Logit of the same sequence at positions[i] (a soft contrast)."""
    _, hf, bridge, ids, cache = one
    vocab = int(bridge.cfg.d_vocab)
    p = torch.softmax(torch.randn(len(POSITIONS), vocab, generator=torch.Generator().manual_seed(3)), -1)
    given = cache if source == "cache" else bridge
    res = logit_attribution_at(given, TARGETS, p, positions=POSITIONS, tokens=ids, heads=True)
    ref = reference_logit_decoder(hf, ids.expand(len(POSITIONS), -1), TARGETS, None, POSITIONS,
                                  contrast_weights=p.double())
    for name in ("heads", "head_totals", "mlp", "attn_bias", "embedding", "bias", "logit", "by_layer", "tokens"):
        close(getattr(res, name), ref[name])
    assert res.position.tolist() == POSITIONS
    assert res.heads.abs().max() > 1e-3, "the parts must not be trivially zero"
    for i, q in enumerate(POSITIONS):  # a causal model: nothing after the explained position
        assert float(res.tokens[i, q + 1 :].abs().sum()) == 0
    assert res.attention_mask.shape == (len(POSITIONS), ids.shape[1])


def test_hard_contrast_and_negative_positions(one):
    _, hf, _, ids, cache = one
    res = logit_attribution_at(cache, [5, 6], [9, 10], positions=[-1, -4])
    ref = reference_logit_decoder(hf, ids.expand(2, -1), [5, 6], [9, 10], [8, 5])
    close(res.tokens, ref["tokens"])
    close(res.logit, ref["logit"])
    assert res.heads is None, "heads=False by default: the per-source parts are not kept"


def test_contrast_from_the_models_own_prediction(one):
    """A function of the logits as contrast: the model's own softmax at each position (docs/spec.md §13b)."""
    _, hf, _, ids, cache = one
    seen = []

    def own(logits):
        seen.append(logits.shape)
        return logits.double().softmax(-1)

    res = logit_attribution_at(cache, TARGETS, own, positions=POSITIONS)
    with torch.no_grad():
        shown = hf(ids).logits[0, POSITIONS].double()
    if getattr(hf.config, "final_logit_softcapping", None):  # the function sees the logits the model outputs
        assert shown.abs().max() <= hf.config.final_logit_softcapping
    ref = reference_logit_decoder(hf, ids.expand(len(POSITIONS), -1), TARGETS, None, POSITIONS,
                                  contrast_weights=shown.softmax(-1))
    assert seen == [(len(POSITIONS), shown.shape[-1])], "called once, with the logits of every explained position"
    close(res.tokens, ref["tokens"])
    close(res.logit, ref["logit"])


def test_argument_errors(one):
    _, _, bridge, ids, cache = one
    la = logit_attribution_at
    raises_exactly(OutOfRangeError, "positions[1]=40", la, cache, [1, 2], positions=[1, 40])
    raises_exactly(InvalidArgumentError, "positions=[]", la, cache, [], positions=[])
    raises_exactly(ArgumentTypeError, "positions=3", la, cache, [1], positions=3)
    raises_exactly(InvalidArgumentError, "target=", la, cache, [1, 2, 3], positions=[1, 2])
    raises_exactly(InvalidArgumentError, "tokens=", la, bridge, [1], positions=[1], tokens=torch.cat([ids, ids]))
    raises_exactly(ArgumentTypeError, "heads='yes'", la, cache, [1], positions=[1], heads="yes")
    raises_exactly(InvalidArgumentError, "dtype=torch.float16", la, cache, [1], positions=[1], dtype=torch.float16)
    raises_exactly(InvalidArgumentError, "returning list", la, cache, [1], lambda z: [1], positions=[1])
    raises_exactly(InvalidArgumentError, "contrast=", la, cache, [1], lambda z: z.abs(), positions=[1])
