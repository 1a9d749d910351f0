"""The channel-operator algebra of lens_alti.reading.mixers against plain loops and dense matrices."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lens_alti.errors import UnsupportedModelError
from lens_alti.reading.mixers import mamba, recurrent
from lens_alti.reading.mixers.operators import (
    causal_conv,
    compose,
    conv_on_sources,
    decay_matrix,
    selective_scan_kernel,
)
from tests.support.tokenizer import VOCAB

g = torch.Generator().manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=torch.float64)


def _dense_conv(w: torch.Tensor, n: int) -> torch.Tensor:
    """Conv[c, s, j] = w[c, j − s + K − 1] for s − K < j ≤ s, as a dense matrix."""
    C, K = w.shape
    out = torch.zeros(C, n, n, dtype=torch.float64)
    for s in range(n):
        for j in range(max(0, s - K + 1), s + 1):
            out[:, s, j] = w[:, j - s + K - 1]
    return out


def test_conv_on_sources_is_a_product_with_the_dense_convolution():
    C, K, n = 3, 4, 6
    w = torch.randn(C, K, generator=g, dtype=torch.float64)
    op = torch.randn(2, C, n, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conv_on_sources(op, w), op @ _dense_conv(w, n))
    x = torch.randn(2, n, C, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    dense = torch.einsum("csj,bjc->bsc", _dense_conv(w, n), x) + b
    torch.testing.assert_close(causal_conv(x, w, b), dense)


def test_decay_matrix_and_selective_kernel_match_loops():
    b, n, C, N = 2, 5, 3, 2
    log_decay = -torch.rand(b, n, C, generator=g, dtype=torch.float64)
    L = decay_matrix(log_decay)
    for t in range(n):
        for s in range(n):
            want = log_decay[:, s + 1 : t + 1].sum(1).exp() if s <= t else torch.zeros(b, C, dtype=torch.float64)
            torch.testing.assert_close(L[:, :, t, s], want)
    dt = torch.rand(b, n, C, generator=g, dtype=torch.float64)
    A = -torch.rand(C, N, generator=g, dtype=torch.float64)
    Bm = torch.randn(b, n, N, generator=g, dtype=torch.float64)
    Cm = torch.randn(b, n, N, generator=g, dtype=torch.float64)
    K = selective_scan_kernel(dt, A, Bm, Cm)
    t, s = 4, 1
    want = (Cm[:, t, None, :] * torch.exp(A * dt[:, s + 1 : t + 1].sum(1)[..., None]) * Bm[:, s, None, :]).sum(-1)
    torch.testing.assert_close(K[:, :, t, s], want * dt[:, s])
    assert float(K[:, :, 1, 3].abs().max()) == 0  # causal


def test_compose_carries_the_convolution_bias():
    b, n, C, K = 1, 5, 2, 3
    kernel = torch.randn(b, C, n, n, generator=g, dtype=torch.float64).tril()
    rg, sg = _rand(b, n, C), _rand(b, n, C)
    w, cb = torch.randn(C, K, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    op, beta = compose(kernel, receiver_gate=rg, source_gate=sg, conv_weight=w, conv_bias=cb)
    v = torch.randn(b, n, C, generator=g, dtype=torch.float64)
    direct = rg * torch.einsum("bcts,bsc->btc", kernel, sg * causal_conv(v, w, cb))
    torch.testing.assert_close(torch.einsum("bcts,bsc->btc", op, v) + beta, direct)
    with pytest.raises(ValueError, match="identity kernel"):
        compose(None)


def test_delta_rule_kernel_matches_the_recurrence():
    b, n, H, dk, dv = 1, 6, 2, 3, 4
    q = torch.randn(b, n, H, dk, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(b, n, H, dk, generator=g, dtype=torch.float64), dim=-1)
    beta, gd = _rand(b, n, H), -_rand(b, n, H)
    v = torch.randn(b, n, H, dv, generator=g, dtype=torch.float64)
    S = torch.zeros(b, H, dk, dv, dtype=torch.float64)
    outs = []
    for t in range(n):
        S = S * gd[:, t].exp()[..., None, None]
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * (v[:, t] - (S * k[:, t, :, :, None]).sum(-2)))[:, :, None]
        outs.append((S * q[:, t, :, :, None]).sum(-2))
    W = recurrent.delta_rule_kernel(q, k, beta, gd)
    torch.testing.assert_close(torch.einsum("bhts,bshe->bthe", W, v), torch.stack(outs, 1))


def test_non_silu_activation_and_wrong_widths_are_refused():
    cfg = T.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=3)
    mixer = T.MambaForCausalLM(cfg).backbone.layers[0].mixer
    proj = torch.randn(1, 5, 64, generator=g)
    assert mamba.is_mamba1(mixer) and not mamba.is_mamba2(mixer)
    with pytest.raises(UnsupportedModelError, match="expected 2·intermediate_size"):
        mamba.mamba1_operator(mixer, proj[..., :60], "m")
    mixer.activation = "gelu"
    with pytest.raises(UnsupportedModelError, match="activation is 'gelu'"):
        mamba.mamba1_operator(mixer, proj, "m")
    cfg2 = T.Mamba2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=3, num_heads=4,
        head_dim=8, n_groups=1,
    )
    mixer2 = T.Mamba2ForCausalLM(cfg2).backbone.layers[0].mixer
    with pytest.raises(UnsupportedModelError, match="laid out as"):
        mamba.mamba2_operator(mixer2, torch.randn(1, 5, 10, generator=g), "m2")
